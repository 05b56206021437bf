//! The podman adapter: [`PodmanRuntime`] executes the reconciler's runtime
//! operations over podman's Docker-compatible API socket. A Docker engine's
//! socket works too.
//!
//! This module owns the translation between podfleet's runtime vocabulary
//! ([`RuntimeOp`], [`RuntimeReply`], [`RuntimeError`]) and the Docker API, and
//! the mapping of API failures onto [`RuntimeErrorKind`]s. It never decides
//! anything: it pulls an image only when the reconciler asks
//! ([`RuntimeOp::Pull`]), never restarts a container by itself (every
//! container is created with restart policy "no") and never retries an
//! operation the reconciler asked for, except to read a state that podman has
//! not finished recording. Registry passwords, and the `X-Registry-Auth`
//! header that carries them, never reach a log line or an error message.
//!
//! # Podman 4.3 behaviours absorbed here
//!
//! - A name conflict on create is HTTP 500 "... that name is already in use"
//!   (Docker answers 409); both are [`RuntimeErrorKind::NameConflict`]. A
//!   missing image is 404 "no such image" on create; elsewhere 404 means no
//!   such container.
//! - List and inspect report libpod states bollard's typed models reject:
//!   `"stopped"` (exited, cleanup pending: seen in list and inspect for a few
//!   milliseconds after most exits) and `"stopping"` in inspect. So those two
//!   reads are plain HTTP/1.0 GETs decoded into this module's own lenient
//!   types, sharing the API version bollard negotiated.
//! - `stop` of a container that is not running answers 304, which bollard
//!   reports as success, so [`RuntimeOp::Stop`] inspects first.
//! - `wait` on a never-started container returns at once (status -1), and a
//!   force remove ends a pending `wait` with status 0 and the message
//!   "container has already been removed".
//! - `POST /images/create` answers 200 at once and reports a failed pull as
//!   the last line of its progress stream (`{"errorDetail": {"message":
//!   ...}, "error": ...}`); only a malformed reference gets an error status.
//!   It reads `X-Registry-Auth` as base64url, as Docker defines it.
//! - `GET /images/{name}/json` resolves a short name to a local image
//!   first (`app:1` finds `localhost/app:1`), and lists a digest in
//!   `RepoDigests` for locally built images too.
//! - `PUT /containers/{id}/archive` writes into a created, running or
//!   exited container, creating missing parent directories (root, 0755);
//!   a directory entry in the archive would reset an existing directory's
//!   mode, so [`RuntimeOp::CopyFile`] sends the file's entry alone.
//! - An exec created without `AttachStdin` reads `/dev/null`. Creating one
//!   in a container that is not running is refused with 500 "container
//!   state improper" (Docker answers 409). An exec of a program that does
//!   not exist starts, writes runc's complaint to stderr and exits 127.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::errors::Error as ApiError;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ExecConfig, HostConfig, Mount, MountType, PortBinding, RestartPolicy,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveImageOptionsBuilder, StartContainerOptions, StopContainerOptionsBuilder,
    UploadToContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use bollard::{ClientVersion, Docker};
use futures_util::StreamExt;
use podfleet_core::runtime::{
    ContainerSpec, ContainerState, ContainerStatus, ContainerSummary, DiskUsage, ImageInfo,
    ImageSummary, PullProgress, RuntimeError, RuntimeErrorKind, RuntimeOp, RuntimeReply,
    RuntimeResult, StopOutcome, EXEC_OUTPUT_MAX_BYTES, LABEL_MANAGED,
};
use podfleet_core::wire::text::bounded_tail_of;
use podfleet_core::wire::{PortMapping, Protocol, PullFailure, VolumeMount};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::runtime::{ContainerRuntime, ExecOutput, LogsOutput};

mod archive;
mod http;
mod pull;
mod registry;

use http::{get, percent_encode, post_streaming};
use pull::{pull_failure, PullMessage, PullsUnderWay};
use registry::{ImageReference, RegistryAuthHeader};

pub use registry::{LoginSource, RegistryAuth, RegistryLogin, DEFAULT_REGISTRY};

/// Where a rootful podman serves its API when `podman.socket` is enabled.
pub const DEFAULT_SOCKET: &str = "/run/podman/podman.sock";

/// How long an ordinary API call may take before the runtime counts as
/// unavailable. `wait` is not bounded by it (podman sends its headers at
/// once and the answer when the container stops), `stop` gets its grace on
/// top, the `exec` command has its own timeout, and the output of
/// [`RuntimeOp::Exec`] is not bounded in time (the core keeps its deadline).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The exit status of a process ended by SIGKILL (128 + 9).
const KILLED_EXIT_CODE: i64 = 137;

/// How often, and how far apart, a state podman has not finished recording
/// is read again: the status after `stop`, an exec's exit code.
const SETTLE_ATTEMPTS: u32 = 20;
const SETTLE_INTERVAL: Duration = Duration::from_millis(25);

/// A [`ContainerRuntime`] backed by podman (or Docker) through its
/// Docker-compatible API on a unix socket.
///
/// Cloning is cheap and clones share the connection settings; every call
/// opens its own connection, as bollard does for unix sockets.
///
/// # Guarantees
///
/// - [`RuntimeOp::List`] is one API call returning ids, names, states and
///   labels of every container labelled `io.podfleet.managed=true`, in any
///   state.
/// - Images are pulled only by [`RuntimeOp::Pull`], with the login of the
///   image's registry ([`with_registry_auth`](Self::with_registry_auth)),
///   and inspected only by [`RuntimeOp::InspectImage`], which never touches
///   the network. Creating a container never pulls: a missing image is
///   [`RuntimeErrorKind::ImageMissing`].
/// - A pull is not bounded by the request timeout (only reaching podman
///   and its first answer are): it runs until podman ends it, the
///   connection breaks ([`PullFailure::Network`]), or the caller drops it.
///   Its failures are [`RuntimeErrorKind::Pull`]; its progress can be read
///   meanwhile ([`pull_progress`](Self::pull_progress)).
/// - [`RuntimeOp::CopyFile`] refuses a path that is not a plain absolute
///   one before contacting podman, and writes the file alone, root-owned:
///   existing directories keep their modes.
/// - [`RuntimeOp::Exec`] runs with stdin from `/dev/null`, for as long as
///   the process runs (the core keeps the deadline), and holds only the
///   end of its output while it streams.
/// - Registry passwords never appear in a log line, an error or `Debug`.
/// - Socket and transport failures are [`RuntimeErrorKind::Unavailable`].
#[derive(Debug, Clone)]
pub struct PodmanRuntime {
    docker: Docker,
    socket: PathBuf,
    /// `/v1.41` on podman 4.3: the version bollard negotiated.
    api_prefix: String,
    request_timeout: Duration,
    registry_auth: RegistryAuth,
    pulls: PullsUnderWay,
}

