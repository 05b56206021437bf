//! `podfleet ping|logs|exec`: requests to one device's agent, and how its
//! replies print.
//!
//! `logs` prints the text as the runtime returned it; `exec` prints the
//! program's stdout and stderr on podfleet's own and exits with the
//! program's exit code, like `podman exec`.

use std::time::Duration;

use podfleet_core::wire::{
    CommandReply, DeviceId, ExecReply, ExecRequest, LogsReply, LogsRequest, PingReply,
};
use serde::de::DeserializeOwned;

use crate::cli::args::{ExecArgs, LogsArgs};
use crate::cli::{Exit, Failure};

/// What a command printed and how `podfleet` exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Printed {
    /// For stdout.
    pub stdout: String,
    /// For stderr.
    pub stderr: String,
    /// The exit code.
    pub exit: Exit,
}

/// Decodes a reply body into the verb's value.
///
/// # Errors
/// [`Failure`] with the agent's error code and message, or saying the reply
/// did not decode.
pub fn decode<T: DeserializeOwned>(
    device: &DeviceId,
    body: serde_json::Value,
) -> Result<T, Failure> {
    match serde_json::from_value::<CommandReply<T>>(body) {
        Ok(CommandReply::Ok(value)) => Ok(value),
        Ok(CommandReply::Error(error)) => Err(Failure::failed(format!(
            "device {device} refused: {}: {}",
            serde_json::to_value(error.code)
                .ok()
                .and_then(|c| c.as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("{:?}", error.code)),
            error.message
        ))),
        Err(e) => Err(Failure::failed(format!(
            "device {device} sent a reply this version cannot read: {e}"
        ))),
    }
}

/// `ping`'s line: who answered, and how fast.
pub fn ping_line(reply: &PingReply, round_trip: Duration) -> String {
    format!(
        "{} answered in {} ms: agent {}, up {}\n",
        reply.device_id,
        round_trip.as_millis(),
        reply.agent_version,
        crate::cli::table::age(Duration::from_secs(reply.uptime_s))
    )
}

/// `logs`' request body.
pub fn logs_request(args: &LogsArgs) -> serde_json::Value {
    serde_json::to_value(LogsRequest {
        deployment: args.deployment.clone(),
        service: args.service.clone(),
        tail_lines: args.tail,
    })
    .unwrap_or_default()
}

/// `logs`' output: the raw text, and a note on stderr when the agent cut it.
pub fn logs_output(reply: LogsReply) -> Printed {
    let stderr = if reply.truncated {
        format!(
            "(container {}: older lines were cut to the agent's size limit)\n",
            reply.container_id
        )
    } else {
        String::new()
    };
    Printed {
        stdout: reply.text,
        stderr,
        exit: Exit::Success,
    }
}

/// `exec`'s request body.
pub fn exec_request(args: &ExecArgs) -> serde_json::Value {
    serde_json::to_value(ExecRequest {
        deployment: args.deployment.clone(),
        service: args.service.clone(),
        argv: args.argv.clone(),
        timeout_secs: args.timeout.as_secs().max(1),
    })
    .unwrap_or_default()
}

/// `exec`'s output: the program's streams, and its exit code as ours (1
/// for a code outside 0-255; 2 when it timed out).
pub fn exec_output(reply: ExecReply) -> Printed {
    let mut stderr = reply.stderr;
    if reply.truncated {
        stderr.push_str("(output was cut to the agent's size limit)\n");
    }
    let exit = match (reply.timed_out, reply.exit_code) {
        (true, _) | (false, None) => {
            stderr.push_str("(the program did not finish before --timeout and was abandoned)\n");
            Exit::TimedOut
        }
        (false, Some(0)) => Exit::Success,
        (false, Some(code)) => u8::try_from(code).map_or(Exit::Failed, Exit::Program),
    };
    Printed {
        stdout: reply.stdout,
        stderr,
        exit,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    fn device() -> DeviceId {
        DeviceId::new("rpi-01").unwrap()
    }

    #[test]
    fn replies_decode_or_name_the_agents_error() {
        let ping: PingReply = decode(
            &device(),
            json!({"ok": {"device_id": "rpi-01", "agent_version": "0.1.0", "uptime_s": 4000}}),
        )
        .unwrap();
        assert_eq!(
            ping_line(&ping, Duration::from_millis(12)),
            "rpi-01 answered in 12 ms: agent 0.1.0, up 1h\n"
        );
        let error = decode::<LogsReply>(
            &device(),
            json!({"error": {"code": "not_found", "message": "no service \"db\" in web"}}),
        )
        .unwrap_err();
        assert_eq!(
            error.message,
            "device rpi-01 refused: not_found: no service \"db\" in web"
        );
        let error = decode::<LogsReply>(&device(), json!({"ok": 3})).unwrap_err();
        assert!(error.message.contains("cannot read"), "{error}");
    }

    #[test]
    fn exec_exits_with_the_programs_code() {
        let reply = |exit_code, timed_out| ExecReply {
            exit_code,
            stdout: "out\n".into(),
            stderr: "err\n".into(),
            truncated: false,
            timed_out,
        };
        assert_eq!(exec_output(reply(Some(0), false)).exit, Exit::Success);
        assert_eq!(exec_output(reply(Some(3), false)).exit.code(), 3);
        assert_eq!(exec_output(reply(Some(-1), false)).exit, Exit::Failed);
        assert_eq!(exec_output(reply(Some(256), false)).exit, Exit::Failed);
        let timed_out = exec_output(reply(None, true));
        assert_eq!(timed_out.exit, Exit::TimedOut);
        assert_eq!(timed_out.stdout, "out\n");
        assert!(timed_out
            .stderr
            .starts_with("err\n(the program did not finish"));
    }

    #[test]
    fn logs_print_raw_and_note_a_cut() {
        let printed = logs_output(LogsReply {
            container_id: "3f2a".into(),
            text: "a\nb\n".into(),
            truncated: true,
        });
        assert_eq!(printed.stdout, "a\nb\n");
        assert!(printed.stderr.contains("older lines were cut"));
    }
}
