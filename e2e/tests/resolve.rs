#![allow(clippy::unwrap_used, missing_docs)]
//! Tags resolved to digests at apply time, for real: the `podfleet` CLI
//! and controller processes around a nats-server, a real `docker-registry`
//! on loopback with htpasswd authentication ([`e2e::registry::Registry`]),
//! and the production agent on a device of its own (an isolated podman
//! that starts without the images and pulls them). Ground truth is the
//! registry's own API (or podman's record of what it pushed), the
//! buckets, and podman's `inspect`.
//!
//! Needs podman, nats-server, docker-registry, htpasswd and openssl; a
//! missing one fails the test naming its package.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::ConnectOptions;
use e2e::agent::{reported, running, tokio_runtime, Broker, Device};
use e2e::fleet::{Binaries, CliRun, Fleet, Podfleet};
use e2e::registry::{base64, variant_image, Registry, REGISTRY_PASSWORD, REGISTRY_USER};
use e2e::{eventually, unique_prefix, PodmanService, TEST_IMAGE};
use podfleet_core::wire::names::DESIRED_BUCKET;
use podfleet_core::wire::{DeploymentState, Phase};
use serde_json::Value;
use tempfile::TempDir;

/// Generous: two cores shared with compilers.
const SETTLE: Duration = Duration::from_secs(60);

fn binaries() -> Binaries {
    Binaries {
        podfleet: PathBuf::from(env!("CARGO_BIN_EXE_podfleet-e2e")),
        agent: PathBuf::from(env!("CARGO_BIN_EXE_podfleet-agent-e2e")),
    }
}

/// A fleet deployment `name` of one service `app` running `image` on
/// `device`; it exits at once on SIGTERM.
fn manifest(name: &str, device: &str, image: &str) -> String {
    format!(
        r#"apiVersion: podfleet.io/v1alpha1
kind: FleetDeployment
metadata:
  name: {name}
spec:
  target:
    devices: [{device}]
  score:
    services:
      - name: app
        image: {image}
        args: ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.2; done"]
"#
    )
}

/// `podfleet apply -f file` with the registry's flags and `extra`.
fn apply(cli: &Podfleet, file: &Path, auth: &Path, registry: &Registry, extra: &[&str]) -> CliRun {
    let file = file.display().to_string();
    let auth = auth.display().to_string();
    let host = registry.host();
    let mut args = vec![
        "apply",
        "-f",
        &file,
        "--registry-auth-file",
        &auth,
        "--insecure-registry",
        &host,
    ];
    args.extend_from_slice(extra);
    cli.run(&args)
}

/// The stored manifest of `name`, from `podfleet get deployments -o json`.
fn stored(cli: &Podfleet, name: &str) -> Option<Value> {
    let list: Value = serde_json::from_str(&cli.ok(&["get", "deployments", "-o", "json"])).unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|item| item["metadata"]["name"] == name)
        .cloned()
}

fn stored_image(cli: &Podfleet, name: &str) -> String {
    let manifest = stored(cli, name).unwrap_or_else(|| panic!("no fleetdeployment/{name}"));
    manifest["spec"]["score"]["services"][0]["image"]
        .as_str()
        .unwrap_or_else(|| panic!("no image: {manifest:#}"))
        .to_owned()
}

/// The desired score at `<device>.<deployment>`, with its KV revision.
async fn desired(url: &str, key: &str) -> Option<(u64, Value)> {
    let client = async_nats::connect(url).await.unwrap();
    let store = async_nats::jetstream::new(client)
        .get_key_value(DESIRED_BUCKET)
        .await
        .unwrap();
    let entry = store.entry(key).await.unwrap()?;
    let score = serde_json::from_slice(&entry.value).unwrap();
    Some((entry.revision, score))
}

fn running_on(state: &DeploymentState) -> bool {
    state.phase == Phase::Running && !state.container_ids.is_empty()
}

/// A device `id` whose podman pulls from `registry` with its login.
fn device(fleet: &Fleet, registry: &Registry, id: &str) -> Device {
    let podman = PodmanService::start_isolated_with_registries(&[], &registry.registries_conf());
    let auth = registry.auth_file().display().to_string();
    let mut device = Device::on(
        &binaries().agent,
        id,
        &fleet.nats().url(),
        &["--registry-auth-file", &auth],
        podman,
    );
    device.start_agent();
    device
}

