//! The session as a state machine: each test feeds inputs and reads the
//! outputs it drains.

use super::*;

fn device() -> DeviceId {
    DeviceId::new("rpi-01").unwrap()
}

fn name(n: &str) -> DeploymentName {
    DeploymentName::new(n).unwrap()
}

fn at(ms: u64) -> Timestamp {
    Timestamp::from_millis(ms)
}

fn entry(subject: &str, operation: Operation, revision: u64, pending: u64) -> WatchedEntry {
    WatchedEntry {
        subject: subject.to_owned(),
        operation,
        revision,
        pending,
        payload: if operation == Operation::Put {
            b"{}".to_vec()
        } else {
            Vec::new()
        },
    }
}

fn put(deployment: &str, revision: u64, pending: u64) -> Input {
    Input::Entry(entry(
        &format!("$KV.podfleet-desired.rpi-01.{deployment}"),
        Operation::Put,
        revision,
        pending,
    ))
}

fn drain(session: &mut Session) -> Vec<Output> {
    std::iter::from_fn(|| session.poll_output()).collect()
}

/// A session connected, with a watch that has `pending` entries to deliver.
fn watching(pending: u64) -> (Session, Vec<Output>) {
    let mut session = Session::new(Config::new(device()), at(0));
    session.handle(at(0), Input::Connected);
    assert_eq!(drain(&mut session), [Output::StartWatch]);
    session.handle(at(0), Input::WatchStarted { pending });
    let out = drain(&mut session);
    (session, out)
}

fn snapshot(names: &[&str]) -> Output {
    Output::Deliver(Inbound::Snapshot {
        present: names.iter().map(|n| name(n)).collect(),
    })
}

#[test]
fn subjects_name_the_device() {
    let filter = KeyFilter::desired_of(device());
    assert_eq!(filter.subject_filter(), "$KV.podfleet-desired.rpi-01.*");
    assert_eq!(
        KeyFilter::every_device("podfleet-state").subject_filter(),
        "$KV.podfleet-state.*.*"
    );
}

#[test]
fn entries_are_classified_by_operation() {
    let filter = KeyFilter::desired_of(device());
    let subject = "$KV.podfleet-desired.rpi-01.shop";
    let key = DeploymentKey::parse("rpi-01.shop").unwrap();
    assert_eq!(
        filter.classify(entry(subject, Operation::Put, 7, 0)),
        Ok(Change::Put {
            key: key.clone(),
            revision: Revision::new(7),
            value: b"{}".to_vec()
        })
    );
    for op in ["DEL", "PURGE"] {
        let delete = entry(subject, Operation::from_header(Some(op)), 8, 0);
        assert_eq!(
            filter.classify(delete),
            Ok(Change::Delete {
                key: key.clone(),
                revision: Revision::new(8)
            })
        );
    }
    assert_eq!(Operation::from_header(None), Operation::Put);

    // And through the session: a put and a delete, in order.
    let (mut session, _) = watching(2);
    session.handle(at(1), put("shop", 7, 1));
    session.handle(at(1), Input::Entry(entry(subject, Operation::Delete, 8, 0)));
    assert_eq!(
        drain(&mut session),
        [
            Output::Deliver(Inbound::Put {
                deployment: name("shop"),
                revision: Revision::new(7),
                value: b"{}".to_vec()
            }),
            Output::Deliver(Inbound::Delete {
                deployment: name("shop"),
                revision: Revision::new(8)
            }),
            snapshot(&[]),
        ]
    );
}

