#![allow(clippy::unwrap_used)]
//! What a setup script's size costs on real podman: the time of the
//! `copy_file` that delivers it and of the `exec` that runs it (a trivial
//! script: comment lines, then `exit 7`), for the bound on `setup_script`
//! (SETUP_SCRIPT_MAX_BYTES). A measurement, not a check: it is ignored by
//! default and asserts nothing about time.
//!
//! ```text
//! cargo test -p e2e --test setup_script_cost -- --ignored --nocapture
//! ```

use std::time::{Duration, Instant};

use e2e::{test_image, unique_prefix, PodmanService};
use podfleet_agent::podman::PodmanRuntime;
use podfleet_agent::runtime::ContainerRuntime;
use podfleet_core::runtime::{ContainerSpec, RuntimeOp, RuntimeReply, LABEL_MANAGED};
use podfleet_core::wire::Signal;

const SIZES: [usize; 5] = [1 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20];
const RUNS: usize = 9;
const SCRIPT: &str = "/.podfleet/setup.sh";

/// `size` bytes of comment lines, then `exit 7`: the code shows that sh
/// read it all.
fn padded_script(size: usize) -> String {
    let last = "exit 7\n";
    let line = format!("# {}\n", "x".repeat(77));
    let mut script = String::with_capacity(size);
    while script.len() + line.len() + last.len() <= size {
        script.push_str(&line);
    }
    let rest = size - script.len() - last.len();
    if rest >= 2 {
        script.push('#');
        script.push_str(&" ".repeat(rest - 2));
    }
    if rest >= 1 {
        script.push('\n');
    }
    script.push_str(last);
    script
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

#[test]
#[ignore = "a measurement: run it by name with --ignored --nocapture"]
fn copy_and_exec_time_by_script_size() {
    let service = PodmanService::start();
    let name = format!("{}-web", unique_prefix("pfcost"));
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio.block_on(async {
        let rt = PodmanRuntime::connect(service.socket()).await.unwrap();
        let spec = ContainerSpec {
            name: name.clone(),
            image: test_image().to_owned(),
            args: vec!["sleep".into(), "1000".into()],
            env: Default::default(),
            volumes: Vec::new(),
            ports: Vec::new(),
            labels: [(LABEL_MANAGED.to_owned(), "true".to_owned())].into(),
            stop_signal: Signal::Kill,
        };
        rt.execute(RuntimeOp::Create { spec }).await.unwrap();
        let start = RuntimeOp::Start {
            container: name.clone(),
        };
        rt.execute(start).await.unwrap();
        println!(
            "median of {RUNS} runs, one container, podman API {}",
            rt.api_version()
        );
        println!(
            "{:>9} {:>10} {:>10} {:>10}",
            "bytes", "copy", "exec", "both"
        );
        for size in SIZES {
            let script = padded_script(size);
            assert_eq!(script.len(), size);
            let (mut copies, mut execs, mut both) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..RUNS {
                let began = Instant::now();
                let copied = rt
                    .execute(RuntimeOp::CopyFile {
                        container: name.clone(),
                        path: SCRIPT.to_owned(),
                        content: script.clone(),
                        mode: 0o700,
                    })
                    .await;
                assert_eq!(copied, Ok(RuntimeReply::FileCopied));
                let copied_at = Instant::now();
                let ran = rt
                    .execute(RuntimeOp::Exec {
                        container: name.clone(),
                        argv: ["/bin/sh", "-e", "-o", "pipefail", SCRIPT]
                            .map(str::to_owned)
                            .to_vec(),
                    })
                    .await;
                let done = Instant::now();
                assert!(
                    matches!(ran, Ok(RuntimeReply::Executed { exit_code: 7, .. })),
                    "{ran:?}"
                );
                copies.push(copied_at - began);
                execs.push(done - copied_at);
                both.push(done - began);
            }
            println!(
                "{size:>9} {:>10.1?} {:>10.1?} {:>10.1?}",
                median(copies),
                median(execs),
                median(both)
            );
        }
        let _ = rt
            .execute(RuntimeOp::Remove {
                container: name.clone(),
                force: true,
            })
            .await;
    });
}