impl PodmanRuntime {
    /// Connects to the API socket at `socket` and negotiates the API version
    /// (podman 4.3 speaks 1.41; a recent Docker refuses versions that old,
    /// so none is fixed here).
    ///
    /// The version comes from the `Api-Version` header of `GET /_ping`,
    /// which podman and Docker both send and answer at once; only a server
    /// without that header is asked `GET /version`, which podman answers
    /// only after running its OCI runtime and conmon to learn their
    /// versions (about a second on a Raspberry-Pi class device).
    ///
    /// # Errors
    ///
    /// [`RuntimeErrorKind::Unavailable`] when the socket is absent or does
    /// not answer (podman not up yet: connect again later);
    /// [`RuntimeErrorKind::Other`] when the path is not UTF-8 or the answer
    /// is not an API version.
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Self, RuntimeError> {
        let socket = socket.as_ref().to_path_buf();
        let path = socket.to_str().ok_or_else(|| {
            RuntimeError::new(
                RuntimeErrorKind::Other,
                format!("the API socket path {} is not UTF-8", socket.display()),
            )
        })?;
        // Not bollard's negotiation: it asks `/v1.53/version`, which a Docker
        // engine with an older API refuses ("client version is too new").
        // The unversioned paths work everywhere.
        let ping = get(&socket, "/_ping", DEFAULT_REQUEST_TIMEOUT).await?;
        if !(200..300).contains(&ping.status) {
            return Err(status_error(
                ping.status,
                error_message(&ping.body),
                Call::System,
            ));
        }
        let api_version = match ping.header("api-version") {
            Some(version) => version.to_owned(),
            None => {
                let server: VersionAnswer =
                    get_json(&socket, "/version", DEFAULT_REQUEST_TIMEOUT, Call::System).await?;
                server.api_version
            }
        };
        let version = client_version(&api_version).ok_or_else(|| {
            RuntimeError::new(
                RuntimeErrorKind::Other,
                format!("unreadable API version \"{api_version}\""),
            )
        })?;
        let docker = Docker::connect_with_unix(path, DEFAULT_REQUEST_TIMEOUT.as_secs(), &version)
            .map_err(|e| api_error(e, Call::System))?;
        let api_prefix = format!("/v{}", docker.client_version());
        Ok(Self {
            docker,
            socket,
            api_prefix,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            registry_auth: RegistryAuth::new(),
            pulls: PullsUnderWay::default(),
        })
    }

    /// Pulls with these registry logins (by default, anonymously).
    #[must_use]
    pub fn with_registry_auth(mut self, auth: RegistryAuth) -> Self {
        self.registry_auth = auth;
        self
    }

