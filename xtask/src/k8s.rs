//! A real `kube-apiserver` for the operator's cluster tests, built from
//! Debian's own source package and cached outside the repository.
//!
//! No Debian package ships a kube-apiserver binary, but bookworm's source
//! package `kubernetes` (1.20.2, the whole upstream tree with its vendor/
//! directory) builds one offline. It is fetched with `apt-get source`
//! through a deb-src list of the project's own in the cache (the machine's
//! apt configuration is never touched), unpacked with Debian's patches by
//! dpkg-source, and built as Debian's debian/rules builds it: `make` in
//! GOPATH mode with bookworm's Go 1.19 and `CGO_ENABLED=0`. One change is
//! made to the tree first: the vendored github.com/modern-go/reflect2 1.0.1
//! makes the binary crash on the first custom-resource write under
//! Go >= 1.18, so it is replaced by Debian's 1.0.2
//! (golang-github-modern-go-reflect2-dev).
//!
//! The binary lands in `<cache>/kube-apiserver-1.20.2-<hash>/kube-apiserver`,
//! the hash being that of the recipe; the tree and the Go build cache
//! are removed once it is built. It never runs anything:
//! e2e's `k8s` module starts it beside Debian's etcd.
//!
//! The same module holds the two tasks built on it:
//! - `cargo xtask e2e --k8s`: the cluster tier (docs/e2e.md). It builds
//!   (or reuses) the apiserver, provisions the host as `cargo xtask test`
//!   does, builds the e2e crate's binaries and runs `podfleet-k8s-e2e`
//!   (e2e/src/bin), which starts the cluster, applies deploy/operator and
//!   runs the operator as a process against real agents.
//! - `cargo xtask operator-image`: the operator's container image, FROM
//!   scratch around the release binary and what it links
//!   (deploy/operator/Containerfile), built and tried with podman.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cross::{self, fnv1a64, megabytes, put_in_place, remove_stale_partials, took};
use crate::guest;

/// Bumped whenever the recipe changes in a way the constants below do not
/// show (it is part of the hash that names the build).
const RECIPE_VERSION: u32 = 1;
/// The Kubernetes release the source package holds.
pub const KUBERNETES_VERSION: &str = "1.20.2";
/// The mirror and release the source package comes from.
const MIRROR: &str = "http://deb.debian.org/debian";
const SUITE: &str = "bookworm";
/// The source package, at the exact version the recipe was proven with.
const SOURCE_PACKAGE: &str = "kubernetes";
const SOURCE_VERSION: &str = "1.20.5+really1.20.2-1.1+deb12u1";
/// What the build runs in the unpacked tree, in order.
const MAKE_STEPS: [&[&str]; 2] = [&["generated_files"], &["WHAT=cmd/kube-apiserver"]];
/// Where `make` leaves the binary, in the tree.
const BUILT_BINARY: &str = "_output/bin/kube-apiserver";
/// The vendored copy of reflect2 that is replaced, in the tree.
const VENDORED_REFLECT2: &str = "vendor/github.com/modern-go/reflect2";
/// Debian's reflect2 sources that replace it, and their package.
const DEBIAN_REFLECT2: &str = "/usr/share/gocode/src/github.com/modern-go/reflect2";
const REFLECT2_PACKAGE: &str = "golang-github-modern-go-reflect2-dev";

/// The programs the build needs, with their Debian packages.
const BUILD_NEEDS: [(&str, &str); 6] = [
    ("go", "golang-go"),
    ("make", "make"),
    ("rsync", "rsync"),
    ("jq", "jq"),
    ("dpkg-source", "dpkg-dev"),
    ("apt-get", "apt"),
];
/// What a test cluster runs beside the apiserver (e2e's `k8s` module).
const RUNTIME_NEEDS: [(&str, &str); 2] = [("etcd", "etcd-server"), ("openssl", "openssl")];

/// The task's line in `cargo xtask`'s usage.
pub const USAGE: &str = "  k8s-apiserver kube-apiserver 1.20.2 built from Debian's source package kubernetes and cached in
                PODFLEET_E2E_CACHE (15 to 20 min the first time); installs etcd-server; prints its path:
                PODFLEET_KUBE_APISERVER=$(cargo xtask k8s-apiserver) cargo test -p e2e --test k8s_apiserver -- --ignored
  e2e --k8s     the cluster tier: the operator as a process, with the ServiceAccount and RBAC of
                deploy/operator, against that apiserver, a real nats-server and real agents
  operator-image
                the operator's image FROM scratch (release binary, its libraries, CA bundle,
                nonroot user), built with podman as localhost/podfleet-operator:latest and tried";