#[test]
fn bad_keys_are_skipped_with_a_reason() {
    let filter = KeyFilter::desired_of(device());
    let classify = |subject: &str| filter.classify(entry(subject, Operation::Put, 1, 0));
    let bad = classify("$KV.podfleet-desired.rpi-01.Shop");
    assert!(
        matches!(&bad, Err(SkipReason::BadKey { error, .. }) if error.contains("invalid deployment name \"Shop\"")),
        "{bad:?}"
    );
    let other = classify("$KV.podfleet-desired.rpi-02.shop");
    assert!(
        matches!(&other, Err(SkipReason::OtherDevice { device, .. }) if device.as_str() == "rpi-02"),
        "{other:?}"
    );
    let elsewhere = classify("$KV.podfleet-state.rpi-01.shop");
    assert!(
        matches!(elsewhere, Err(SkipReason::NotInBucket { .. })),
        "{elsewhere:?}"
    );
    // A fleet-wide filter takes every device's keys.
    let fleet = KeyFilter::every_device(DESIRED_BUCKET);
    assert!(fleet
        .classify(entry(
            "$KV.podfleet-desired.rpi-02.shop",
            Operation::Put,
            1,
            0
        ))
        .is_ok());

    // The session hands the reason out for the log, and carries on.
    let (mut session, _) = watching(2);
    session.handle(
        at(1),
        Input::Entry(entry(
            "$KV.podfleet-desired.rpi-02.shop",
            Operation::Put,
            1,
            1,
        )),
    );
    assert!(
        matches!(
            &drain(&mut session)[..],
            [Output::Skipped {
                reason: SkipReason::OtherDevice { .. }
            }]
        ),
        "another device's key is skipped, and the snapshot is not over"
    );
}

#[test]
fn an_empty_bucket_completes_the_snapshot_at_once() {
    let (session, out) = watching(0);
    assert_eq!(out, [snapshot(&[])]);
    assert!(session.is_synced());
}

#[test]
fn the_snapshot_ends_with_the_last_pending_entry_and_holds_only_puts() {
    let (mut session, out) = watching(3);
    assert_eq!(out, []);
    session.handle(at(1), put("a", 1, 2));
    session.handle(
        at(1),
        Input::Entry(entry(
            "$KV.podfleet-desired.rpi-01.old",
            Operation::Delete,
            2,
            1,
        )),
    );
    assert!(!session.is_synced());
    session.handle(at(1), put("b", 3, 0));
    let out = drain(&mut session);
    assert_eq!(out.len(), 4, "{out:?}");
    assert_eq!(out[3], snapshot(&["a", "b"]));
    // Later entries are live changes, not a new snapshot.
    session.handle(at(2), put("c", 4, 0));
    assert!(matches!(
        &drain(&mut session)[..],
        [Output::Deliver(Inbound::Put { .. })]
    ));
}

#[test]
fn a_skipped_last_entry_still_ends_the_snapshot() {
    let (mut session, _) = watching(1);
    session.handle(
        at(1),
        Input::Entry(entry(
            "$KV.podfleet-desired.rpi-01.Bad",
            Operation::Put,
            1,
            0,
        )),
    );
    let out = drain(&mut session);
    assert!(
        matches!(&out[..], [Output::Skipped { .. }, Output::Deliver(Inbound::Snapshot { present })] if present.is_empty()),
        "{out:?}"
    );
}

#[test]
fn a_failed_watch_is_retried_after_a_capped_backoff_that_resets_on_success() {
    let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(4));
    let mut session = Session::new(Config::new(device()).watch_backoff(backoff), at(0));
    assert_eq!(session.poll_timeout(), None);
    session.handle(at(0), Input::Connected);
    assert_eq!(drain(&mut session), [Output::StartWatch]);
    let mut now = 0;
    for expected_s in [1, 2, 4, 4] {
        session.handle(at(now), Input::WatchFailed);
        let retry_at = session.poll_timeout().unwrap();
        assert_eq!(retry_at, at(now + expected_s * 1000));
        // Nothing happens before the deadline.
        session.handle(at(retry_at.as_millis() - 1), Input::Timeout);
        assert_eq!(drain(&mut session), []);
        now = retry_at.as_millis();
        session.handle(at(now), Input::Timeout);
        assert_eq!(drain(&mut session), [Output::StartWatch]);
        assert_eq!(session.poll_timeout(), None);
    }
    session.handle(at(now), Input::WatchStarted { pending: 0 });
    assert_eq!(drain(&mut session), [snapshot(&[])]);
    // A watch that ends later starts over from the first delay.
    session.handle(at(now), Input::WatchEnded);
    assert_eq!(session.poll_timeout(), Some(at(now + 1000)));
}