    /// Bounds ordinary API calls by `timeout` instead of
    /// [`DEFAULT_REQUEST_TIMEOUT`].
    #[must_use]
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.docker = self.docker.with_timeout(timeout);
        self.request_timeout = timeout;
        self
    }

    /// The socket this runtime talks to.
    #[must_use]
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The negotiated API version, e.g. `"1.41"`.
    #[must_use]
    pub fn api_version(&self) -> &str {
        self.api_prefix.trim_start_matches("/v")
    }

    async fn list(&self) -> RuntimeResult {
        let filters = format!(r#"{{"label":["{LABEL_MANAGED}=true"]}}"#);
        let path = format!(
            "/containers/json?all=true&filters={}",
            percent_encode(&filters)
        );
        let listed: Vec<ListedContainer> = self.read_json(&path, Call::System).await?;
        let containers = listed
            .into_iter()
            .map(|c| ContainerSummary {
                name: c
                    .names
                    .first()
                    .map(|n| n.trim_start_matches('/').to_owned())
                    .unwrap_or_default(),
                id: c.id,
                state: container_state(&c.state),
                labels: c.labels.unwrap_or_default(),
            })
            .collect();
        Ok(RuntimeReply::Listed { containers })
    }

    async fn create(&self, spec: &ContainerSpec) -> RuntimeResult {
        let options = CreateContainerOptionsBuilder::new()
            .name(&spec.name)
            .build();
        let created = self
            .docker
            .create_container(Some(options), create_body(spec))
            .await
            .map_err(|e| api_error(e, Call::Create))?;
        Ok(RuntimeReply::Created { id: created.id })
    }

    async fn start(&self, container: &str) -> RuntimeResult {
        self.docker
            .start_container(container, None::<StartContainerOptions>)
            .await
            .map_err(|e| api_error(e, Call::Container))?;
        Ok(RuntimeReply::Started)
    }

    async fn wait(&self, container: &str) -> RuntimeResult {
        let options = WaitContainerOptionsBuilder::new()
            .condition("not-running")
            .build();
        let mut answers = pin!(self.docker.wait_container(container, Some(options)));
        match answers.next().await {
            // bollard turns a non-zero exit status into an error; it is an answer all the same.
            Some(Ok(_)) | Some(Err(ApiError::DockerContainerWaitError { .. })) => {
                Ok(RuntimeReply::Waited)
            }
            Some(Err(e)) => Err(api_error(e, Call::Container)),
            None => Err(RuntimeError::new(
                RuntimeErrorKind::Other,
                format!("wait for {container} ended without an answer"),
            )),
        }
    }

    async fn inspect(&self, container: &str) -> Result<Inspected, RuntimeError> {
        let path = format!("/containers/{}/json", percent_encode(container));
        let answer: InspectAnswer = self.read_json(&path, Call::Container).await?;
        let state = container_state(&answer.state.status);
        Ok(Inspected {
            status: ContainerStatus {
                id: answer.id,
                state,
                exit_code: if state == ContainerState::Exited {
                    answer.state.exit_code
                } else {
                    None
                },
                image_id: answer.image.filter(|i| !i.is_empty()),
            },
            oom_killed: answer.state.oom_killed,
        })
    }

    async fn stop(&self, container: &str, grace: Duration) -> RuntimeResult {
        let before = self.inspect(container).await?;
        if !matches!(
            before.status.state,
            ContainerState::Running | ContainerState::Paused | ContainerState::Stopping
        ) {
            return Ok(RuntimeReply::Stopped {
                outcome: StopOutcome::AlreadyStopped,
            });
        }
        let seconds = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        let options = StopContainerOptionsBuilder::new()
            .t(i32::try_from(seconds).unwrap_or(i32::MAX))
            .build();
        // The stop signal was baked in at create; podman sends it, waits `t`
        // seconds, then kills. The answer comes only after that.
        self.docker
            .clone()
            .with_timeout(self.request_timeout.saturating_add(grace))
            .stop_container(container, Some(options))
            .await
            .map_err(|e| api_error(e, Call::Container))?;
        // A container that exited by itself since the inspect gets a 304 and
        // is judged by its own exit code below.
        let after = self.settled(container).await?;
        // 137 is also what SIGKILL as the stop signal leaves: that stop was a
        // kill too, as the core's fake says.
        let killed = after.oom_killed || after.status.exit_code == Some(KILLED_EXIT_CODE);
        Ok(RuntimeReply::Stopped {
            outcome: if killed {
                StopOutcome::Killed
            } else {
                StopOutcome::Graceful
            },
        })
    }

    /// Inspects a container that should have exited until podman agrees.
    async fn settled(&self, container: &str) -> Result<Inspected, RuntimeError> {
        let mut last = self.inspect(container).await?;
        for _ in 1..SETTLE_ATTEMPTS {
            if last.status.exit_code.is_some() {
                break;
            }
            tokio::time::sleep(SETTLE_INTERVAL).await;
            last = self.inspect(container).await?;
        }
        if last.status.exit_code.is_none() {
            return Err(RuntimeError::new(
                RuntimeErrorKind::Other,
                format!(
                    "stop of {container} returned but it is still {}",
                    last.status.state
                ),
            ));
        }
        Ok(last)
    }

    async fn remove(&self, container: &str, force: bool) -> RuntimeResult {
        let options = RemoveContainerOptionsBuilder::new()
            .force(force)
            .v(true)
            .build();
        self.docker
            .remove_container(container, Some(options))
            .await
            .map_err(|e| api_error(e, Call::Container))?;
        Ok(RuntimeReply::Removed)
    }

    /// Every image in the store (`GET /images/json`), and how full the
    /// filesystem of podman's graph root is.
    async fn list_images(&self) -> RuntimeResult {
        let listed: Vec<ImageListAnswer> = self.read_json("/images/json", Call::System).await?;
        let images = listed
            .into_iter()
            .map(|image| ImageSummary {
                names: image
                    .repo_tags
                    .into_iter()
                    .chain(image.repo_digests)
                    // podman shows an untagged image as `<none>:<none>`.
                    .filter(|name| !name.starts_with("<none>"))
                    .collect(),
                id: image.id,
                size: u64::try_from(image.size).unwrap_or(0),
                created: image.created,
                containers: u32::try_from(image.containers).unwrap_or(0),
            })
            .collect();
        let info: InfoAnswer = self.read_json("/info", Call::System).await?;
        let disk = match rustix::fs::statvfs(info.docker_root_dir.as_str()) {
            Ok(fs) => Some(DiskUsage {
                used: fs
                    .f_blocks
                    .saturating_sub(fs.f_bfree)
                    .saturating_mul(fs.f_frsize),
                total: fs.f_blocks.saturating_mul(fs.f_frsize),
            }),
            Err(error) => {
                tracing::warn!(root = info.docker_root_dir, %error, "cannot read the image store's disk usage");
                None
            }
        };
        Ok(RuntimeReply::ImagesListed { images, disk })
    }

    /// Removes one image by id, never forced: podman refuses with 409 when
    /// a container uses it.
    async fn remove_image(&self, id: &str) -> RuntimeResult {
        let options = RemoveImageOptionsBuilder::new().force(false).build();
        self.docker
            .remove_image(id, Some(options), None)
            .await
            .map_err(|e| api_error(e, Call::RemoveImage))?;
        Ok(RuntimeReply::ImageRemoved)
    }

    /// Looks `image` up in the local store: `None` on a 404.
    async fn inspect_image(
        &self,
        image: &str,
        reference: &ImageReference,
    ) -> Result<Option<ImageInfo>, RuntimeError> {
        let path = format!("/images/{}/json", encode_image_name(image));
        let answer: ImageInspectAnswer = match self.read_json(&path, Call::Image).await {
            Ok(answer) => answer,
            Err(e) if e.kind == RuntimeErrorKind::ImageMissing => return Ok(None),
            Err(e) => return Err(e),
        };
        let digest = reference
            .digest()
            .or_else(|| reference.digest_among(&answer.repo_digests))
            .map(str::to_owned);
        Ok(Some(ImageInfo {
            id: answer.id,
            digest,
        }))
    }

    /// Pulls `image` through `POST /images/create`, reading podman's
    /// progress stream to its end, then inspects what arrived.
    async fn pull(&self, image: &str) -> RuntimeResult {
        let failed =
            |failure, message: String| RuntimeError::new(RuntimeErrorKind::Pull(failure), message);
        let reference =
            ImageReference::parse(image).map_err(|why| failed(PullFailure::Other, why))?;
        let path = format!(
            "{}/images/create?fromImage={}&tag={}",
            self.api_prefix,
            percent_encode(&reference.repository()),
            percent_encode(reference.tag_or_digest()),
        );
        let login = self.registry_auth.login_for(&reference);
        tracing::debug!(
            image,
            registry = reference.host(),
            login = login.map(|(key, _)| key),
            "pulling"
        );
        let header = login.map(|(_, login)| RegistryAuthHeader::new(login, reference.host()));
        let headers: Vec<(&str, &str)> = header
            .iter()
            .map(|header| ("X-Registry-Auth", header.value()))
            .collect();
        let mut response =
            post_streaming(&self.socket, &path, &headers, self.request_timeout).await?;
        let broke_off = |e: std::io::Error| {
            failed(
                PullFailure::Network,
                format!("the connection to podman broke off while pulling {image}: {e}"),
            )
        };
        if !(200..300).contains(&response.status) {
            let status = response.status;
            let message = error_message(&response.rest().await.map_err(broke_off)?);
            return Err(failed(pull_failure(Some(status), &message), message));
        }
        let mut tracker = self.pulls.track(image);
        while let Some(line) = response.next_line().await.map_err(broke_off)? {
            // A line that is not a JSON message is no news about the pull.
            let Ok(message) = serde_json::from_slice::<PullMessage>(&line) else {
                continue;
            };
            if let Some(error) = message.error() {
                return Err(failed(pull_failure(None, error), error.to_owned()));
            }
            tracker.record(&message);
        }
        drop(tracker);
        let pulled = match self.inspect_image(&reference.canonical(), &reference).await {
            Ok(pulled) => pulled,
            // podman went away as the stream ended.
            Err(e) if e.kind == RuntimeErrorKind::Unavailable => {
                return Err(failed(
                    PullFailure::Network,
                    format!(
                        "podman's answer to the pull of {image} ended early; then {}",
                        e.message
                    ),
                ))
            }
            Err(e) => return Err(e),
        };
        match pulled {
            Some(image) => Ok(RuntimeReply::Pulled { image }),
            None => Err(failed(
                PullFailure::Network,
                format!(
                    "podman's answer to the pull of {image} ended without an error, \
                     but the image is not in the store"
                ),
            )),
        }
    }

    /// GETs `path` below the negotiated version prefix and decodes the
    /// JSON answer.
    ///
    /// This bypasses bollard on purpose: its typed state enums reject
    /// podman's `"stopped"`, which would fail a whole liveness tick.
    async fn read_json<T: DeserializeOwned>(
        &self,
        path: &str,
        call: Call,
    ) -> Result<T, RuntimeError> {
        let path = format!("{}{path}", self.api_prefix);
        get_json(&self.socket, &path, self.request_timeout, call).await
    }

    /// Writes `content` into `container` as the file `path` with `mode`,
    /// owned by root: [`RuntimeOp::CopyFile`].
    async fn copy_file(
        &self,
        container: &str,
        path: &str,
        content: &str,
        mode: u32,
    ) -> RuntimeResult {
        let mtime = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let archive = archive::single_file(path, content.as_bytes(), mode, mtime)?;
        let options = UploadToContainerOptionsBuilder::new().path("/").build();
        self.docker
            .upload_to_container(container, Some(options), bollard::body_full(archive.into()))
            .await
            .map_err(|e| api_error(e, Call::Container))?;
        Ok(RuntimeReply::FileCopied)
    }

    /// Runs `argv` in `container` until it exits, keeping the end of its
    /// output: [`RuntimeOp::Exec`]. No timeout: the core keeps the deadline.
    async fn exec_to_exit(&self, container: &str, argv: &[String]) -> RuntimeResult {
        let exec_id = self.create_exec(container, argv).await?;
        let mut output = NewestBytes::new(EXEC_OUTPUT_MAX_BYTES);
        self.stream_exec(&exec_id, |chunk| match chunk {
            LogOutput::StdIn { .. } => {}
            chunk => output.push(chunk.as_ref()),
        })
        .await?;
        let exit_code = self.exec_exit_code(&exec_id).await?.ok_or_else(|| {
            RuntimeError::new(
                RuntimeErrorKind::Other,
                format!(
                    "the output of an exec in {container} ended, but podman still says it runs"
                ),
            )
        })?;
        Ok(RuntimeReply::Executed {
            exit_code,
            output: output.finish_as_bounded_tail(),
        })
    }

    /// Creates an exec of `argv` in `container` with stdout and stderr
    /// attached and stdin not, so that the process reads end of file
    /// (podman gives it `/dev/null`).
    async fn create_exec(&self, container: &str, argv: &[String]) -> Result<String, RuntimeError> {
        let config = ExecConfig {
            attach_stdin: Some(false),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            cmd: Some(argv.to_vec()),
            ..ExecConfig::default()
        };
        let created = self
            .docker
            .create_exec(container, config)
            .await
            .map_err(|e| api_error(e, Call::Container))?;
        Ok(created.id)
    }

    /// Starts the exec `exec_id` and hands `sink` each chunk of its output
    /// as it comes, until the process closes its output (it exits).
    async fn stream_exec(
        &self,
        exec_id: &str,
        mut sink: impl FnMut(LogOutput),
    ) -> Result<(), RuntimeError> {
        let started = self
            .docker
            .start_exec(exec_id, Some(StartExecOptions::default()))
            .await
            .map_err(|e| api_error(e, Call::Container))?;
        if let StartExecResults::Attached { mut output, .. } = started {
            while let Some(chunk) = output.next().await {
                sink(chunk.map_err(|e| api_error(e, Call::Container))?);
            }
        }
        Ok(())
    }

    /// The exit code of a finished exec, once podman has recorded it.
    async fn exec_exit_code(&self, exec_id: &str) -> Result<Option<i64>, RuntimeError> {
        for _ in 1..SETTLE_ATTEMPTS {
            let inspected = self
                .docker
                .inspect_exec(exec_id)
                .await
                .map_err(|e| api_error(e, Call::Container))?;
            if inspected.running != Some(true) {
                return Ok(inspected.exit_code);
            }
            tokio::time::sleep(SETTLE_INTERVAL).await;
        }
        Ok(None)
    }
}