/// `podfleet apply` writes `host/podfleet/app:1@sha256:...` into the
/// stored manifest and the device's score; the device pulls and runs that
/// digest. Applying again is `unchanged`; a tag pushed again changes
/// nothing on the device until the next apply, which rolls it out.
#[test]
fn apply_pins_the_tag_and_a_re_pushed_tag_rolls_out_only_when_applied_again() {
    tokio_runtime().block_on(async {
        let registry = Registry::start();
        let first = registry.push(&variant_image("one", 0), "podfleet/app:1");
        let fleet = Fleet::start(&binaries(), &[], &[]);
        let cli = fleet.cli().clone();
        let broker = Broker::connect(&fleet.nats().url(), ConnectOptions::new()).await;
        let dev = unique_prefix("pin");
        let device = device(&fleet, &registry, &dev);
        let dep = "app";
        let key = format!("{dev}.{dep}");
        let tagged = registry.image("podfleet/app:1");
        let file = fleet.dir().join("app.yaml");
        fs::write(&file, manifest(dep, &dev, &tagged)).unwrap();
        let auth = registry.auth_file();

        // A dry run shows the pin and writes nothing.
        let dry = apply(&cli, &file, &auth, &registry, &["--dry-run"]);
        assert_eq!(dry.code(), Some(0), "{dry}");
        assert!(
            dry.stdout
                .contains(&format!("  image   service \"app\": {tagged}@{first}\n")),
            "{dry}"
        );
        assert!(stored(&cli, dep).is_none(), "a dry run wrote the manifest");

        let run = apply(&cli, &file, &auth, &registry, &[]);
        assert_eq!(run.code(), Some(0), "{run}");
        assert_eq!(
            run.stdout,
            format!("fleetdeployment/{dep} created\n"),
            "{run}"
        );
        let pinned = format!("{tagged}@{first}");
        assert_eq!(stored_image(&cli, dep), pinned);
        let (written, score) = eventually!("the controller to write the score", SETTLE, {
            desired(&fleet.nats().url(), &key).await
        });
        assert_eq!(score["services"][0]["image"], pinned.as_str(), "{score:#}");

        let state = broker
            .wait_state(&dev, dep, SETTLE, |s| {
                running_on(s) && s.revision == written
            })
            .await;
        assert_eq!(state.image_digests["app"], first, "{state:#?}");
        let ps = device.containers(dep);
        assert_eq!(running(&ps), reported(&state));
        let container = state.container_ids["app"].clone();
        assert_eq!(device.inspect(&container, "{{.ImageDigest}}"), first);
        let started = device.inspect(&container, "{{.State.StartedAt}}");

        // The same tag, the same digest: nothing to write.
        let run = apply(&cli, &file, &auth, &registry, &[]);
        assert_eq!(
            run.stdout,
            format!("fleetdeployment/{dep} unchanged\n"),
            "{run}"
        );

        // The tag moves in the registry; the device keeps what it runs.
        let second = registry.push(&variant_image("two", 0), "podfleet/app:1");
        assert_ne!(second, first, "the tag moved");
        let uptime = broker.heartbeat(&dev).await.unwrap().uptime_s;
        eventually!("three more ticks", SETTLE, {
            broker
                .heartbeat(&dev)
                .await
                .filter(|h| h.uptime_s >= uptime + 3)
        });
        assert_eq!(
            desired(&fleet.nats().url(), &key).await.map(|(r, _)| r),
            Some(written),
            "the score was not written again"
        );
        assert_eq!(stored_image(&cli, dep), pinned);
        let state = broker.state(&dev, dep).await.unwrap();
        assert_eq!(state.container_ids["app"], container, "{state:#?}");
        assert_eq!(state.image_digests["app"], first);
        assert_eq!(device.inspect(&container, "{{.State.StartedAt}}"), started);
        assert_eq!(device.inspect(&container, "{{.ImageDigest}}"), first);

        // Applying the same file again resolves the moved tag and rolls it out.
        let run = apply(&cli, &file, &auth, &registry, &[]);
        assert_eq!(
            run.stdout,
            format!("fleetdeployment/{dep} configured\n"),
            "{run}"
        );
        let repinned = format!("{tagged}@{second}");
        assert_eq!(stored_image(&cli, dep), repinned);
        let (rewritten, score) = eventually!("the controller to write the new score", SETTLE, {
            desired(&fleet.nats().url(), &key)
                .await
                .filter(|(r, _)| *r != written)
        });
        assert_eq!(
            score["services"][0]["image"],
            repinned.as_str(),
            "{score:#}"
        );
        let state = broker
            .wait_state(&dev, dep, SETTLE, |s| {
                running_on(s) && s.revision == rewritten
            })
            .await;
        assert_eq!(state.image_digests["app"], second, "{state:#?}");
        let new = state.container_ids["app"].clone();
        assert_ne!(new, container);
        assert_eq!(device.inspect(&new, "{{.ImageDigest}}"), second);
        assert_eq!(running(&device.containers(dep)), reported(&state));
        let described = cli.ok(&["describe", "deployment", dep]);
        assert!(described.contains(&repinned), "{described}");
        assert!(!described.contains("Image skew:"), "{described}");
    });
}