#[test]
fn created_buckets_retry_the_watch_at_once() {
    let (mut session, _) = watching(0);
    session.handle(at(5), Input::WatchEnded);
    session.handle(at(5), Input::WatchFailed);
    assert!(session.poll_timeout().is_some());
    session.handle(at(6), Input::BucketsCreated);
    assert_eq!(drain(&mut session), [Output::StartWatch]);
    assert_eq!(session.poll_timeout(), None);
    // With a watch under way there is nothing to retry.
    session.handle(at(7), Input::BucketsCreated);
    assert_eq!(drain(&mut session), []);
}

#[test]
fn a_reconnect_makes_a_fresh_watch_and_a_fresh_snapshot() {
    let (mut session, _) = watching(1);
    session.handle(at(1), put("a", 1, 0));
    assert_eq!(drain(&mut session).last(), Some(&snapshot(&["a"])));
    session.handle(at(2), Input::Disconnected);
    assert_eq!(session.poll_timeout(), None, "no retries while offline");
    // Entries of the dropped watch mean nothing.
    session.handle(at(2), put("a", 1, 0));
    assert!(matches!(
        &drain(&mut session)[..],
        [Output::Skipped {
            reason: SkipReason::NoWatch { .. }
        }]
    ));
    // A failed attempt before the disconnect does not slow the next one.
    session.handle(at(3), Input::Connected);
    assert_eq!(drain(&mut session), [Output::StartWatch]);
    session.handle(at(3), Input::WatchStarted { pending: 0 });
    assert_eq!(drain(&mut session), [snapshot(&[])]);
}

#[test]
fn commands_are_admitted_for_this_device_with_a_reply_subject() {
    let mut session = Session::new(Config::new(device()), at(0));
    let command = |subject: &str, reply_to: Option<&str>| {
        Input::Command(CommandMessage {
            subject: subject.to_owned(),
            reply_to: reply_to.map(str::to_owned),
            payload: b"{}".to_vec(),
        })
    };
    session.handle(
        at(0),
        command("device-commands.rpi-01.ping", Some("_INBOX.rpi-01.1")),
    );
    assert_eq!(
        drain(&mut session),
        [Output::Deliver(Inbound::Command(CommandRequest {
            verb: Verb::Ping,
            body: b"{}".to_vec(),
            reply_to: "_INBOX.rpi-01.1".into()
        }))]
    );
    session.handle(at(0), command("device-commands.rpi-01.ping", None));
    session.handle(at(0), command("device-commands.rpi-02.ping", Some("r")));
    assert!(matches!(
        &drain(&mut session)[..],
        [
            Output::Skipped {
                reason: SkipReason::NoReplySubject { .. }
            },
            Output::Skipped {
                reason: SkipReason::CommandForOtherDevice { .. }
            }
        ]
    ));
    session.handle(at(0), command("device-commands.rpi-01.reboot", Some("r")));
    let out = drain(&mut session);
    let [Output::Reply { reply_to, body }] = &out[..] else {
        panic!("{out:?}");
    };
    assert_eq!(reply_to, "r");
    let reply: CommandReply<()> = serde_json::from_slice(body).unwrap();
    assert!(
        matches!(&reply, CommandReply::Error(e) if e.code == ErrorCode::BadRequest && e.message.contains("reboot")),
        "{reply:?}"
    );
}

#[cfg(feature = "bugs")]
#[test]
fn the_planted_bug_ends_the_snapshot_one_entry_early() {
    let mut session = Session::new(
        Config::new(device()).inject_bugs(Bugs {
            snapshot_one_early: true,
        }),
        at(0),
    );
    session.handle(at(0), Input::Connected);
    session.handle(at(0), Input::WatchStarted { pending: 2 });
    session.handle(at(1), put("a", 1, 1));
    session.handle(at(1), put("b", 2, 0));
    let out = drain(&mut session);
    assert_eq!(out[2], snapshot(&["a"]), "{out:?}");
}
