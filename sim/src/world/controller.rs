//! The fleet controller host: the production sans-IO fleet
//! [`Controller`] driven over the fake broker, as `podfleet controller`
//! drives it over NATS.
//!
//! It watches the deployments, devices, desired, state, heartbeat and
//! status buckets, feeds every entry to the controller, hands it
//! [`Input::Synced`] once every watch has delivered its snapshot, and
//! carries out its writes. After a lost connection it starts over with a
//! new controller, as the production shell does.

use podfleet_core::fleet::controller::{Bugs, Config, Controller, Input, Output};
use podfleet_core::session::{KeyFilter, Operation, WatchedEntry};
use podfleet_core::wire::names::{
    kv_subject, DeploymentKey, DEPLOYMENTS_BUCKET, DEVICES_BUCKET, HEARTBEAT_BUCKET, STATUS_BUCKET,
};

use super::*;
use crate::broker::PING_INTERVAL;

/// The buckets the controller watches, by watch id (1-based).
const WATCHED: [&str; 6] = [
    DEPLOYMENTS_BUCKET,
    DEVICES_BUCKET,
    DESIRED_BUCKET,
    STATE_BUCKET,
    HEARTBEAT_BUCKET,
    STATUS_BUCKET,
];

/// The fleet controller process: connects, syncs, drives, and starts over
/// after every lost connection.
pub async fn fleet_controller<D: Dialer>(dialer: D, clock: SimClock, world: World, bugs: Bugs) {
    loop {
        let Ok((reader, mut writer)) = dialer.dial("controller").await else {
            tokio::time::sleep(RECONNECT_DELAY).await;
            continue;
        };
        let hello = Frame::Hello {
            client: "controller".into(),
        };
        if writer.write_all(&hello.to_line()).await.is_ok() {
            world.trace(clock.now(), "ctrl", "connected");
            let config = Config {
                bugs,
                ..Config::default()
            };
            session(
                BufReader::new(reader).lines(),
                writer,
                config,
                &clock,
                &world,
            )
            .await;
            world.trace(clock.now(), "ctrl", "connection lost; starting over");
        }
        tokio::time::sleep(RECONNECT_DELAY).await;
    }
}