impl ContainerRuntime for PodmanRuntime {
    /// What podman's progress stream said so far of the pull of `image`
    /// (as the [`RuntimeOp::Pull`] names it).
    fn pull_progress(&self, image: &str) -> Option<PullProgress> {
        self.pulls.get(image)
    }

    async fn execute(&self, op: RuntimeOp) -> RuntimeResult {
        match &op {
            RuntimeOp::List => self.list().await,
            RuntimeOp::Create { spec } => self.create(spec).await,
            RuntimeOp::Start { container } => self.start(container).await,
            RuntimeOp::Wait { container } => self.wait(container).await,
            RuntimeOp::Inspect { container } => {
                let inspected = self.inspect(container).await?;
                Ok(RuntimeReply::Inspected {
                    status: inspected.status,
                })
            }
            RuntimeOp::Stop {
                container, grace, ..
            } => self.stop(container, *grace).await,
            RuntimeOp::Remove { container, force } => self.remove(container, *force).await,
            RuntimeOp::InspectImage { image } => {
                let reference = ImageReference::parse(image)
                    .map_err(|why| RuntimeError::new(RuntimeErrorKind::Other, why))?;
                let image = self.inspect_image(image, &reference).await?;
                Ok(RuntimeReply::ImageInspected { image })
            }
            RuntimeOp::Pull { image } => self.pull(image).await,
            RuntimeOp::ListImages => self.list_images().await,
            RuntimeOp::RemoveImage { id } => self.remove_image(id).await,
            RuntimeOp::CopyFile {
                container,
                path,
                content,
                mode,
            } => self.copy_file(container, path, content, *mode).await,
            RuntimeOp::Exec { container, argv } => self.exec_to_exit(container, argv).await,
        }
    }