/// A login the registry refuses fails its manifest with a typed error
/// naming the manifest, the service and the image, and writes nothing of
/// it; the file's other manifest still applies; the exit code is 1; the
/// password is never printed. `--keep-tags` asks no registry.
#[test]
fn a_refused_login_fails_its_manifest_alone_and_writes_nothing_of_it() {
    let registry = Registry::start();
    registry.push(&variant_image("one", 0), "podfleet/app:1");
    let fleet = Fleet::start(&binaries(), &[], &[]);
    let cli = fleet.cli().clone();
    let tagged = registry.image("podfleet/app:1");
    let wrong = "not-the-registry-password";
    let auth = fleet.dir().join("wrong-auth.json");
    let encoded = base64(format!("{REGISTRY_USER}:{wrong}").as_bytes());
    fs::write(
        &auth,
        format!(
            "{{\"auths\": {{\"{}\": {{\"auth\": \"{encoded}\"}}}}}}",
            registry.host()
        ),
    )
    .unwrap();
    let file = fleet.dir().join("both.yaml");
    fs::write(
        &file,
        format!(
            "{}---\n{}",
            manifest("private", "ghost", &tagged),
            manifest("local", "ghost", TEST_IMAGE)
        ),
    )
    .unwrap();

    let run = apply(&cli, &file, &auth, &registry, &[]);
    assert_eq!(run.code(), Some(1), "{run}");
    assert_eq!(run.stdout, "fleetdeployment/local created\n", "{run}");
    let expected = format!(
        "error: fleetdeployment/private: service \"app\": image {tagged:?}: unauthorized: \
         the registry {} refused the login of user \"{REGISTRY_USER}\"",
        registry.host()
    );
    assert!(run.stderr.starts_with(&expected), "{run}");
    assert!(
        run.stderr
            .contains("nothing of fleetdeployment/private was written"),
        "{run}"
    );
    assert!(
        !run.stderr.contains(wrong),
        "the password was printed: {run}"
    );
    assert!(!run.stderr.contains(REGISTRY_PASSWORD), "{run}");
    assert!(
        stored(&cli, "private").is_none(),
        "fleetdeployment/private was written"
    );
    assert_eq!(stored_image(&cli, "local"), TEST_IMAGE);
    eprintln!("{}", run.stderr.trim_end());

    // --keep-tags writes the tag as given, asking no registry.
    let run = apply(&cli, &file, &auth, &registry, &["--keep-tags"]);
    assert_eq!(run.code(), Some(0), "{run}");
    assert_eq!(
        run.stdout, "fleetdeployment/private created\nfleetdeployment/local unchanged\n",
        "{run}"
    );
    assert_eq!(stored_image(&cli, "private"), tagged);
}