/// `cargo xtask k8s-apiserver`: builds (or reuses) the apiserver, makes
/// sure etcd and openssl are installed, and prints the binary's path.
pub fn task(args: &[String]) -> Result<(), String> {
    if let Some(arg) = args.first() {
        return Err(format!(
            "unexpected argument {arg:?}\nusage: cargo xtask k8s-apiserver"
        ));
    }
    crate::install_missing(&RUNTIME_NEEDS, "the Kubernetes cluster tests", false)?;
    let binary = apiserver(&cross::cache())?;
    println!("{}", binary.display());
    Ok(())
}

/// Makes sure `kube-apiserver` 1.20.2, built from Debian's source package,
/// is in `cache`, building it when it is not, and returns its path.
///
/// Installs the build's Debian packages when they are missing (as root).
///
/// # Errors
///
/// If a package cannot be installed, the source cannot be fetched (the
/// mirror may have moved on from [`SOURCE_VERSION`]) or the build fails,
/// with the end of the build log.
pub fn apiserver(cache: &Path) -> Result<PathBuf, String> {
    let name = format!(
        "kube-apiserver-{KUBERNETES_VERSION}-{:016x}",
        fnv1a64(recipe().as_bytes())
    );
    let dir = cache.join(&name);
    let binary = dir.join("kube-apiserver");
    if binary.is_file() {
        eprintln!("xtask: reusing kube-apiserver {}", binary.display());
        return Ok(binary);
    }
    crate::install_missing(&BUILD_NEEDS, "building kube-apiserver", false)?;
    if !Path::new(DEBIAN_REFLECT2).is_dir() {
        crate::apt_install(&[REFLECT2_PACKAGE], "building kube-apiserver", false)?;
    }
    fs::create_dir_all(cache).map_err(|e| format!("could not create {}: {e}", cache.display()))?;
    let cache = cross::absolute(cache)?;
    remove_stale_partials(&cache, &name)?;
    let partial = cache.join(format!("{name}.partial-{}", std::process::id()));
    fs::create_dir_all(&partial)
        .map_err(|e| format!("could not create {}: {e}", partial.display()))?;
    let log = cache.join(format!("{name}.log"));
    fs::write(&log, "").map_err(|e| format!("could not create {}: {e}", log.display()))?;
    eprintln!(
        "xtask: building kube-apiserver {KUBERNETES_VERSION} from Debian's source package {SOURCE_PACKAGE} {SOURCE_VERSION} into {} (15 to 20 min on 2 cores; log: {})",
        dir.display(),
        log.display()
    );
    let start = Instant::now();
    let tree = fetch_source(&partial, &log)?;
    replace_reflect2(&tree, &log)?;
    build(&tree, &partial, &log)?;
    let built = tree.join(BUILT_BINARY);
    let version = Command::new(&built)
        .arg("--version")
        .output()
        .map_err(|e| format!("could not run {}: {e}", built.display()))?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    if version != format!("Kubernetes v{KUBERNETES_VERSION}") {
        return Err(format!(
            "{} --version says {version:?}, not Kubernetes v{KUBERNETES_VERSION} (log: {})",
            built.display(),
            log.display()
        ));
    }
    fs::copy(&built, partial.join("kube-apiserver"))
        .map_err(|e| format!("could not copy {}: {e}", built.display()))?;
    for scratch in ["apt", "source", "home"] {
        let path = partial.join(scratch);
        fs::remove_dir_all(&path)
            .map_err(|e| format!("could not remove {}: {e}", path.display()))?;
    }
    put_in_place(&partial, &dir)?;
    let size = fs::metadata(&binary)
        .map_err(|e| format!("could not stat {}: {e}", binary.display()))?
        .len();
    eprintln!(
        "xtask: kube-apiserver ({version}) built in {}: {} ({})",
        took(start),
        binary.display(),
        megabytes(size)
    );
    Ok(binary)
}

