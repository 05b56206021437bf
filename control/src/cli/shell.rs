//! The IO edge of the verbs: connect, read, write, sleep and print. Every
//! decision about what to print and how to exit is made by the pure
//! functions of the sibling modules; this module only carries them out.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use podfleet_core::fleet::FleetDeployment;
use podfleet_core::wire::{DeploymentName, DeviceId, ExecReply, LogsReply, PingReply, Verb};

use crate::cli::apply::{self, DryRun, Outcome, PinnedImage};
use crate::cli::args::{
    format_duration, ApplyArgs, Command, DeleteArgs, DescribeArgs, DescribeKind, ExecArgs, GetArgs,
    GlobalArgs, Kind, LabelArgs, LogsArgs, OutputFormat, PingArgs, RolloutAction,
};
use crate::cli::command::{self, Printed};
use crate::cli::get::{self, Manifests, Watch};
use crate::cli::rollout::{self, Force, RolloutWatch, Verdict};
use crate::cli::{describe, label, table, Exit, Failure};
use crate::client::{BucketPlan, ClientError, FleetClient};
use crate::context;
use crate::registry::{self, ResolveError, Resolver};

/// How often `get -w` reads the buckets again.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// The six buckets ([`BucketPlan::default`]), with `replicas` and (when
/// given) `max_value_size`. Existing buckets are never altered.
pub fn bucket_plan(replicas: u8, max_value_size: Option<u32>) -> BucketPlan {
    BucketPlan::default().sized(replicas, max_value_size)
}

/// Runs one verb (every verb but `controller`, which main runs).
///
/// # Errors
/// A [`Failure`] to print on stderr with its exit code.
pub async fn run(global: &GlobalArgs, command: Command) -> Result<Exit, Failure> {
    match command {
        Command::Apply(args) => apply(global, args).await,
        Command::Delete(args) => delete(global, args).await,
        Command::Get(args) => get(global, args).await,
        Command::Describe(args) => describe(global, args).await,
        Command::Label(args) => label(global, args).await,
        Command::Rollout(args) => match args.action {
            RolloutAction::Status { name, timeout } => rollout_status(global, name, timeout).await,
            RolloutAction::Force { name } => rollout_force(global, name).await,
            RolloutAction::Restart { name } => rollout_restart(global, name).await,
        },
        Command::Ping(args) => ping(global, args).await,
        Command::Logs(args) => logs(global, args).await,
        Command::Exec(args) => exec(global, args).await,
        Command::Controller(_) => Err(Failure::usage("`podfleet controller` is not a client verb")),
    }
}

fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

fn err(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

fn failed(error: ClientError) -> Failure {
    Failure::failed(error.to_string())
}

async fn connect(global: &GlobalArgs) -> Result<FleetClient, Failure> {
    let unreachable = |message: String| Failure {
        exit: Exit::Unreachable,
        message,
    };
    let connection =
        context::resolve(&global.overrides()).map_err(|e| unreachable(e.to_string()))?;
    tracing::debug!(context = %connection.context, urls = ?connection.urls, "connecting");
    FleetClient::connect(&connection, &bucket_plan(1, None), global.request_timeout)
        .await
        .map_err(|e| {
            unreachable(format!(
                "cannot reach {} (context {}): {e}",
                connection.urls.join(","),
                connection.context
            ))
        })
}

fn read_input(file: &Path) -> Result<(String, String), Failure> {
    if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| Failure::failed(format!("<stdin>: {e}")))?;
        return Ok(("<stdin>".to_owned(), text));
    }
    let label = file.display().to_string();
    let text =
        std::fs::read_to_string(file).map_err(|e| Failure::failed(format!("{label}: {e}")))?;
    Ok((label, text))
}

