use std::time::Duration;

use super::*;

fn at(seconds: u64) -> Timestamp {
    Timestamp::from_millis(seconds * 1000)
}

fn election(identity: &str) -> Election {
    Election::new(
        identity.into(),
        Duration::from_secs(15),
        Duration::from_secs(10),
    )
}

fn held_by(holder: &str, version: &str) -> Record {
    Record {
        holder: holder.into(),
        duration: Duration::from_secs(15),
        transitions: 2,
        renewed: Some("then".into()),
        resource_version: Some(version.into()),
    }
}

#[test]
fn a_missing_lease_is_created_and_leads_until_the_renew_deadline() {
    let mut a = election("a");
    let Step::Create(record) = a.read(at(0), None, "now".into()) else {
        panic!("expected a create");
    };
    assert_eq!((record.holder.as_str(), record.transitions), ("a", 0));
    assert!(!a.is_leader(at(0)), "not before the write succeeded");
    a.written(at(0));
    assert!(a.is_leader(at(9)));
    assert!(
        !a.is_leader(at(10)),
        "renew_deadline passed without a renewal"
    );
}

#[test]
fn a_held_lease_is_taken_only_after_it_stood_still_for_its_duration() {
    let mut b = election("b");
    assert_eq!(
        b.read(at(100), Some(held_by("a", "1")), "now".into()),
        Step::Wait
    );
    // The holder renews: the record changes, the wait starts again.
    let mut renewed = held_by("a", "2");
    renewed.renewed = Some("later".into());
    assert_eq!(
        b.read(at(110), Some(renewed.clone()), "now".into()),
        Step::Wait
    );
    assert_eq!(
        b.read(at(124), Some(renewed.clone()), "now".into()),
        Step::Wait
    );
    // Fifteen seconds without a change on b's own clock: b takes it, with
    // the resourceVersion read, so a racing writer loses.
    let Step::Update(record) = b.read(at(125), Some(renewed), "now".into()) else {
        panic!("expected a take-over");
    };
    assert_eq!(record.holder, "b");
    assert_eq!(record.transitions, 3);
    assert_eq!(record.resource_version.as_deref(), Some("2"));
}

#[test]
fn the_holder_renews_and_a_released_lease_is_taken_at_once() {
    let mut a = election("a");
    let Step::Update(record) = a.read(at(0), Some(held_by("a", "5")), "now".into()) else {
        panic!("expected a renewal");
    };
    assert_eq!(
        (record.transitions, record.resource_version.as_deref()),
        (2, Some("5"))
    );
    a.written(at(0));
    let released = a.release("now".into()).expect("a leads, so it releases");
    assert_eq!(released.holder, "");
    assert!(!a.is_leader(at(1)));
    let mut b = election("b");
    assert!(
        matches!(b.read(at(1), Some(released), "now".into()), Step::Update(r) if r.holder == "b")
    );
    assert_eq!(election("c").release("now".into()), None, "c never led");
}
