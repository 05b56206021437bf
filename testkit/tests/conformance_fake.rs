#![allow(clippy::unwrap_used)]
//! The runtime conformance suite against the fake runtime, on tokio's
//! paused clock: the same checks e2e/tests/runtime_conformance.rs runs
//! against real podman, so the fake cannot drift from it.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use podfleet_agent::event_loop::TokioClock;
use podfleet_testkit::conformance::{programs, run_check, Fixture, CHECKS, EXEC_CHECKS};
use podfleet_testkit::SharedFake;
use podfleet_testkit::{FakeRuntime, ImageStore};

/// The checks the fake declares unsupported: it runs no programs, so the
/// `exec` command has nothing to run (the `exec` runtime op answers from
/// testkit::shell's model of a setup script instead). Each must still fail
/// against it, so that this list cannot outlive its reason.
const UNSUPPORTED: &[&str] = EXEC_CHECKS;

fn tokio_pause(duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(tokio::time::sleep(duration))
}

#[tokio::test(start_paused = true)]
async fn the_fake_behaves_as_the_conformance_suite_states() {
    let fixture = Fixture {
        image: "docker.io/library/busybox:1.36".to_owned(),
        missing_image: "localhost/podfleet-test:does-not-exist".to_owned(),
        prefix: "pfconf".to_owned(),
        pause: tokio_pause,
    };
    // The store holds the fixture's image and nothing else, as the test
    // machine's podman does.
    let mut fake = FakeRuntime::new();
    *fake.images_mut() = ImageStore::empty();
    fake.add_image(&fixture.image);
    for (args, behaviour) in programs::fake_behaviours() {
        fake.set_program(args, behaviour);
    }
    let runtime = SharedFake::new(fake, TokioClock::start());

    let mut passed = Vec::new();
    let mut failed = Vec::new();
    let mut unsupported = Vec::new();
    for &check in CHECKS {
        // Virtual time: a check that hangs is cut off at once.
        let result = tokio::time::timeout(
            Duration::from_secs(30),
            run_check(&runtime, &fixture, check),
        )
        .await
        .unwrap_or_else(|_| Some(Err("no answer within 30 s".to_owned())))
        .unwrap();
        match (UNSUPPORTED.contains(&check), result) {
            (false, Ok(())) => {
                println!("ok           {check}");
                passed.push(check);
            }
            (false, Err(why)) => {
                println!("FAIL         {check}: {why}");
                failed.push((check, why));
            }
            (true, Err(why)) => {
                println!("unsupported  {check}: {why}");
                unsupported.push(check);
            }
            (true, Ok(())) => panic!("{check} is declared unsupported but passes"),
        }
    }
    println!(
        "{} checks passed, {} unsupported",
        passed.len(),
        unsupported.len()
    );

    assert!(
        failed.is_empty(),
        "the fake disagrees with podman: {failed:#?}"
    );
    assert_eq!(unsupported, UNSUPPORTED);
    assert_eq!(passed.len() + unsupported.len(), CHECKS.len());
    assert!(
        runtime.with(|fake| fake.containers().is_empty()),
        "the checks left containers behind"
    );
}