/// A registry not named `--insecure-registry` is asked over HTTPS, and its
/// certificate is checked against the system's trusted roots: unknown to
/// them, the apply fails as a network error naming the certificate; with
/// the test's CA as the roots (`SSL_CERT_FILE`), the tag resolves to the
/// digest podman pushed.
#[test]
fn a_registry_is_asked_over_https_and_its_certificate_is_checked() {
    let registry = TlsRegistry::start();
    let image = format!("127.0.0.1:{}/podfleet/app:1", registry.port);
    let pushed = registry.push(&variant_image("one", 0), &image);
    let fleet = Fleet::start(&binaries(), &[], &[]);
    let cli = fleet.cli().clone();
    let file = fleet.dir().join("tls.yaml");
    fs::write(&file, manifest("tls", "ghost", &image)).unwrap();
    let file = file.display().to_string();
    let dry_run = |roots: Option<&Path>| {
        let mut command = cli.command(&["apply", "-f", &file, "--dry-run"]);
        command
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR");
        if let Some(roots) = roots {
            command.env("SSL_CERT_FILE", roots);
        }
        let output = command.output().unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };

    let (code, stdout, stderr) = dry_run(None);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "image {image:?}: cannot reach the registry 127.0.0.1:{} over HTTPS",
            registry.port
        )) && stderr.contains("certificate"),
        "{stderr}"
    );
    eprintln!("{}", stderr.trim_end());

    let (code, stdout, stderr) = dry_run(Some(&registry.ca()));
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("  image   service \"app\": {image}@{pushed}\n")),
        "{stdout}{stderr}"
    );
}

/// A `docker-registry` serving HTTPS on loopback with a certificate for
/// 127.0.0.1 signed by a CA made for it with `openssl`; no login. Killed
/// on drop.
struct TlsRegistry {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl TlsRegistry {
    fn start() -> Self {
        let registry = program("docker-registry", "docker-registry");
        let openssl = program("openssl", "openssl");
        let dir = tempfile::Builder::new()
            .prefix("podfleet-tls-registry-")
            .tempdir()
            .unwrap();
        let at = |name: &str| dir.path().join(name).display().to_string();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        fs::write(
            dir.path().join("server.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        for args in [
            [
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    &at("ca.key"),
                    "-out",
                    &at("ca.pem"),
                    "-days",
                    "2",
                    "-subj",
                    "/CN=podfleet e2e CA",
                ],
            ]
            .concat(),
            [
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    &at("server.key"),
                    "-out",
                    &at("server.csr"),
                    "-subj",
                    "/CN=127.0.0.1",
                ],
            ]
            .concat(),
            vec![
                "x509",
                "-req",
                "-in",
                &at("server.csr"),
                "-CA",
                &at("ca.pem"),
                "-CAkey",
                &at("ca.key"),
                "-CAcreateserial",
                "-out",
                &at("server.pem"),
                "-days",
                "2",
                "-extfile",
                &at("server.ext"),
            ],
        ] {
            let output = Command::new(&openssl).args(&args).output().unwrap();
            assert!(output.status.success(), "openssl {args:?}: {output:?}");
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        fs::write(
            dir.path().join("config.yml"),
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {}\n    key: {}\n",
                at("storage"),
                at("server.pem"),
                at("server.key"),
            ),
        )
        .unwrap();
        let log = fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(registry)
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut started = Self { child, port, dir };
        eventually_blocking("the TLS registry to accept connections", || {
            if let Ok(Some(status)) = started.child.try_wait() {
                panic!("docker-registry exited with {status}:\n{}", started.log());
            }
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        started
    }

    /// The CA the registry's certificate is signed by.
    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Pushes `local` as `target` (without checking the certificate) and
    /// returns the manifest digest podman pushed.
    fn push(&self, local: &str, target: &str) -> String {
        let digest_file = self.dir.path().join("pushed.digest");
        let output = e2e::podman()
            .args(["push", "--quiet", "--tls-verify=false", "--digestfile"])
            .arg(&digest_file)
            .args([local, target])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "podman push {target}: {output:?}\n{}",
            self.log()
        );
        fs::read_to_string(digest_file).unwrap().trim().to_owned()
    }
}

impl Drop for TlsRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `name` from PATH or /usr/sbin, or a panic naming the Debian package.
fn program(name: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not installed: this test needs it; install it with `apt-get install -y {package}` (or run `cargo xtask provision`)")
        })
}

/// Polls `ready` every 20 ms for up to 15 s.
fn eventually_blocking(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
