//! Decoding a desired-state payload never panics; what decodes and validates
//! encodes back to an equal score.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podfleet_core::wire::PodmanV0Score;

fuzz_target!(|data: &[u8]| {
    if let Ok(score) = PodmanV0Score::from_json(data) {
        let again = PodmanV0Score::from_json(&score.to_json()).expect("a valid score re-decodes");
        assert_eq!(again, score);
    }
});