    /// Asks `/version` through bollard. Podman answers only after running
    /// its OCI runtime and conmon to learn their versions (about a second on
    /// a Raspberry-Pi class device), so the loop never waits for it.
    async fn version(&self) -> Result<String, RuntimeError> {
        let answer = self
            .docker
            .version()
            .await
            .map_err(|e| api_error(e, Call::System))?;
        answer
            .version
            .filter(|v| !v.trim().is_empty())
            .ok_or_else(|| {
                RuntimeError::new(
                    RuntimeErrorKind::Other,
                    "the runtime's /version answer has no Version",
                )
            })
    }

    async fn logs(
        &self,
        container: &str,
        tail_lines: u32,
        max_bytes: usize,
    ) -> Result<LogsOutput, RuntimeError> {
        let options = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .tail(&tail_lines.to_string())
            .build();
        let mut chunks = pin!(self.docker.logs(container, Some(options)));
        let mut text = NewestBytes::new(max_bytes);
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| api_error(e, Call::Container))?;
            text.push(chunk.as_ref());
        }
        let (text, truncated) = text.finish();
        Ok(LogsOutput { text, truncated })
    }

    async fn exec(
        &self,
        container: &str,
        argv: &[String],
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<ExecOutput, RuntimeError> {
        let exec_id = self.create_exec(container, argv).await?;
        let mut stdout = NewestBytes::new(max_bytes);
        let mut stderr = NewestBytes::new(max_bytes);
        let run = self.stream_exec(&exec_id, |chunk| match chunk {
            LogOutput::StdErr { message } => stderr.push(&message),
            LogOutput::StdOut { message } | LogOutput::Console { message } => {
                stdout.push(&message);
            }
            LogOutput::StdIn { .. } => {}
        });
        // On timeout the exec's process keeps running: the API cannot kill it.
        let timed_out = match tokio::time::timeout(timeout, run).await {
            Ok(result) => {
                result?;
                false
            }
            Err(_elapsed) => true,
        };
        let exit_code = if timed_out {
            None
        } else {
            self.exec_exit_code(&exec_id).await?
        };
        let (stdout, stdout_cut) = stdout.finish();
        let (stderr, stderr_cut) = stderr.finish();
        Ok(ExecOutput {
            exit_code,
            stdout,
            stderr,
            truncated: stdout_cut || stderr_cut,
            timed_out,
        })
    }
}

/// A [`PodmanRuntime`] that connects on first use, and again on the next
/// call after a failed connect: the agent starts (and keeps its loop
/// running) while podman's socket is still down, and every call made before
/// the socket answers fails as [`RuntimeErrorKind::Unavailable`], which the
/// reconciler retries with backoff and reports in heartbeats.
#[derive(Debug, Clone)]
pub struct LazyPodmanRuntime {
    socket: PathBuf,
    request_timeout: Duration,
    registry_auth: RegistryAuth,
    connected: std::sync::Arc<tokio::sync::OnceCell<PodmanRuntime>>,
}

impl LazyPodmanRuntime {
    /// A runtime for the API socket at `socket`; nothing is contacted yet.
    /// Call [`connect_in_background`](Self::connect_in_background) to
    /// connect before the first operation needs it.
    pub fn new(socket: impl Into<PathBuf>, request_timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            request_timeout,
            registry_auth: RegistryAuth::new(),
            connected: std::sync::Arc::default(),
        }
    }

    /// Pulls with these registry logins, as
    /// [`PodmanRuntime::with_registry_auth`]. Set it before the first use.
    #[must_use]
    pub fn with_registry_auth(mut self, auth: RegistryAuth) -> Self {
        self.registry_auth = auth;
        self
    }

    /// Starts connecting now, in a task of its own, so that the first
    /// operation finds the runtime connected (and a socket-activated podman
    /// started) instead of waiting for it. Never blocks: a socket that is
    /// down only leaves the runtime unconnected, and the next operation
    /// tries again. Must be called within a tokio runtime.
    pub fn connect_in_background(&self) {
        let runtime = self.clone();
        tokio::spawn(async move {
            if let Err(error) = runtime.runtime().await {
                tracing::debug!(error = %error.message, "the container runtime is not reachable yet");
            }
        });
    }

    /// The connected runtime, connecting first if need be.
    ///
    /// # Errors
    /// As [`PodmanRuntime::connect`].
    pub async fn runtime(&self) -> Result<&PodmanRuntime, RuntimeError> {
        self.connected
            .get_or_try_init(|| async {
                let runtime = PodmanRuntime::connect(&self.socket).await?;
                tracing::info!(
                    socket = %self.socket.display(),
                    api_version = runtime.api_version(),
                    "connected to the container runtime"
                );
                Ok(runtime
                    .with_request_timeout(self.request_timeout)
                    .with_registry_auth(self.registry_auth.clone()))
            })
            .await
    }
}