/// One connection's life: returns when it is lost.
async fn session(
    mut lines: tokio::io::Lines<BufReader<BoxRead>>,
    mut writer: BoxWrite,
    config: Config,
    clock: &SimClock,
    world: &World,
) {
    let mut controller = Controller::new(config, clock.now());
    for (i, bucket) in WATCHED.iter().enumerate() {
        let watch = Frame::Watch {
            id: i as u64 + 1,
            bucket: (*bucket).into(),
            prefix: String::new(),
            deletes: true,
        };
        if writer.write_all(&watch.to_line()).await.is_err() {
            return;
        }
    }
    // Per watch: entries of its snapshot still to come (`None`: not started).
    let mut pending = [None; WATCHED.len()];
    let mut writes: BTreeMap<u64, DeploymentKey> = BTreeMap::new();
    let mut next_id = 100u64;
    let mut last_heard = tokio::time::Instant::now();
    let mut next_ping = tokio::time::Instant::now() + PING_INTERVAL;
    loop {
        let wake = controller
            .poll_timeout()
            .map_or(Duration::from_secs(3600), |w| {
                w.at.saturating_since(clock.now())
            });
        let input = tokio::select! {
            biased;
            line = lines.next_line() => {
                let Ok(Some(line)) = line else { return };
                last_heard = tokio::time::Instant::now();
                let Ok(frame) = serde_json::from_str::<Frame>(&line) else { return };
                match frame {
                    Frame::Watching { id, pending: n } => {
                        if let Some(slot) = watch_slot(&mut pending, id) {
                            *slot = Some(n);
                        }
                        None
                    }
                    Frame::Entry { watch, key, revision, pending: n, value } => {
                        if let Some(slot) = watch_slot(&mut pending, watch) {
                            *slot = Some(n);
                        }
                        entry_input(watch, key, revision, value)
                    }
                    Frame::Ack { id, .. } => {
                        writes.remove(&id);
                        None
                    }
                    Frame::Denied { id, reason } => writes.remove(&id).map(|key| Input::WriteFailed {
                        key,
                        error: reason,
                    }),
                    Frame::TooLarge { id, size, limit } => writes.remove(&id).map(|key| Input::WriteFailed {
                        key,
                        error: format!("{size} bytes is over the limit of {limit}"),
                    }),
                    _ => None,
                }
            }
            () = tokio::time::sleep(wake) => Some(Input::Timeout),
            () = tokio::time::sleep_until(next_ping) => {
                if last_heard.elapsed() > IDLE_TIMEOUT {
                    return;
                }
                next_ping += PING_INTERVAL;
                if writer.write_all(&Frame::Ping.to_line()).await.is_err() {
                    return;
                }
                None
            }
        };
        let now = clock.now();
        if let Some(input) = input {
            controller.handle(now, input);
        }
        if !controller.is_synced() && pending.iter().all(|p| *p == Some(0)) {
            world.trace(now, "ctrl", "synced");
            controller.handle(now, Input::Synced);
        }
        while let Some(output) = controller.poll_output() {
            next_id += 1;
            let (bucket, key, value) = match output {
                Output::PutDesired { key, payload } => {
                    writes.insert(next_id, key.clone());
                    (DESIRED_BUCKET, key.to_key(), Some(payload.to_vec()))
                }
                Output::DeleteDesired { key } => {
                    world.probe("fleet key deleted");
                    writes.insert(next_id, key.clone());
                    (DESIRED_BUCKET, key.to_key(), None)
                }
                Output::DeleteState { key } => {
                    world.probe("orphan state collected");
                    world.state_collected(key.to_key());
                    (STATE_BUCKET, key.to_key(), None)
                }
                Output::PutStatus { name, status } => (
                    STATUS_BUCKET,
                    name.to_string(),
                    Some(serde_json::to_vec(&status).unwrap_or_default()),
                ),
                Output::DeleteStatus { name } => (STATUS_BUCKET, name.to_string(), None),
                _ => continue,
            };
            let verb = if value.is_some() { "put" } else { "delete" };
            world.trace(now, "ctrl", format_args!("{verb} {bucket} {key}"));
            let frame = Frame::Write {
                id: next_id,
                bucket: bucket.into(),
                key,
                value,
            };
            if writer.write_all(&frame.to_line()).await.is_err() {
                return;
            }
        }
    }
}

fn watch_slot(pending: &mut [Option<u64>; WATCHED.len()], watch: u64) -> Option<&mut Option<u64>> {
    let index = usize::try_from(watch.checked_sub(1)?).ok()?;
    pending.get_mut(index)
}

/// What a watched entry tells the controller; `None` for a key it cannot
/// parse (nothing podfleet writes).
fn entry_input(watch: u64, key: String, revision: u64, value: Option<Vec<u8>>) -> Option<Input> {
    let bucket = *WATCHED.get(usize::try_from(watch.checked_sub(1)?).ok()?)?;
    Some(match bucket {
        DEPLOYMENTS_BUCKET => {
            let name = DeploymentName::new(key).ok()?;
            match value {
                Some(value) => Input::DeploymentPut {
                    name,
                    generation: revision,
                    value,
                },
                None => Input::DeploymentDeleted { name },
            }
        }
        DEVICES_BUCKET => {
            let device = DeviceId::new(key).ok()?;
            match value {
                Some(value) => Input::DevicePut { device, value },
                None => Input::DeviceDeleted { device },
            }
        }
        STATUS_BUCKET => Input::Status {
            name: DeploymentName::new(key).ok()?,
            value,
        },
        HEARTBEAT_BUCKET => Input::Heartbeat {
            device: DeviceId::new(key).ok()?,
            value,
            age: Duration::ZERO,
        },
        _ => {
            let entry = WatchedEntry {
                subject: kv_subject(bucket, &key),
                operation: if value.is_some() {
                    Operation::Put
                } else {
                    Operation::Delete
                },
                revision,
                pending: 0,
                payload: value.unwrap_or_default(),
            };
            let change = KeyFilter::every_device(bucket).classify(entry).ok()?;
            if bucket == DESIRED_BUCKET {
                Input::Desired(change)
            } else {
                Input::State(change)
            }
        }
    })
}