async fn apply(global: &GlobalArgs, args: ApplyArgs) -> Result<Exit, Failure> {
    let (label, text) = read_input(&args.file)?;
    let manifests = apply::parse_manifests(&label, &text)?;
    let pins = !args.keep_tags
        && manifests
            .iter()
            .any(|m| !apply::images_to_pin(m).is_empty());
    let resolver = if pins {
        Some(resolver(global, &args)?)
    } else {
        None
    };
    let client = connect(global).await?;
    let snapshot = if args.dry_run {
        Some(
            client
                .snapshot_with(global.controller_config())
                .await
                .map_err(failed)?,
        )
    } else {
        None
    };
    // An image named by several manifests is resolved once: one digest for all.
    let mut digests = BTreeMap::new();
    let mut exit = Exit::Success;
    for manifest in &manifests {
        let (manifest, pinned) = match &resolver {
            None => (manifest.clone(), Vec::new()),
            Some(resolver) => match pin(resolver, &mut digests, manifest).await {
                Ok(pinned) => pinned,
                // One deployment's image never stops the others.
                Err(failure) => {
                    err(&format!("error: {failure}\n"));
                    exit = Exit::Failed;
                    continue;
                }
            },
        };
        for image in &pinned {
            tracing::info!(deployment = %manifest.metadata.name, container = %image.container, image = %image.pinned, "pinned");
        }
        let stored = client
            .deployment(&manifest.metadata.name)
            .await
            .map_err(failed)?;
        let stored = stored.as_ref().map(|(_, m)| m);
        let manifest = apply::keep_rollout_verbs(stored, manifest);
        let outcome = Outcome::of(stored, &manifest);
        match &snapshot {
            Some((controller, now)) => {
                let mut plan = DryRun::plan(controller, *now, &manifest);
                plan.pinned = pinned;
                out(&plan.render(&manifest, outcome));
            }
            None => {
                if outcome.writes() {
                    client.put_deployment(&manifest).await.map_err(failed)?;
                }
                out(&outcome.line(&manifest));
            }
        }
    }
    Ok(exit)
}

/// The resolver `apply` pins with: the logins of `--registry-auth-file`,
/// or of podman's search path; plain HTTP for `--insecure-registry` hosts;
/// `--request-timeout` for each request.
fn resolver(global: &GlobalArgs, args: &ApplyArgs) -> Result<Resolver, Failure> {
    let auth = match &args.registry_auth_file {
        Some(file) => registry::read_auth_file(file),
        None => {
            registry::read_auth_files(&registry::default_auth_files(|name| std::env::var_os(name)))
                .map(|(auth, read)| {
                    tracing::debug!(files = ?read, "registry logins read");
                    auth
                })
        }
    }
    .map_err(|e| Failure::failed(e.to_string()))?;
    let mut resolver = Resolver::new(auth).request_timeout(global.request_timeout);
    for host in &args.insecure_registries {
        resolver = resolver.insecure_registry(host);
    }
    Ok(resolver)
}

/// `manifest` with its images pinned, each resolved once per `apply`
/// (`digests` keeps every answer, failures too).
async fn pin(
    resolver: &Resolver,
    digests: &mut BTreeMap<String, Result<String, ResolveError>>,
    manifest: &FleetDeployment,
) -> Result<(FleetDeployment, Vec<PinnedImage>), Failure> {
    let mut resolved = BTreeMap::new();
    for image in apply::images_to_pin(manifest) {
        let digest = match digests.get(&image.image) {
            Some(answer) => answer.clone(),
            None => {
                let answer = resolver.resolve(&image.image).await;
                digests.insert(image.image.clone(), answer.clone());
                answer
            }
        };
        let digest = digest.map_err(|e| apply::unresolved(manifest, &image.container, &e))?;
        resolved.insert(image.image, digest);
    }
    apply::pin_images(manifest, &resolved)
}

async fn delete(global: &GlobalArgs, args: DeleteArgs) -> Result<Exit, Failure> {
    let client = connect(global).await?;
    match client.delete_deployment(&args.name).await.map_err(failed)? {
        true => out(&format!("fleetdeployment/{} deleted\n", args.name)),
        false if args.ignore_not_found => {}
        false => {
            return Err(Failure::failed(format!(
                "fleetdeployment \"{}\" not found",
                args.name
            )))
        }
    }
    Ok(Exit::Success)
}

async fn manifests(client: &FleetClient, names: Vec<DeploymentName>) -> Manifests {
    let mut manifests = Manifests::new();
    for name in names {
        match client.deployment(&name).await {
            Ok(Some(stored)) => {
                manifests.insert(name, stored);
            }
            Ok(None) => {}
            // A manifest the controller refused shows with its error.
            Err(error) => tracing::warn!(%name, %error, "cannot read the manifest"),
        }
    }
    manifests
}

