//! The operator host: an administrator's writes (hand-written desired
//! keys, fleet deployments, device labels) and commands, over its own
//! connection to the broker, checking the answers it gets.

use super::*;

/// What the operator host is asked to do.
#[derive(Debug, Clone)]
pub enum OperatorCommand {
    /// Put or delete (`None`) a key.
    Write {
        /// The bucket.
        bucket: &'static str,
        /// The key.
        key: String,
        /// The value.
        value: Option<Vec<u8>>,
    },
    /// Ping a device.
    Ping {
        /// The device.
        device: DeviceId,
    },
}

/// The operator: writes desired state in plan order, retrying until each
/// write is acknowledged, and pings devices.
pub async fn operator<D: Dialer>(
    dialer: D,
    clock: SimClock,
    world: World,
    mut commands: mpsc::UnboundedReceiver<OperatorCommand>,
) {
    let mut connection: Option<(tokio::io::Lines<BufReader<BoxRead>>, BoxWrite)> = None;
    let mut next_id = 0u64;
    while let Some(command) = commands.recv().await {
        loop {
            if connection.is_none() {
                match dialer.dial("operator").await {
                    Ok((r, mut w)) => {
                        let hello = Frame::Hello {
                            client: "operator".into(),
                        };
                        if w.write_all(&hello.to_line()).await.is_ok() {
                            connection = Some((BufReader::new(r).lines(), w));
                        }
                    }
                    Err(_) => {
                        tokio::time::sleep(RECONNECT_DELAY).await;
                        continue;
                    }
                }
            }
            let Some((lines, writer)) = connection.as_mut() else {
                continue;
            };
            next_id += 1;
            let id = next_id;
            let frame = match &command {
                OperatorCommand::Write { bucket, key, value } => Frame::Write {
                    id,
                    bucket: (*bucket).into(),
                    key: key.clone(),
                    value: value.clone(),
                },
                OperatorCommand::Ping { device } => Frame::Request {
                    id,
                    subject: CommandSubject {
                        device: device.clone(),
                        verb: Verb::Ping,
                    }
                    .to_subject(),
                    body: Vec::new(),
                },
            };
            if writer.write_all(&frame.to_line()).await.is_err() {
                connection = None;
                continue;
            }
            let answer = tokio::time::timeout(IDLE_TIMEOUT, async {
                loop {
                    let line = lines.next_line().await.ok().flatten()?;
                    match serde_json::from_str::<Frame>(&line).ok()? {
                        Frame::Ack { id: got, .. } if got == id => return Some(None),
                        Frame::Response { id: got, body } if got == id => return Some(body),
                        _ => {}
                    }
                }
            })
            .await;
            match (answer, &command) {
                (Ok(Some(_)), OperatorCommand::Write { .. }) => break,
                (Ok(Some(body)), OperatorCommand::Ping { device }) => {
                    if let Some(body) = body {
                        check_ping(&world, clock.now(), device, &body);
                    }
                    break;
                }
                // A ping nobody answers in time is given up; a write is not.
                (_, OperatorCommand::Ping { .. }) => {
                    connection = None;
                    break;
                }
                _ => connection = None,
            }
        }
    }
}

fn check_ping(world: &World, now: Timestamp, device: &DeviceId, body: &[u8]) {
    match serde_json::from_slice::<CommandReply<PingReply>>(body) {
        Ok(CommandReply::Ok(reply)) if reply.device_id == *device => {
            world.probe("command answered");
            world.trace(
                now,
                "operator",
                format_args!("ping {device}: up {} s", reply.uptime_s),
            );
        }
        other => world.violation(Violation::at(
            now,
            Invariant::Isolation,
            format!("a ping to {device} was answered with {other:?}"),
        )),
    }
}
