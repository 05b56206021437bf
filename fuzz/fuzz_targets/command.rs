//! The command protocol decoded from arbitrary bytes: the `logs` and `exec`
//! requests, `PingReply`, `LogsReply`, `ExecReply`, `CommandError`, and
//! `CommandReply<T>` around each reply.
//!
//! Checks: decoding never panics, whatever decodes survives
//! encode -> decode unchanged with a canonical encoding, and an error reply
//! displays. See `podfleet_fuzz::wire::command`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| podfleet_fuzz::wire::command(data));