async fn get(global: &GlobalArgs, args: GetArgs) -> Result<Exit, Failure> {
    let selector = get::selector(args.kind, args.selector.as_deref())?;
    let list_format = args.output.filter(|f| *f != OutputFormat::Wide);
    if args.watch && list_format.is_some() {
        return Err(Failure::usage(
            "-w prints tables: use it without -o, or with -o wide",
        ));
    }
    let wide = args.output == Some(OutputFormat::Wide);
    let client = connect(global).await?;
    let volatile = match args.kind {
        Kind::Devices => get::DEVICE_VOLATILE_COLUMNS,
        Kind::Deployments => &[],
    };
    let mut watch = Watch::new(volatile);
    loop {
        let (controller, now) = client
            .snapshot_with(global.controller_config())
            .await
            .map_err(failed)?;
        let manifests = match args.kind {
            Kind::Devices => Manifests::new(),
            Kind::Deployments => {
                manifests(&client, controller.deployment_names().cloned().collect()).await
            }
        };
        if let Some(format) = list_format {
            let list = match args.kind {
                Kind::Devices => get::devices_list(&controller, now, selector.as_ref()),
                Kind::Deployments => get::deployments_list(&controller, &manifests),
            };
            out(&get::render_list(&list, format)?);
            return Ok(Exit::Success);
        }
        let table = match args.kind {
            Kind::Devices => get::devices_table(&controller, now, selector.as_ref(), wide),
            Kind::Deployments => get::deployments_table(&controller, &manifests, wide),
        };
        if !args.watch {
            if table.is_empty() {
                err("No resources found.\n");
            } else {
                out(&table.render(table::terminal_width()));
            }
            return Ok(Exit::Success);
        }
        out(&watch.next(&table, table::terminal_width()));
        tokio::time::sleep(WATCH_INTERVAL).await;
    }
}

async fn describe(global: &GlobalArgs, args: DescribeArgs) -> Result<Exit, Failure> {
    let text = match args.kind {
        DescribeKind::Device => {
            let id = DeviceId::new(&args.name)
                .map_err(|e| Failure::usage(format!("device id {:?}: {e}", args.name)))?;
            let client = connect(global).await?;
            let (controller, now) = client
                .snapshot_with(global.controller_config())
                .await
                .map_err(failed)?;
            describe::device(&controller, now, &id)?
        }
        DescribeKind::Deployment => {
            let name = DeploymentName::new(&args.name)
                .map_err(|e| Failure::usage(format!("deployment name {:?}: {e}", args.name)))?;
            let client = connect(global).await?;
            let (controller, now) = client
                .snapshot_with(global.controller_config())
                .await
                .map_err(failed)?;
            let stored = client.deployment(&name).await.map_err(failed)?;
            describe::deployment(
                &controller,
                now,
                &name,
                stored.as_ref(),
                table::terminal_width(),
            )?
        }
    };
    out(&text);
    Ok(Exit::Success)
}

async fn label(global: &GlobalArgs, args: LabelArgs) -> Result<Exit, Failure> {
    let changes = label::parse(&args.labels)?;
    let client = connect(global).await?;
    let record = client.device_record(&args.device).await.map_err(failed)?;
    label::check_overwrite(
        args.device.as_str(),
        &record.labels,
        &changes,
        args.overwrite,
    )?;
    let unchanged = changes
        .set
        .iter()
        .all(|(k, v)| record.labels.get(k) == Some(v))
        && changes
            .remove
            .iter()
            .all(|k| !record.labels.contains_key(k));
    if unchanged {
        out(&format!("device/{} not labeled\n", args.device));
        return Ok(Exit::Success);
    }
    client
        .label_device(&args.device, &changes.set, &changes.remove)
        .await
        .map_err(failed)?;
    out(&format!("device/{} labeled\n", args.device));
    Ok(Exit::Success)
}

async fn rollout_status(
    global: &GlobalArgs,
    name: DeploymentName,
    timeout: Duration,
) -> Result<Exit, Failure> {
    let deadline = tokio::time::Instant::now() + timeout;
    let client = connect(global).await?;
    let Some((generation, _)) = client.deployment(&name).await.map_err(failed)? else {
        return Err(Failure::failed(format!(
            "fleetdeployment \"{name}\" not found"
        )));
    };
    let mut statuses = client.watch_status(&name).await.map_err(failed)?;
    let mut watch = RolloutWatch::new(name, generation);
    let tty = std::io::stdout().is_terminal();
    let mut drawn = false;
    let end_line = |drawn: bool| {
        if tty && drawn {
            out("\n");
        }
    };
    loop {
        let status = match tokio::time::timeout_at(deadline, statuses.next()).await {
            Err(_) => {
                end_line(drawn);
                return Err(Failure {
                    exit: Exit::TimedOut,
                    message: watch.timed_out(&format_duration(timeout)),
                });
            }
            Ok(None) => {
                end_line(drawn);
                return Err(Failure::failed(
                    "the status watch ended before the rollout did",
                ));
            }
            Ok(Some(status)) => status,
        };
        let (line, verdict) = watch.step(status.as_ref());
        if let Some(line) = line {
            if tty {
                out(&format!("\r\x1b[2K{line}"));
                drawn = true;
            } else {
                out(&format!("{line}\n"));
            }
        }
        match verdict {
            Verdict::Waiting(_) => {}
            Verdict::Complete(message) => {
                end_line(drawn);
                out(&format!("{message}\n"));
                return Ok(Exit::Success);
            }
            Verdict::Failed(message) => {
                end_line(drawn);
                return Err(Failure::failed(message));
            }
        }
    }
}

