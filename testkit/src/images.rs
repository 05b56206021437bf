//! The image catalogue: every image the tests, the simulator and the fuzzer
//! put in a score, and how a container from it behaves in the
//! [`FakeRuntime`].
//!
//! One name, one behaviour, defined here only: a driver that wants another
//! behaviour uses another image. [`runtime`] is a fake with the whole
//! catalogue installed: every image but [`MISSING`] preloaded in its store
//! and pushed to its registry ([`SIZE`] bytes each, [`BASE_SIZE`] of them a
//! base layer all share, as images built from one distribution do); the
//! named groups are what the generators pick from.

use std::time::Duration;

use crate::registry::Layer;
use crate::runtime::{Behaviour, FakeRuntime};

/// Runs until stopped, and stops at once on its signal.
pub const A_1: &str = "img/a:1";
/// [`A_1`]'s next version: the same program, another image.
pub const A_2: &str = "img/a:2";
/// Runs until stopped, and stops at once on its signal.
pub const APP_1: &str = "img/app:1";
/// Runs until stopped, but ignores its stop signal: only the kill after the
/// grace ends it.
pub const APP_2: &str = "img/app:2";
/// Runs until stopped, and takes 2 s to exit after its signal.
pub const SLOW_STOP: &str = "img/slow-stop:1";
/// Runs until stopped, and ignores its stop signal.
pub const IGNORE_STOP: &str = "img/ignore-stop:1";
/// Exits with code 1 seven seconds after every start.
pub const CRASH: &str = "img/crash:1";
/// Exits with code 1 twenty seconds after every start: a crash loop that
/// never ends.
pub const CRASHLOOP: &str = "img/crashloop:1";
/// An init container that exits 0 after a second.
pub const INIT_OK: &str = "img/init-ok:1";
/// An init container that exits 0 after a second, inspect saying "running"
/// for 120 ms more: the libpod race, shorter than the reconciler's 200 ms
/// retry.
pub const INIT_RACE: &str = "img/init-race:1";
/// [`INIT_RACE`], with inspect lagging 2 s: longer than the retry.
pub const INIT_RACE_LONG: &str = "img/init-race-long:1";
/// An init container that exits with [`INIT_FAIL_CODE`] after a second.
pub const INIT_FAIL: &str = "img/init-fail:1";
/// The exit code of [`INIT_FAIL`].
pub const INIT_FAIL_CODE: i64 = 5;
/// An init container that never exits: its timeout ends it.
pub const INIT_HANG: &str = "img/init-hang:1";
/// An image the runtime does not have when it starts.
pub const MISSING: &str = "img/missing:1";

/// The size of every catalogue image in the registry: two seconds of
/// transfer at the fake registry's default speed into an empty store.
pub const SIZE: u64 = 20_000_000;

/// The size of the base layer every catalogue image starts from: a store
/// that holds one catalogue image fetches only the other
/// `SIZE - BASE_SIZE` bytes of the next.
pub const BASE_SIZE: u64 = 16_000_000;

/// The layers of the catalogue image `image`: the shared base, then its own.
pub fn layers(image: &str) -> Vec<Layer> {
    vec![
        Layer::named("catalogue base", BASE_SIZE),
        Layer::named(image, SIZE - BASE_SIZE),
    ]
}

/// Every image of the catalogue.
pub const ALL: [&str; 14] = [
    A_1,
    A_2,
    APP_1,
    APP_2,
    SLOW_STOP,
    IGNORE_STOP,
    CRASH,
    CRASHLOOP,
    INIT_OK,
    INIT_RACE,
    INIT_RACE_LONG,
    INIT_FAIL,
    INIT_HANG,
    MISSING,
];

/// Services that run until stopped, each stopping in its own way.
pub const STEADY_SERVICES: [&str; 3] = [APP_1, APP_2, SLOW_STOP];
/// Services that exit by themselves, again and again.
pub const CRASHING_SERVICES: [&str; 2] = [CRASH, CRASHLOOP];
/// Init containers that succeed, plainly or through the libpod race.
pub const GOOD_INITS: [&str; 3] = [INIT_OK, INIT_RACE, INIT_RACE_LONG];
/// Init containers that can never succeed.
pub const DOOMED_INITS: [&str; 2] = [INIT_FAIL, INIT_HANG];

/// How a container from `image` behaves; `None` for an image the catalogue
/// does not list (the fake runs it forever).
pub fn behaviour(image: &str) -> Option<Behaviour> {
    let second = Duration::from_secs(1);
    let ignores_stop = Behaviour {
        ignores_stop_signal: true,
        ..Behaviour::default()
    };
    let race = |lag| Behaviour {
        inspect_lag: lag,
        ..Behaviour::exits(0, second)
    };
    Some(match image {
        A_1 | A_2 | APP_1 | INIT_HANG | MISSING => Behaviour::default(),
        APP_2 | IGNORE_STOP => ignores_stop,
        SLOW_STOP => Behaviour {
            stop_delay: Duration::from_secs(2),
            ..Behaviour::default()
        },
        CRASH => Behaviour::exits(1, Duration::from_secs(7)),
        CRASHLOOP => Behaviour::exits(1, Duration::from_secs(20)),
        INIT_OK => Behaviour::exits(0, second),
        INIT_RACE => race(Duration::from_millis(120)),
        INIT_RACE_LONG => race(Duration::from_secs(2)),
        INIT_FAIL => Behaviour::exits(INIT_FAIL_CODE, second),
        _ => return None,
    })
}

/// Configures `runtime` with every image's behaviour, pushes every image
/// but [`MISSING`] to its registry, and takes [`MISSING`] out of its store:
/// that one can be neither created from nor pulled.
pub fn install(runtime: &mut FakeRuntime) {
    for image in ALL {
        if let Some(behaviour) = behaviour(image) {
            runtime.set_behaviour(image, behaviour);
        }
        if image != MISSING {
            runtime.registry_mut().push_layers(image, layers(image));
        }
    }
    runtime.remove_image(MISSING);
}

/// A fake runtime with the whole catalogue installed.
pub fn runtime() -> FakeRuntime {
    let mut runtime = FakeRuntime::new();
    install(&mut runtime);
    runtime
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_image_has_a_behaviour() {
        for image in ALL {
            assert!(behaviour(image).is_some(), "{image}");
        }
        assert_eq!(behaviour("img/unknown:1"), None);
    }
}
