#![allow(clippy::unwrap_used)]
//! What the podman adapter does beyond the conformance suite: the wiring of
//! a container spec into podman, reads that survive libpod's transient
//! states, what a file copy creates and an exec's output, and an absent
//! socket.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e::{podman, test_image, unique_prefix, PodmanService};
use podfleet_agent::podman::PodmanRuntime;
use podfleet_agent::runtime::ContainerRuntime;
use podfleet_core::runtime::{
    ContainerSpec, ContainerState, RuntimeErrorKind, RuntimeOp, RuntimeReply,
    EXEC_OUTPUT_MAX_BYTES, LABEL_MANAGED,
};
use podfleet_core::wire::{PortMapping, Protocol, Signal, VolumeMount};

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

fn spec(name: &str, args: &[&str]) -> ContainerSpec {
    ContainerSpec {
        name: name.to_owned(),
        image: test_image().to_owned(),
        args: args.iter().map(|&a| a.to_owned()).collect(),
        env: BTreeMap::new(),
        volumes: Vec::new(),
        ports: Vec::new(),
        labels: BTreeMap::from([(LABEL_MANAGED.to_owned(), "true".to_owned())]),
        stop_signal: Signal::Term,
    }
}

/// `podman inspect --format <format> <container>`, through the harness's
/// containers.conf.
fn podman_inspect(container: &str, format: &str) -> String {
    let output = podman()
        .args(["inspect", "--format", format, container])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[test]
fn create_wires_env_mounts_ports_and_restart_policy() {
    let service = PodmanService::start();
    let prefix = unique_prefix("pfwire");
    let name = format!("{prefix}-web");
    let volume = format!("{prefix}-cache");
    let host_dir = tempfile::tempdir().unwrap();
    std::fs::write(host_dir.path().join("hello"), "from host\n").unwrap();
    let mut spec = spec(&name, &["sleep", "1000"]);
    spec.env.insert("GREETING".into(), "hi there".into());
    spec.volumes = vec![
        VolumeMount {
            source: host_dir.path().to_str().unwrap().to_owned(),
            target: "/data".into(),
            read_only: true,
        },
        VolumeMount {
            source: volume.clone(),
            target: "/cache".into(),
            read_only: false,
        },
    ];
    let host_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    spec.ports = vec![
        PortMapping {
            host_port,
            container_port: 8080,
            protocol: Protocol::Tcp,
        },
        PortMapping {
            host_port,
            container_port: 5353,
            protocol: Protocol::Udp,
        },
    ];
    let exec = block_on(async {
        let rt = PodmanRuntime::connect(service.socket()).await.unwrap();
        let created = rt.execute(RuntimeOp::Create { spec }).await;
        assert!(
            matches!(created, Ok(RuntimeReply::Created { .. })),
            "{created:?}"
        );
        let started = rt
            .execute(RuntimeOp::Start {
                container: name.clone(),
            })
            .await;
        assert_eq!(started, Ok(RuntimeReply::Started));
        let script =
            "echo $GREETING; cat /data/hello; echo v > /cache/f && cat /cache/f; touch /data/x";
        rt.exec(
            &name,
            &["sh".into(), "-c".into(), script.into()],
            Duration::from_secs(10),
            10_000,
        )
        .await
        .unwrap()
    });
    // The bind mount is read-only: touch fails, and so does the script.
    assert_eq!(exec.stdout, "hi there\nfrom host\nv\n", "{exec:?}");
    assert_eq!(exec.exit_code, Some(1), "{exec:?}");
    assert!(exec.stderr.contains("Read-only file system"), "{exec:?}");

    assert_eq!(
        podman_inspect(&name, "{{.HostConfig.RestartPolicy.Name}}"),
        "no"
    );
    // libpod's own inspect, like the compat one, reports the signal by number.
    assert_eq!(podman_inspect(&name, "{{.Config.StopSignal}}"), "15");
    let ports = podman_inspect(&name, "{{json .HostConfig.PortBindings}}");
    for key in ["8080/tcp", "5353/udp"] {
        assert!(
            ports.contains(key) && ports.contains(&format!("\"{host_port}\"")),
            "{key} not bound to {host_port}: {ports}"
        );
    }

    let removed = podman().args(["rm", "--force", &name]).output().unwrap();
    assert!(removed.status.success(), "{removed:?}");
    let removed = podman()
        .args(["volume", "rm", "--force", &volume])
        .output()
        .unwrap();
    assert!(removed.status.success(), "{removed:?}");
}

/// podman's list and inspect say "stopped" for a few milliseconds after most
/// exits, a state bollard's typed models reject; the adapter's reads must not
/// fail on it (nor on "stopping").
#[test]
fn reads_survive_libpod_transient_states() {
    let service = PodmanService::start();
    let name = format!("{}-trap", unique_prefix("pfstates"));
    let trap = "trap 'exit 0' TERM; while true; do sleep 0.05; done";
    let seen = block_on(async {
        let rt = PodmanRuntime::connect(service.socket()).await.unwrap();
        let created = rt
            .execute(RuntimeOp::Create {
                spec: spec(&name, &["sh", "-c", trap]),
            })
            .await;
        assert!(created.is_ok(), "{created:?}");
        let done = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn({
            let (rt, done, name) = (rt.clone(), Arc::clone(&done), name.clone());
            async move {
                let mut seen = Vec::new();
                while !done.load(Ordering::Relaxed) {
                    let listed = rt.execute(RuntimeOp::List).await;
                    let Ok(RuntimeReply::Listed { containers }) = listed else {
                        panic!("list failed: {listed:?}");
                    };
                    seen.extend(
                        containers
                            .iter()
                            .filter(|c| c.name == name)
                            .map(|c| c.state),
                    );
                    let inspected = rt
                        .execute(RuntimeOp::Inspect {
                            container: name.clone(),
                        })
                        .await;
                    let Ok(RuntimeReply::Inspected { status }) = inspected else {
                        panic!("inspect failed: {inspected:?}");
                    };
                    seen.push(status.state);
                }
                seen
            }
        });
        for _ in 0..8 {
            let op = RuntimeOp::Start {
                container: name.clone(),
            };
            assert_eq!(rt.execute(op).await, Ok(RuntimeReply::Started));
            tokio::time::sleep(Duration::from_millis(100)).await;
            let op = RuntimeOp::Stop {
                container: name.clone(),
                signal: Signal::Term,
                grace: Duration::from_secs(5),
            };
            let stopped = rt.execute(op).await;
            assert!(
                matches!(stopped, Ok(RuntimeReply::Stopped { .. })),
                "{stopped:?}"
            );
        }
        done.store(true, Ordering::Relaxed);
        let seen = reader.await.unwrap();
        let _ = rt
            .execute(RuntimeOp::Remove {
                container: name.clone(),
                force: true,
            })
            .await;
        seen
    });
    assert!(seen.contains(&ContainerState::Running), "{seen:?}");
    assert!(seen.contains(&ContainerState::Exited), "{seen:?}");
    assert!(!seen.contains(&ContainerState::Unknown), "{seen:?}");
}

#[test]
fn an_absent_socket_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let connected = block_on(PodmanRuntime::connect(dir.path().join("podman.sock")));
    let error = connected.unwrap_err();
    assert_eq!(error.kind, RuntimeErrorKind::Unavailable, "{error}");
}