async fn rollout_force(global: &GlobalArgs, name: DeploymentName) -> Result<Exit, Failure> {
    let client = connect(global).await?;
    let stored = client.deployment(&name).await.map_err(failed)?;
    let outcome = rollout::force(&name, stored.as_ref())?;
    let generation = match (&outcome, &stored) {
        (Force::Write(forced), Some((generation, _))) => client
            .update_deployment(forced, *generation)
            .await
            .map_err(failed)?,
        (_, stored) => stored.as_ref().map_or(0, |(g, _)| *g),
    };
    out(&rollout::forced_line(&name, &outcome, generation));
    Ok(Exit::Success)
}

async fn rollout_restart(global: &GlobalArgs, name: DeploymentName) -> Result<Exit, Failure> {
    let client = connect(global).await?;
    let stored = client.deployment(&name).await.map_err(failed)?;
    let restarted = rollout::restart(&name, stored.as_ref())?;
    let expected = stored.as_ref().map_or(0, |(g, _)| *g);
    let generation = client
        .update_deployment(&restarted, expected)
        .await
        .map_err(failed)?;
    out(&rollout::restarted_line(&restarted, generation));
    Ok(Exit::Success)
}

async fn ping(global: &GlobalArgs, args: PingArgs) -> Result<Exit, Failure> {
    let client = connect(global).await?;
    let sent = std::time::Instant::now();
    let body = client
        .command(
            &args.device,
            Verb::Ping,
            serde_json::json!({}),
            global.request_timeout,
        )
        .await
        .map_err(|e| Failure::failed(format!("device {} did not answer: {e}", args.device)))?;
    let reply: PingReply = command::decode(&args.device, body)?;
    out(&command::ping_line(&reply, sent.elapsed()));
    Ok(Exit::Success)
}

fn print(printed: Printed) -> Exit {
    out(&printed.stdout);
    err(&printed.stderr);
    printed.exit
}

async fn logs(global: &GlobalArgs, args: LogsArgs) -> Result<Exit, Failure> {
    let client = connect(global).await?;
    let body = client
        .command(
            &args.device,
            Verb::Logs,
            command::logs_request(&args),
            global.request_timeout,
        )
        .await
        .map_err(|e| Failure::failed(format!("device {} did not answer: {e}", args.device)))?;
    let reply: LogsReply = command::decode(&args.device, body)?;
    Ok(print(command::logs_output(reply)))
}

async fn exec(global: &GlobalArgs, args: ExecArgs) -> Result<Exit, Failure> {
    let client = connect(global).await?;
    let body = client
        .command(
            &args.device,
            Verb::Exec,
            command::exec_request(&args),
            args.timeout + global.request_timeout,
        )
        .await
        .map_err(|e| Failure::failed(format!("device {} did not answer: {e}", args.device)))?;
    let reply: ExecReply = command::decode(&args.device, body)?;
    Ok(print(command::exec_output(reply)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_names_six_buckets_with_the_replicas_asked_for() {
        let plan = bucket_plan(3, Some(4096));
        let names: Vec<&str> = plan
            .buckets
            .iter()
            .map(podfleet_agent::buckets::BucketSettings::name)
            .collect();
        assert_eq!(
            names,
            [
                "podfleet-desired",
                "podfleet-state",
                "podfleet-heartbeats",
                "podfleet-deployments",
                "podfleet-devices",
                "podfleet-status"
            ]
        );
        let config = plan.buckets[0].stream_config();
        assert_eq!(config["num_replicas"], 3, "{config}");
        assert_eq!(config["max_msg_size"], 4096, "{config}");
    }
}