impl ContainerRuntime for LazyPodmanRuntime {
    fn pull_progress(&self, image: &str) -> Option<PullProgress> {
        self.connected.get()?.pull_progress(image)
    }

    async fn execute(&self, op: RuntimeOp) -> RuntimeResult {
        self.runtime().await?.execute(op).await
    }

    async fn version(&self) -> Result<String, RuntimeError> {
        self.runtime().await?.version().await
    }

    async fn logs(
        &self,
        container: &str,
        tail_lines: u32,
        max_bytes: usize,
    ) -> Result<LogsOutput, RuntimeError> {
        self.runtime()
            .await?
            .logs(container, tail_lines, max_bytes)
            .await
    }

    async fn exec(
        &self,
        container: &str,
        argv: &[String],
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<ExecOutput, RuntimeError> {
        self.runtime()
            .await?
            .exec(container, argv, timeout, max_bytes)
            .await
    }
}

/// GETs `path_and_query` over a connection of its own and decodes the JSON
/// answer.
async fn get_json<T: DeserializeOwned>(
    socket: &Path,
    path_and_query: &str,
    timeout: Duration,
    call: Call,
) -> Result<T, RuntimeError> {
    let response = get(socket, path_and_query, timeout).await?;
    if !(200..300).contains(&response.status) {
        return Err(status_error(
            response.status,
            error_message(&response.body),
            call,
        ));
    }
    serde_json::from_slice(&response.body).map_err(|e| {
        RuntimeError::new(
            RuntimeErrorKind::Other,
            format!("unreadable answer to GET {path_and_query}: {e}"),
        )
    })
}

/// The API version to speak with a server that speaks up to `server`
/// (`"1.41"`): the server's, unless bollard knows only older ones.
fn client_version(server: &str) -> Option<ClientVersion> {
    let (major, minor) = server.trim().split_once('.')?;
    let server = ClientVersion {
        major_version: major.parse().ok()?,
        minor_version: minor.parse().ok()?,
    };
    let newest = *bollard::API_DEFAULT_VERSION;
    Some(if server <= newest { server } else { newest })
}

/// The `/version` answer, as much as podfleet reads of it.
#[derive(Deserialize)]
struct VersionAnswer {
    #[serde(rename = "ApiVersion")]
    api_version: String,
}

/// An inspect answer, with what `stop` needs beyond [`ContainerStatus`].
struct Inspected {
    status: ContainerStatus,
    oom_killed: bool,
}

/// One row of the list answer, as much as podfleet reads of it.
#[derive(Deserialize)]
struct ListedContainer {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Names", default)]
    names: Vec<String>,
    #[serde(rename = "State", default)]
    state: String,
    #[serde(rename = "Labels", default)]
    labels: Option<BTreeMap<String, String>>,
}

/// The inspect answer, as much as podfleet reads of it.
#[derive(Deserialize)]
struct InspectAnswer {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "State")]
    state: InspectState,
    /// The id of the image it was created from (Docker's and podman's
    /// compat answer: `sha256:<hex>`).
    #[serde(rename = "Image", default)]
    image: Option<String>,
}

#[derive(Deserialize)]
struct InspectState {
    #[serde(rename = "Status", default)]
    status: String,
    #[serde(rename = "ExitCode", default)]
    exit_code: Option<i64>,
    #[serde(rename = "OOMKilled", default)]
    oom_killed: bool,
}

/// One image of `GET /images/json`, as much as podfleet reads of it.
#[derive(Deserialize)]
struct ImageListAnswer {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "RepoTags", default, deserialize_with = "null_as_empty")]
    repo_tags: Vec<String>,
    #[serde(rename = "RepoDigests", default, deserialize_with = "null_as_empty")]
    repo_digests: Vec<String>,
    #[serde(rename = "Created", default)]
    created: i64,
    #[serde(rename = "Size", default)]
    size: i64,
    #[serde(rename = "Containers", default)]
    containers: i64,
}

/// A JSON `null` list read as an empty one.
fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

/// `GET /info`, as much as podfleet reads of it.
#[derive(Deserialize)]
struct InfoAnswer {
    /// podman's graph root.
    #[serde(rename = "DockerRootDir")]
    docker_root_dir: String,
}

/// The image inspect answer, as much as podfleet reads of it.
#[derive(Deserialize)]
struct ImageInspectAnswer {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "RepoDigests", default)]
    repo_digests: Vec<String>,
}