/// What `copy_file` and `exec` do beyond the suite: the modes and owners
/// of what a copy creates (and of what it leaves alone), a path too long
/// for a plain tar name, an output cut to its end while it streams, an
/// exec that outlasts the request timeout, and a program that is not there.
#[test]
fn copy_file_and_exec_beyond_the_suite() {
    let service = PodmanService::start();
    let name = format!("{}-web", unique_prefix("pfcopy"));
    let deep = "d".repeat(120);
    let long_path = format!("/{deep}/setup.sh");
    let lines = 20_000;
    let whole: usize = (0..lines).map(|i| format!("line {i}\n").len()).sum();
    let (stat, long, output, slow, missing) = block_on(async {
        let rt = PodmanRuntime::connect(service.socket()).await.unwrap();
        let exec = |argv: &[&str]| RuntimeOp::Exec {
            container: name.clone(),
            argv: argv.iter().map(|&a| a.to_owned()).collect(),
        };
        let copy = |path: &str, content: &str, mode: u32| RuntimeOp::CopyFile {
            container: name.clone(),
            path: path.to_owned(),
            content: content.to_owned(),
            mode,
        };
        let created = rt
            .execute(RuntimeOp::Create {
                spec: spec(&name, &["sleep", "1000"]),
            })
            .await;
        assert!(created.is_ok(), "{created:?}");
        let start = RuntimeOp::Start {
            container: name.clone(),
        };
        assert_eq!(rt.execute(start).await, Ok(RuntimeReply::Started));
        let made = rt.execute(exec(&["mkdir", "-m", "1777", "/shared"])).await;
        assert!(
            matches!(made, Ok(RuntimeReply::Executed { exit_code: 0, .. })),
            "{made:?}"
        );
        for (path, mode) in [
            ("/shared/f", 0o640),
            ("/.podfleet/deep/er/setup.sh", 0o700),
            (long_path.as_str(), 0o700),
        ] {
            let copied = rt.execute(copy(path, "echo copied\n", mode)).await;
            assert_eq!(copied, Ok(RuntimeReply::FileCopied), "{path}");
        }
        let stat = rt
            .execute(exec(&[
                "stat",
                "-c",
                "%a %u %g %n",
                "/shared",
                "/shared/f",
                "/.podfleet",
                "/.podfleet/deep",
                "/.podfleet/deep/er/setup.sh",
            ]))
            .await;
        let long = rt.execute(exec(&["/bin/sh", "-e", &long_path])).await;
        let many = format!("i=0; while [ $i -lt {lines} ]; do echo line $i; i=$((i+1)); done");
        let output = rt.execute(exec(&["sh", "-c", &many])).await;
        let impatient = rt.clone().with_request_timeout(Duration::from_secs(1));
        let slow = impatient
            .execute(exec(&["sh", "-c", "sleep 2; echo out; echo err >&2"]))
            .await;
        let missing = rt.execute(exec(&["podfleet-no-such-program"])).await;
        let _ = rt
            .execute(RuntimeOp::Remove {
                container: name.clone(),
                force: true,
            })
            .await;
        (stat, long, output, slow, missing)
    });
    // The existing /shared keeps its 1777; the missing parents are 0755.
    let want = "1777 0 0 /shared\n\
                640 0 0 /shared/f\n\
                755 0 0 /.podfleet\n\
                755 0 0 /.podfleet/deep\n\
                700 0 0 /.podfleet/deep/er/setup.sh\n";
    assert_eq!(
        stat,
        Ok(RuntimeReply::Executed {
            exit_code: 0,
            output: want.to_owned()
        })
    );
    assert_eq!(
        long,
        Ok(RuntimeReply::Executed {
            exit_code: 0,
            output: "copied\n".to_owned()
        })
    );
    let Ok(RuntimeReply::Executed { exit_code, output }) = output else {
        panic!("a long output: {output:?}");
    };
    assert_eq!(exit_code, 0);
    assert!(output.len() <= EXEC_OUTPUT_MAX_BYTES, "{}", output.len());
    assert!(
        output.starts_with(&format!("({whole} bytes in all) …")),
        "{output}"
    );
    assert!(output.ends_with("line 19999\n"), "{output}");
    let Ok(RuntimeReply::Executed { exit_code, output }) = slow else {
        panic!("an exec outlasting the request timeout: {slow:?}");
    };
    assert_eq!(exit_code, 0);
    assert!(
        output.contains("out\n") && output.contains("err\n"),
        "{output}"
    );
    let Ok(RuntimeReply::Executed { exit_code, output }) = missing else {
        panic!("an exec of a missing program: {missing:?}");
    };
    assert_eq!(exit_code, 127, "{output}");
    assert!(output.contains("executable file not found"), "{output}");
}
