#![allow(clippy::unwrap_used)]
//! The runtime conformance suite against real podman, through the podman
//! adapter, on the harness's own API service.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use e2e::{test_image, unique_prefix, PodmanService};
use podfleet_agent::podman::PodmanRuntime;
use podfleet_testkit::conformance::{run_check, Fixture, CHECKS};

fn tokio_pause(duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(tokio::time::sleep(duration))
}

#[test]
fn podman_behaves_as_the_conformance_suite_states() {
    let service = PodmanService::start();
    let fixture = Fixture {
        image: test_image().to_owned(),
        missing_image: "localhost/podfleet-test:does-not-exist".to_owned(),
        prefix: unique_prefix("pfconf"),
        pause: tokio_pause,
    };
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let results = tokio.block_on(async {
        let runtime = PodmanRuntime::connect(service.socket()).await.unwrap();
        println!("podman API version {}", runtime.api_version());
        let mut results = Vec::new();
        for &check in CHECKS {
            let check_started = Instant::now();
            let result = tokio::time::timeout(
                Duration::from_secs(30),
                run_check(&runtime, &fixture, check),
            )
            .await
            .unwrap_or_else(|_| Some(Err("no answer within 30 s".to_owned())))
            .unwrap();
            let took = check_started.elapsed();
            match &result {
                Ok(()) => println!("ok    {check} ({took:.1?})"),
                Err(why) => println!("FAIL  {check} ({took:.1?}): {why}"),
            }
            results.push((check, result));
        }
        results
    });
    println!("{} checks in {:.1?}", results.len(), started.elapsed());
    assert_eq!(results.len(), CHECKS.len());
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "podman disagrees with the suite: {failed:#?}\npodman service log:\n{}",
        service.log()
    );
}