/// All that decides the binary, as hashed into its directory's name.
fn recipe() -> String {
    let mut recipe = format!(
        "{RECIPE_VERSION}\0{MIRROR}\0{SUITE}\0{SOURCE_PACKAGE}\0{SOURCE_VERSION}\0{REFLECT2_PACKAGE}\0{BUILT_BINARY}"
    );
    for step in MAKE_STEPS {
        recipe.push('\0');
        recipe.push_str(&step.join(" "));
    }
    recipe
}

/// The deb-src list `apt-get` reads instead of the machine's.
fn deb_src_list() -> String {
    format!(
        "Types: deb-src\nURIs: {MIRROR}\nSuites: {SUITE}\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
}

/// Downloads the source package with `apt-get source` and unpacks it
/// (Debian's patches applied) into `<partial>/source/kubernetes`, which it
/// returns. apt's lists, cache and sources are all under `<partial>/apt`.
fn fetch_source(partial: &Path, log: &Path) -> Result<PathBuf, String> {
    let start = Instant::now();
    let apt = partial.join("apt");
    let source = partial.join("source");
    for dir in [
        apt.join("lists/partial"),
        apt.join("cache/archives/partial"),
        source.clone(),
    ] {
        fs::create_dir_all(&dir).map_err(|e| format!("could not create {}: {e}", dir.display()))?;
    }
    let list = apt.join("deb-src.sources");
    fs::write(&list, deb_src_list())
        .map_err(|e| format!("could not write {}: {e}", list.display()))?;
    let apt_get = || {
        let mut command = Command::new("apt-get");
        command
            .arg("-o")
            .arg(format!("Dir::Etc::SourceList={}", list.display()))
            .args(["-o", "Dir::Etc::SourceParts=/dev/null"])
            .arg("-o")
            .arg(format!("Dir::State::Lists={}", apt.join("lists").display()))
            .arg("-o")
            .arg(format!("Dir::Cache={}", apt.join("cache").display()))
            // The downloads land in the cache, which apt's sandbox user
            // cannot write to.
            .args(["-o", "APT::Sandbox::User=root"]);
        command
    };
    guest::logged(
        apt_get().args(["update", "-q"]),
        log,
        "apt-get update (the deb-src list in the cache)",
    )?;
    guest::logged(
        apt_get()
            .args(["source", "--download-only", "-q"])
            .arg(format!("{SOURCE_PACKAGE}={SOURCE_VERSION}"))
            .current_dir(&source),
        log,
        &format!(
            "apt-get source {SOURCE_PACKAGE}={SOURCE_VERSION} (has {MIRROR} {SUITE} moved on to a newer version? `apt-cache showsrc {SOURCE_PACKAGE}` with a deb-src line says)"
        ),
    )?;
    let dsc = format!("{SOURCE_PACKAGE}_{}.dsc", SOURCE_VERSION);
    guest::logged(
        Command::new("dpkg-source")
            .args(["-x", &dsc, SOURCE_PACKAGE])
            .current_dir(&source),
        log,
        "dpkg-source -x (Debian package dpkg-dev)",
    )?;
    eprintln!("xtask: source fetched and unpacked in {}", took(start));
    Ok(source.join(SOURCE_PACKAGE))
}

/// Replaces the vendored reflect2 1.0.1 with Debian's copy.
fn replace_reflect2(tree: &Path, log: &Path) -> Result<(), String> {
    let vendored = tree.join(VENDORED_REFLECT2);
    fs::remove_dir_all(&vendored)
        .map_err(|e| format!("could not remove {}: {e}", vendored.display()))?;
    guest::logged(
        Command::new("cp")
            .args(["-rL", DEBIAN_REFLECT2])
            .arg(&vendored),
        log,
        "cp (Debian's reflect2 into vendor/)",
    )?;
    let version = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", REFLECT2_PACKAGE])
        .output()
        .map_or_else(
            |_| "?".to_owned(),
            |o| String::from_utf8_lossy(&o.stdout).into_owned(),
        );
    eprintln!(
        "xtask: {VENDORED_REFLECT2} replaced by {DEBIAN_REFLECT2} ({REFLECT2_PACKAGE} {version})"
    );
    Ok(())
}

/// Runs the [`MAKE_STEPS`] in `tree` as debian/rules does (GOPATH mode,
/// which the tree's hack/lib sets up under `_output`, no cgo), with a home
/// of its own so that nothing lands in the user's.
fn build(tree: &Path, partial: &Path, log: &Path) -> Result<(), String> {
    let home = partial.join("home");
    fs::create_dir_all(&home).map_err(|e| format!("could not create {}: {e}", home.display()))?;
    let go = Command::new("go").arg("version").output().map_or_else(
        |_| "go".to_owned(),
        |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
    );
    for step in MAKE_STEPS {
        let start = Instant::now();
        eprintln!("xtask: make {} ({go})", step.join(" "));
        guest::logged(
            Command::new("make")
                .args(step)
                .current_dir(tree)
                .env("HOME", &home)
                .env("CGO_ENABLED", "0")
                .env("GO111MODULE", "off")
                .env_remove("GOFLAGS")
                .env_remove("GOPATH")
                .env_remove("GOCACHE"),
            log,
            &format!("make {}", step.join(" ")),
        )?;
        eprintln!("xtask: make {} took {}", step.join(" "), took(start));
    }
    Ok(())
}

/// The binaries the cluster tier runs, all built inside the e2e crate.
const CLUSTER_BINARIES: [&str; 3] = [
    "podfleet-k8s-e2e",
    "podfleet-agent-e2e",
    "podfleet-operator-e2e",
];
/// The oldest kubectl the cluster tier's commands work with
/// (`--subresource`); Debian's kubernetes-client is 1.20.
const KUBECTL_MINOR: u32 = 24;

/// `cargo xtask e2e --k8s`: builds (or reuses) the apiserver, provisions
/// the host, builds the scenarios and runs them; they print a timing table
/// that includes these steps.
pub fn e2e(args: &[String], workspace: &Path) -> Result<(), String> {
    if let Some(other) = args.iter().find(|a| *a != "--k8s") {
        return Err(format!(
            "unexpected argument {other:?} (--k8s takes no other)\nusage: cargo xtask e2e --k8s"
        ));
    }
    let mut timings: Vec<(&str, Duration)> = Vec::new();

    let start = Instant::now();
    eprintln!("xtask: provisioning the host (podman, runc, nats-server, busybox-static, etcd-server, openssl, kubectl)");
    crate::provision()?;
    crate::install_missing(&RUNTIME_NEEDS, "the Kubernetes cluster tier", false)?;
    kubectl_check()?;
    timings.push(("provision host", start.elapsed()));

    let start = Instant::now();
    let apiserver = apiserver(&cross::cache())?;
    timings.push(("kube-apiserver build", start.elapsed()));

    let start = Instant::now();
    let mut build = vec!["build", "--quiet", "-p", "e2e"];
    for binary in CLUSTER_BINARIES {
        build.extend(["--bin", binary]);
    }
    eprintln!(
        "xtask: building the scenarios, the agent and the operator (cargo build -p e2e: {})",
        CLUSTER_BINARIES.join(", ")
    );
    crate::cargo(&build, &[])?;
    timings.push(("scenarios build", start.elapsed()));

    let target = target_dir(workspace);
    let work = target.join("k8s-e2e");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(|e| format!("could not create {}: {e}", work.display()))?;
    let mut scenarios = Command::new(target.join("debug").join(CLUSTER_BINARIES[0]));
    scenarios
        .env("PODFLEET_KUBE_APISERVER", &apiserver)
        .arg("--work")
        .arg(&work);
    for (name, took) in &timings {
        scenarios
            .arg("--timing")
            .arg(format!("{name}={:.1}", took.as_secs_f64()));
    }
    eprintln!(
        "xtask: running {} (PODFLEET_KUBE_APISERVER={})",
        CLUSTER_BINARIES[0],
        apiserver.display()
    );
    crate::run(&mut scenarios)
        .map_err(|e| format!("{e}\nthe operators' logs are in {}", work.display()))
}

/// Fails, saying where to get one, unless a kubectl of
/// [`KUBECTL_MINOR`] or later is on PATH.
fn kubectl_check() -> Result<(), String> {
    let how = format!("the cluster tier drives the apiserver with kubectl 1.{KUBECTL_MINOR} or later (Debian's kubernetes-client is 1.20 and lacks --subresource): install one from https://dl.k8s.io onto PATH");
    let output = Command::new("kubectl")
        .args(["version", "--client", "-o", "json"])
        .output()
        .map_err(|e| format!("cannot run kubectl ({e}): {how}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    match kubectl_minor(&text) {
        Some(minor) if minor >= KUBECTL_MINOR => Ok(()),
        Some(minor) => Err(format!("kubectl is 1.{minor}: {how}")),
        None => Err(format!(
            "`kubectl version --client -o json` said {:?}: {how}",
            text.trim()
        )),
    }
}

/// The minor version in `kubectl version --client -o json`'s output
/// (`"minor": "32"`, or `"32+"` for vendors' builds).
fn kubectl_minor(json: &str) -> Option<u32> {
    let client = &json[json.find("\"clientVersion\"")?..];
    let after = &client[client.find("\"minor\"")? + "\"minor\"".len()..];
    let value = after
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let digits: String = value.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn target_dir(workspace: &Path) -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from)
}

/// The operator image's name.
pub const OPERATOR_IMAGE: &str = "localhost/podfleet-operator:latest";
/// Where the image's entrypoint is, in the image.
const OPERATOR_PATH: &str = "usr/local/bin/podfleet-operator";
/// The CA bundle copied from the host (Debian package ca-certificates).
const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";
/// The image's only user besides root.
const NONROOT: u32 = 65532;

/// `cargo xtask operator-image`: the release binary, a root file system
/// around it, `podman build` of deploy/operator/Containerfile, and two runs
/// of the image to prove it starts.
pub fn operator_image(args: &[String], workspace: &Path) -> Result<(), String> {
    if let Some(arg) = args.first() {
        return Err(format!(
            "unexpected argument {arg:?}\nusage: cargo xtask operator-image"
        ));
    }
    crate::install_missing(
        &[("podman", "podman"), ("runc", "runc")],
        "the image build",
        false,
    )?;
    let ldd = cross::find_program("ldd").ok_or("ldd is missing: install Debian's libc-bin")?;
    let start = Instant::now();
    eprintln!(
        "xtask: building podfleet-operator (cargo build --release --locked -p podfleet-operator)"
    );
    crate::cargo(
        &["build", "--release", "--locked", "-p", "podfleet-operator"],
        &[],
    )?;
    let binary = target_dir(workspace)
        .join("release")
        .join("podfleet-operator");
    eprintln!("xtask: built in {}", took(start));

    let context = target_dir(workspace).join("operator-image");
    let root = context.join("root");
    if context.exists() {
        fs::remove_dir_all(&context)
            .map_err(|e| format!("could not remove {}: {e}", context.display()))?;
    }
    install_file(&binary, &root.join(OPERATOR_PATH))?;
    let listed = Command::new(&ldd)
        .arg(&binary)
        .output()
        .map_err(|e| format!("could not run ldd: {e}"))?;
    let libraries = ldd_paths(&String::from_utf8_lossy(&listed.stdout))?;
    for library in &libraries {
        install_file(
            library,
            &root.join(library.strip_prefix("/").unwrap_or(library)),
        )?;
    }
    let ca = Path::new("/").join(CA_BUNDLE);
    if !ca.is_file() {
        return Err(format!(
            "{} is missing: install Debian's ca-certificates",
            ca.display()
        ));
    }
    install_file(&ca, &root.join(CA_BUNDLE))?;
    let etc = root.join("etc");
    for (name, text) in [
        (
            "passwd",
            format!("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{NONROOT}:{NONROOT}:nonroot:/nonexistent:/sbin/nologin\n"),
        ),
        ("group", format!("root:x:0:\nnonroot:x:{NONROOT}:\n")),
        // glibc's resolver, for the NATS servers' names.
        ("nsswitch.conf", "hosts: files dns\n".to_owned()),
    ] {
        fs::write(etc.join(name), text)
            .map_err(|e| format!("could not write {}: {e}", etc.join(name).display()))?;
    }
    eprintln!(
        "xtask: root file system in {}: the binary, {} ({})",
        root.display(),
        libraries
            .iter()
            .map(|l| l.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        CA_BUNDLE
    );

    let conf = workspace.join("e2e").join("containers.conf");
    let podman = || {
        let mut command = Command::new("podman");
        command.env("CONTAINERS_CONF", &conf);
        command
    };
    let containerfile = workspace.join("deploy/operator/Containerfile");
    eprintln!(
        "xtask: podman build --file {} --tag {OPERATOR_IMAGE}",
        containerfile.display()
    );
    crate::run(
        podman()
            .args(["build", "--quiet", "--pull=never", "--file"])
            .arg(&containerfile)
            .args(["--tag", OPERATOR_IMAGE])
            .arg(&context)
            .stdout(std::io::stderr()),
    )?;

    let run_image = |args: &[&str]| -> Result<String, String> {
        let output = podman()
            .args(["run", "--rm", "--network=none", OPERATOR_IMAGE])
            .args(args)
            .output()
            .map_err(|e| format!("could not run podman: {e}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!(
                "podman run {OPERATOR_IMAGE} {} failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    };
    let version = run_image(&["--version"])?;
    eprintln!(
        "xtask: podman run --rm {OPERATOR_IMAGE} --version: {}",
        version.trim()
    );
    let crds = run_image(&["crds"])?;
    if !crds.contains("kind: CustomResourceDefinition") {
        return Err(format!(
            "podman run {OPERATOR_IMAGE} crds printed no CRD:\n{crds}"
        ));
    }
    eprintln!("xtask: podman run --rm {OPERATOR_IMAGE} crds | head -n 6:");
    for line in crds.lines().take(6) {
        eprintln!("  {line}");
    }
    let user = podman()
        .args([
            "image",
            "inspect",
            "--format",
            "{{.Config.User}} {{.Size}}",
            OPERATOR_IMAGE,
        ])
        .output()
        .map_err(|e| format!("could not run podman: {e}"))?;
    let inspected = String::from_utf8_lossy(&user.stdout);
    let (user, size) = inspected.trim().split_once(' ').unwrap_or(("?", "0"));
    eprintln!(
        "xtask: {OPERATOR_IMAGE}: {} (user {user}), made in {}",
        megabytes(size.parse().unwrap_or(0)),
        took(start)
    );
    println!("{OPERATOR_IMAGE}");
    Ok(())
}

/// The files `ldd` lists: each shared library's path and the dynamic
/// loader's, in order (the vDSO has none).
///
/// # Errors
///
/// When a library is not found.
fn ldd_paths(ldd: &str) -> Result<Vec<PathBuf>, String> {
    let mut paths = Vec::new();
    for line in ldd.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not found") {
            return Err(format!("ldd: {line}"));
        }
        let path = match line.split_once(" => ") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            paths.push(PathBuf::from(path));
        }
    }
    Ok(paths)
}

/// Copies `from` (following symbolic links) to `to`, making its directory.
fn install_file(from: &Path, to: &Path) -> Result<(), String> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("could not create {}: {e}", dir.display()))?;
    }
    fs::copy(from, to)
        .map(drop)
        .map_err(|e| format!("could not copy {} to {}: {e}", from.display(), to.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recipe_pins_the_source_and_names_the_reflect2_fix() {
        let recipe = recipe();
        assert!(recipe.contains(SOURCE_VERSION), "{recipe:?}");
        assert!(recipe.contains(REFLECT2_PACKAGE), "{recipe:?}");
        assert!(SOURCE_VERSION.contains(KUBERNETES_VERSION));
    }

    #[test]
    fn the_deb_src_list_is_bookworms_main() {
        let list = deb_src_list();
        assert!(list.starts_with("Types: deb-src\n"), "{list}");
        assert!(list.contains("Suites: bookworm\n"), "{list}");
        assert!(list.contains(MIRROR), "{list}");
    }

    #[test]
    fn ldd_lists_libraries_and_the_loader_but_not_the_vdso() {
        let listed = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            ldd_paths(listed).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(ldd_paths("\tlibfoo.so.1 => not found\n")
            .unwrap_err()
            .contains("libfoo"));
    }

    #[test]
    fn the_kubectl_minor_is_read_from_its_json() {
        let json = r#"{"clientVersion": {"major": "1", "minor": "32+", "gitVersion": "v1.32.4"}, "kustomizeVersion": "v5.5.0"}"#;
        assert_eq!(kubectl_minor(json), Some(32));
        assert_eq!(
            kubectl_minor(r#"{"clientVersion":{"minor":"20"}}"#),
            Some(20)
        );
        assert_eq!(kubectl_minor("error"), None);
    }
}