/// An image name as a path segment: percent-encoded, but for the `/`, `:`
/// and `@` of a reference, which the API's routes take as they are.
fn encode_image_name(image: &str) -> String {
    image
        .split('/')
        .map(|part| {
            part.split(':')
                .map(|p| {
                    p.split('@')
                        .map(percent_encode)
                        .collect::<Vec<_>>()
                        .join("@")
                })
                .collect::<Vec<_>>()
                .join(":")
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Maps a state string from podman's or Docker's list or inspect.
fn container_state(state: &str) -> ContainerState {
    match state {
        // libpod's own names for "created" can leak through the compat API.
        "created" | "configured" | "initialized" => ContainerState::Created,
        "running" => ContainerState::Running,
        "paused" => ContainerState::Paused,
        "stopping" => ContainerState::Stopping,
        // "stopped": the process is gone, libpod's cleanup is pending.
        // "dead": Docker failed to remove it; it will not run again either.
        "exited" | "stopped" | "dead" => ContainerState::Exited,
        _ => ContainerState::Unknown,
    }
}

/// What a 404 means for a call, and whether a conflict can be a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    /// Create: 404 is the image, a conflict is the name.
    Create,
    /// Anything naming a container: 404 is the container.
    Container,
    /// Image inspect: 404 is the image.
    Image,
    /// Image removal: 404 is the image, 409 a container using it.
    RemoveImage,
    /// Version negotiation, the version query and list.
    System,
}

/// Maps a failed bollard call onto the reconciler's error kinds.
fn api_error(error: ApiError, call: Call) -> RuntimeError {
    match error {
        ApiError::DockerResponseServerError {
            status_code,
            message,
        } => status_error(status_code, message, call),
        ApiError::SocketNotFoundError(path) => RuntimeError::new(
            RuntimeErrorKind::Unavailable,
            format!("no API socket at {path}"),
        ),
        e @ (ApiError::HyperLegacyError { .. }
        | ApiError::HyperResponseError { .. }
        | ApiError::IOError { .. }
        | ApiError::RequestTimeoutError) => {
            RuntimeError::new(RuntimeErrorKind::Unavailable, e.to_string())
        }
        e => RuntimeError::new(RuntimeErrorKind::Other, e.to_string()),
    }
}

/// Maps an HTTP error status and the runtime's message.
fn status_error(status: u16, message: String, call: Call) -> RuntimeError {
    let kind = match (call, status) {
        (Call::Create, 404) => RuntimeErrorKind::ImageMissing,
        (Call::Create, 409) => RuntimeErrorKind::NameConflict,
        // podman 4.3 answers a name conflict with 500.
        (Call::Create, _) if message.contains("already in use") => RuntimeErrorKind::NameConflict,
        (Call::Container, 404) => RuntimeErrorKind::NotFound,
        (Call::Image, 404) => RuntimeErrorKind::ImageMissing,
        (Call::RemoveImage, 404) => RuntimeErrorKind::NotFound,
        (Call::RemoveImage, 409) => RuntimeErrorKind::ImageInUse,
        // podman 4.3 may answer an image in use with 500.
        (Call::RemoveImage, _) if message.contains("in use") => RuntimeErrorKind::ImageInUse,
        _ => RuntimeErrorKind::Other,
    };
    let message = if message.is_empty() {
        format!("HTTP status {status}")
    } else {
        message
    };
    RuntimeError::new(kind, message)
}

/// The `message` of a JSON error body, or the body itself.
fn error_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        message: String,
    }
    serde_json::from_slice::<ErrorBody>(body)
        .map(|b| b.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_owned())
}

/// The Docker API create body for `spec`.
fn create_body(spec: &ContainerSpec) -> ContainerCreateBody {
    let mut port_bindings: BTreeMap<String, Vec<PortBinding>> = BTreeMap::new();
    for port in &spec.ports {
        port_bindings
            .entry(port_key(port))
            .or_default()
            .push(PortBinding {
                host_ip: None,
                host_port: Some(port.host_port.to_string()),
            });
    }
    let exposed_ports: Vec<String> = port_bindings.keys().cloned().collect();
    let host_config = HostConfig {
        mounts: Some(spec.volumes.iter().map(mount).collect()),
        port_bindings: Some(
            port_bindings
                .into_iter()
                .map(|(key, bindings)| (key, Some(bindings)))
                .collect(),
        ),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        ..HostConfig::default()
    };
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        // No args: the image's own command runs.
        cmd: (!spec.args.is_empty()).then(|| spec.args.clone()),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        labels: Some(
            spec.labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<HashMap<_, _>>(),
        ),
        stop_signal: Some(spec.stop_signal.name().to_owned()),
        exposed_ports: (!exposed_ports.is_empty()).then_some(exposed_ports),
        host_config: Some(host_config),
        ..ContainerCreateBody::default()
    }
}

/// `"8080/tcp"`: the Docker API's key for a container port.
fn port_key(port: &PortMapping) -> String {
    let protocol = match port.protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    };
    format!("{}/{protocol}", port.container_port)
}

/// A bind mount for an absolute source, a named volume otherwise.
fn mount(volume: &VolumeMount) -> Mount {
    let typ = if volume.source.starts_with('/') {
        MountType::BIND
    } else {
        MountType::VOLUME
    };
    Mount {
        target: Some(volume.target.clone()),
        source: Some(volume.source.clone()),
        typ: Some(typ),
        read_only: Some(volume.read_only),
        ..Mount::default()
    }
}

/// Keeps the newest `limit` bytes of a stream of output, and counts them all.
struct NewestBytes {
    bytes: Vec<u8>,
    limit: usize,
    cut: bool,
    /// Every byte pushed, kept or not.
    len: usize,
}

impl NewestBytes {
    fn new(limit: usize) -> Self {
        Self {
            bytes: Vec::new(),
            limit,
            cut: false,
            len: 0,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        self.len = self.len.saturating_add(chunk.len());
        self.bytes.extend_from_slice(chunk);
        // Trim in batches rather than on every chunk.
        if self.bytes.len() > self.limit.saturating_mul(2).saturating_add(64 * 1024) {
            self.trim();
        }
    }

    fn trim(&mut self) {
        if self.bytes.len() > self.limit {
            let excess = self.bytes.len() - self.limit;
            self.bytes.drain(..excess);
            self.cut = true;
        }
    }

    /// The kept bytes as lossy UTF-8 (without a character split by the
    /// cut), and whether anything was cut.
    fn finish(mut self) -> (String, bool) {
        self.trim();
        let start = if self.cut {
            self.bytes
                .iter()
                .position(|b| b & 0b1100_0000 != 0b1000_0000)
                .unwrap_or(self.bytes.len())
        } else {
            0
        };
        let text = String::from_utf8_lossy(self.bytes.get(start..).unwrap_or_default());
        (text.into_owned(), self.cut)
    }

    /// The kept bytes as [`bounded_tail`](podfleet_core::wire::text::bounded_tail)
    /// of the whole stream, at most `limit` bytes, would give them: a cut
    /// output starts with how long it was.
    fn finish_as_bounded_tail(self) -> String {
        let (len, limit) = (self.len, self.limit);
        let (end, _) = self.finish();
        bounded_tail_of(&end, len, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podfleet_core::wire::Signal;

    #[test]
    fn libpod_states_map_onto_container_states() {
        assert_eq!(container_state("created"), ContainerState::Created);
        assert_eq!(container_state("initialized"), ContainerState::Created);
        assert_eq!(container_state("running"), ContainerState::Running);
        assert_eq!(container_state("paused"), ContainerState::Paused);
        assert_eq!(container_state("stopping"), ContainerState::Stopping);
        assert_eq!(container_state("stopped"), ContainerState::Exited);
        assert_eq!(container_state("exited"), ContainerState::Exited);
        assert_eq!(container_state("dead"), ContainerState::Exited);
        assert_eq!(container_state("removing"), ContainerState::Unknown);
        assert_eq!(container_state(""), ContainerState::Unknown);
    }

    #[test]
    fn statuses_map_per_call() {
        let kind = |status, message: &str, call| status_error(status, message.into(), call).kind;
        assert_eq!(
            kind(404, "no such image", Call::Create),
            RuntimeErrorKind::ImageMissing
        );
        assert_eq!(
            kind(500, "that name is already in use", Call::Create),
            RuntimeErrorKind::NameConflict
        );
        assert_eq!(
            kind(409, "Conflict.", Call::Create),
            RuntimeErrorKind::NameConflict
        );
        assert_eq!(
            kind(404, "no such container", Call::Container),
            RuntimeErrorKind::NotFound
        );
        assert_eq!(
            kind(409, "cannot remove a running container", Call::Container),
            RuntimeErrorKind::Other
        );
        assert_eq!(
            status_error(500, String::new(), Call::System).message,
            "HTTP status 500"
        );
    }

    #[test]
    fn the_api_version_is_the_servers_up_to_bollards() {
        let version = |v| client_version(v).map(|c| c.to_string());
        assert_eq!(version("1.41").as_deref(), Some("1.41"));
        assert_eq!(
            version("1.99").as_deref(),
            Some(bollard::API_DEFAULT_VERSION.to_string().as_str())
        );
        assert_eq!(version("4.3.1"), None);
        assert_eq!(version("new"), None);
    }

    #[test]
    fn error_bodies_yield_their_message() {
        assert_eq!(
            error_message(br#"{"cause":"x","message":"no such container","response":404}"#),
            "no such container"
        );
        assert_eq!(error_message(b"plain words\n"), "plain words");
    }

    #[test]
    fn newest_bytes_keeps_the_tail_on_a_character_boundary() {
        let mut kept = NewestBytes::new(5);
        kept.push(b"abc");
        kept.push("dé€f".as_bytes());
        // "abcdé€f" ends in "€f" (4 bytes) after dropping the second half of "é".
        assert_eq!(kept.finish(), ("€f".to_owned(), true));
        let mut kept = NewestBytes::new(10);
        kept.push(b"short");
        assert_eq!(kept.finish(), ("short".to_owned(), false));
    }

    #[test]
    fn an_exec_output_kept_while_streaming_is_the_bounded_tail_of_all_of_it() {
        let whole: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        let mut kept = NewestBytes::new(EXEC_OUTPUT_MAX_BYTES);
        for chunk in whole.as_bytes().chunks(1000) {
            kept.push(chunk);
        }
        assert!(kept.bytes.len() < 3 * EXEC_OUTPUT_MAX_BYTES + 64 * 1024);
        assert_eq!(
            kept.finish_as_bounded_tail(),
            podfleet_core::wire::text::bounded_tail(&whole, EXEC_OUTPUT_MAX_BYTES)
        );
        let mut short = NewestBytes::new(EXEC_OUTPUT_MAX_BYTES);
        short.push(b"after\n");
        assert_eq!(short.finish_as_bounded_tail(), "after\n");
    }

    #[test]
    fn create_body_carries_the_whole_spec() {
        let spec = ContainerSpec {
            name: "shop_web".into(),
            image: "localhost/web:1".into(),
            args: vec!["sh".into(), "-c".into(), "true".into()],
            env: BTreeMap::from([("A".into(), "1".into())]),
            volumes: vec![
                VolumeMount {
                    source: "/srv/data".into(),
                    target: "/data".into(),
                    read_only: true,
                },
                VolumeMount {
                    source: "cache".into(),
                    target: "/cache".into(),
                    read_only: false,
                },
            ],
            ports: vec![
                PortMapping {
                    host_port: 8080,
                    container_port: 80,
                    protocol: Protocol::Tcp,
                },
                PortMapping {
                    host_port: 5353,
                    container_port: 53,
                    protocol: Protocol::Udp,
                },
            ],
            labels: BTreeMap::from([(LABEL_MANAGED.into(), "true".into())]),
            stop_signal: Signal::Term,
        };
        let body = create_body(&spec);
        assert_eq!(body.cmd, Some(spec.args.clone()));
        assert_eq!(body.env, Some(vec!["A=1".to_owned()]));
        assert_eq!(body.stop_signal.as_deref(), Some("SIGTERM"));
        assert_eq!(
            body.exposed_ports,
            Some(vec!["53/udp".to_owned(), "80/tcp".to_owned()])
        );
        let host = body.host_config.unwrap();
        let bindings = host.port_bindings.unwrap();
        assert_eq!(
            bindings["80/tcp"].as_ref().unwrap()[0].host_port.as_deref(),
            Some("8080")
        );
        let mounts = host.mounts.unwrap();
        assert_eq!(mounts[0].typ, Some(MountType::BIND));
        assert_eq!(mounts[0].read_only, Some(true));
        assert_eq!(mounts[1].typ, Some(MountType::VOLUME));
        assert_eq!(
            host.restart_policy.unwrap().name,
            Some(RestartPolicyNameEnum::NO)
        );
        let no_args = create_body(&ContainerSpec {
            args: Vec::new(),
            ..spec
        });
        assert_eq!(no_args.cmd, None);
    }
}
