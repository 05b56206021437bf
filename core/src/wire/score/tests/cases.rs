//! Every payload the score tests judge, with the verdict of the agent
//! ([`PodmanV0Score::from_json`](super::PodmanV0Score::from_json)) and of
//! docs/score.schema.json. One table, so a rule added to the validation
//! without a case, or a case the schema judges differently, shows up here.

/// What the agent and the JSON Schema make of a payload.
#[derive(Debug, Clone, Copy)]
pub(super) enum Verdict {
    /// Both accept it.
    Valid,
    /// Both reject it; the agent with this message (a `malformed score: `
    /// message is matched as a prefix, so it leaves out the line and column).
    Invalid(&'static str),
    /// The agent rejects it with this message, the schema accepts it: the
    /// rule spans several values or the JSON text, which JSON Schema cannot
    /// express. The schema's description lists these rules.
    AgentOnly(&'static str),
    /// The agent accepts it, the schema rejects it: serde also decodes a
    /// struct from an array of its field values, in declaration order, a
    /// form the schema (and docs/wire-format.md) does not describe.
    SchemaOnly,
}

impl Verdict {
    /// The agent's error message, or `None` when it accepts the payload.
    pub(super) fn agent_error(self) -> Option<&'static str> {
        match self {
            Verdict::Valid | Verdict::SchemaOnly => None,
            Verdict::Invalid(message) | Verdict::AgentOnly(message) => Some(message),
        }
    }

    /// Whether the JSON Schema accepts the payload.
    pub(super) fn schema_accepts(self) -> bool {
        matches!(self, Verdict::Valid | Verdict::AgentOnly(_))
    }
}

use Verdict::*;

/// `(what the case is, payload, verdict)`.
pub(super) const CASES: &[(&str, &str, Verdict)] = &[
    // Accepted by both.
    ("the smallest score", r#"{"services":[{"name":"web","image":"i"}]}"#, Valid),
    (
        "a legacy score, before init containers and lifecycle",
        r#"{"services":[{"name":"web","image":"localhost/web:1","env":{"A":"1"}}]}"#,
        Valid,
    ),
    (
        "a legacy score with every default spelled out",
        r#"{"services":[{"name":"web","image":"localhost/web:1","env":{"A":"1"},"args":[],"volumes":[],"ports":[]}],"init_containers":[],"lifecycle":null}"#,
        Valid,
    ),
    (
        "the full example of docs/wire-format.md",
        r#"{"services":[{"name":"web","image":"localhost/web:2","args":["--port","8080"],"env":{"A":"1","MODE":"prod"},"volumes":[{"source":"/srv/web","target":"/data","read_only":true}],"ports":[{"host_port":8080,"container_port":8080,"protocol":"tcp"}]},{"name":"worker","image":"localhost/worker:2","volumes":[{"source":"cache","target":"/cache"}]}],"init_containers":[{"name":"migrate","image":"localhost/migrate:2","args":["up"],"env":{"DB":"/data/db"},"timeout":120},{"name":"warm-cache","image":"localhost/warm:2","timeout":300}],"lifecycle":{"stop_signal":"SIGINT","grace_period_secs":10}}"#,
        Valid,
    ),
    (
        "unknown fields",
        r#"{"services":[{"name":"web","image":"i","healthcheck":{"cmd":"x"}}],"future_field":true,"lifecycle":{"stop_signal":"SIGINT","drain":1}}"#,
        Valid,
    ),
    (
        "init timeouts, absent and explicit",
        r#"{"services":[{"name":"web","image":"i"}],"init_containers":[{"name":"migrate","image":"m"},{"name":"warm","image":"w","timeout":7}]}"#,
        Valid,
    ),
    (
        "an init timeout of 1 s",
        r#"{"services":[{"name":"web","image":"i"}],"init_containers":[{"name":"m","image":"m","timeout":1}]}"#,
        Valid,
    ),
    ("an empty lifecycle", r#"{"services":[{"name":"web","image":"i"}],"lifecycle":{}}"#, Valid),
    (
        "a grace period of 0 s",
        r#"{"services":[{"name":"web","image":"i"}],"lifecycle":{"stop_signal":"SIGKILL","grace_period_secs":0}}"#,
        Valid,
    ),
    ("a one-digit name", r#"{"services":[{"name":"0","image":"i"}]}"#, Valid),
    (
        "a 63-character name",
        r#"{"services":[{"name":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx","image":"i"}]}"#,
        Valid,
    ),
    (
        "inner '-' in names",
        r#"{"services":[{"name":"rpi-01","image":"i"}],"init_containers":[{"name":"warm-cache-2","image":"m"}]}"#,
        Valid,
    ),
    (
        "an image with blanks around it",
        r#"{"services":[{"name":"web","image":" localhost/web:1 "}]}"#,
        Valid,
    ),
    (
        "env values may hold '=' and NUL",
        r#"{"services":[{"name":"web","image":"i","env":{"A":"x=y\u0000"}}]}"#,
        Valid,
    ),
    (
        "env names of any other character",
        r#"{"services":[{"name":"web","image":"i","env":{"_a b\né":"x"}}]}"#,
        Valid,
    ),
    (
        "a volume target with a newline",
        r#"{"services":[{"name":"web","image":"i","volumes":[{"source":"data","target":"/x\n"}]}]}"#,
        Valid,
    ),
    (
        "ports 1 and 65535",
        r#"{"services":[{"name":"web","image":"i","ports":[{"host_port":65535,"container_port":1}]}]}"#,
        Valid,
    ),
    (
        "one host port on tcp and on udp",
        r#"{"services":[{"name":"a","image":"i","ports":[{"host_port":53,"container_port":53}]},{"name":"b","image":"i","ports":[{"host_port":53,"container_port":53,"protocol":"udp"}]}]}"#,
        Valid,
    ),
    // Rejected by both.
    (
        "not JSON",
        r#"not json"#,
        Invalid("malformed score: expected ident"),
    ),
    (
        "an empty payload",
        r#""#,
        Invalid("malformed score: EOF while parsing a value"),
    ),
    (
        "no services field",
        r#"{}"#,
        Invalid("malformed score: missing field `services`"),
    ),
    (
        "services not a list",
        r#"{"services":3}"#,
        Invalid("malformed score: invalid type: integer `3`, expected a sequence"),
    ),
    (
        "a service without an image",
        r#"{"services":[{"name":"web"}]}"#,
        Invalid("malformed score: missing field `image`"),
    ),
    (
        "a signal's short name",
        r#"{"services":[{"name":"web","image":"i"}],"lifecycle":{"stop_signal":"TERM"}}"#,
        Invalid("malformed score: unknown stop signal \"TERM\": expected one of SIGHUP, SIGINT, SIGQUIT, SIGKILL, SIGUSR1, SIGUSR2, SIGTERM, SIGWINCH"),
    ),
    (
        "an unknown protocol",
        r#"{"services":[{"name":"web","image":"i","ports":[{"host_port":1,"container_port":1,"protocol":"sctp"}]}]}"#,
        Invalid("malformed score: unknown variant `sctp`, expected `tcp` or `udp`"),
    ),
    (
        "port 65536",
        r#"{"services":[{"name":"web","image":"i","ports":[{"host_port":65536,"container_port":1}]}]}"#,
        Invalid("malformed score: invalid value: integer `65536`, expected u16"),
    ),
    (
        "a negative grace period",
        r#"{"services":[{"name":"web","image":"i"}],"lifecycle":{"grace_period_secs":-1}}"#,
        Invalid("malformed score: invalid value: integer `-1`, expected u64"),
    ),
    (
        "a null list",
        r#"{"services":[{"name":"web","image":"i"}],"init_containers":null}"#,
        Invalid("malformed score: invalid type: null, expected a sequence"),
    ),
    (
        "no services",
        r#"{"services":[]}"#,
        Invalid("the score has no services: at least one is required"),
    ),
    (
        "an empty service name",
        r#"{"services":[{"name":"","image":"i"}]}"#,
        Invalid("invalid service name \"\": it is empty; the rule is 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit"),
    ),
    (
        "a 64-character name",
        r#"{"services":[{"name":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","image":"i"}]}"#,
        Invalid("invalid service name \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\": it is longer than 63 characters; the rule is 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit"),
    ),
    (
        "a service name with a dot",
        r#"{"services":[{"name":"web.v2","image":"i"}]}"#,
        Invalid("invalid service name \"web.v2\": it contains '.', the NATS token separator; the rule is 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit"),
    ),
    (
        "an upper-case service name",
        r#"{"services":[{"name":"Web","image":"i"}]}"#,
        Invalid("invalid service name \"Web\": it contains a character other than a-z, 0-9 or '-'; the rule is 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit"),
    ),
    (
        "an init container name with '_'",
        r#"{"services":[{"name":"web","image":"i"}],"init_containers":[{"name":"Bad_Name","image":"m"}]}"#,
        Invalid("invalid init container name \"Bad_Name\": it contains a character other than a-z, 0-9 or '-'; the rule is 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit"),
    ),
    (
        "a name with a trailing newline",
        r#"{"services":[{"name":"web\n","image":"i"}]}"#,
        Invalid("invalid service name \"web\\n\": it contains a character other than a-z, 0-9 or '-'; the rule is 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit"),
    ),
    (
        "a name with a non-ASCII letter",
        r#"{"services":[{"name":"café","image":"i"}]}"#,
        Invalid("invalid service name \"café\": it contains a character other than a-z, 0-9 or '-'; the rule is 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit"),
    ),
    (
        "a name with a leading '-'",
        r#"{"services":[{"name":"-web","image":"i"}]}"#,
        Invalid("invalid service name \"-web\": it starts or ends with '-'; the rule is 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit"),
    ),
    (
        "an init container name with a trailing '-'",
        r#"{"services":[{"name":"web","image":"i"}],"init_containers":[{"name":"m-","image":"m"}]}"#,
        Invalid("invalid init container name \"m-\": it starts or ends with '-'; the rule is 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit"),
    ),
    (
        "an empty image",
        r#"{"services":[{"name":"web","image":""}]}"#,
        Invalid("\"web\" has an empty image: every container needs an image reference"),
    ),
    (
        "a blank image",
        r#"{"services":[{"name":"web","image":" "}]}"#,
        Invalid("\"web\" has an empty image: every container needs an image reference"),
    ),
    (
        "an image of Unicode blanks",
        r#"{"services":[{"name":"web","image":"\t\n\u00a0\u2028\u3000"}]}"#,
        Invalid("\"web\" has an empty image: every container needs an image reference"),
    ),
    (
        "an init container's empty image",
        r#"{"services":[{"name":"web","image":"i"}],"init_containers":[{"name":"m","image":""}]}"#,
        Invalid("\"m\" has an empty image: every container needs an image reference"),
    ),
    (
        "an init timeout of 0 s",
        r#"{"services":[{"name":"web","image":"i"}],"init_containers":[{"name":"m","image":"m","timeout":0}]}"#,
        Invalid("init container \"m\" has a timeout of 0 s: the timeout must be at least 1 s"),
    ),
    (
        "an env name with '='",
        r#"{"services":[{"name":"web","image":"i","env":{"A=B":"x"}}]}"#,
        Invalid("\"web\" has invalid environment variable name \"A=B\": names must be non-empty and contain neither '=' nor NUL"),
    ),
    (
        "an empty env name",
        r#"{"services":[{"name":"web","image":"i","env":{"":"x"}}]}"#,
        Invalid("\"web\" has invalid environment variable name \"\": names must be non-empty and contain neither '=' nor NUL"),
    ),
    (
        "an init container's env name with NUL",
        r#"{"services":[{"name":"web","image":"i"}],"init_containers":[{"name":"m","image":"m","env":{"A\u0000":"x"}}]}"#,
        Invalid("\"m\" has invalid environment variable name \"A\\0\": names must be non-empty and contain neither '=' nor NUL"),
    ),
    (
        "an empty volume source",
        r#"{"services":[{"name":"web","image":"i","volumes":[{"source":"","target":"/x"}]}]}"#,
        Invalid("\"web\" has invalid volume \"\" -> \"/x\": the source must not be empty"),
    ),
    (
        "a relative volume target",
        r#"{"services":[{"name":"web","image":"i","volumes":[{"source":"/data","target":"relative"}]}]}"#,
        Invalid("\"web\" has invalid volume \"/data\" -> \"relative\": the target must be an absolute path"),
    ),
    (
        "':' in a volume source",
        r#"{"services":[{"name":"web","image":"i","volumes":[{"source":"/a:b","target":"/x","read_only":true}]}]}"#,
        Invalid("\"web\" has invalid volume \"/a:b\" -> \"/x\": paths must not contain ':'"),
    ),
    (
        "':' in an init container's volume target",
        r#"{"services":[{"name":"web","image":"i"}],"init_containers":[{"name":"m","image":"m","volumes":[{"source":"data","target":"/x:y"}]}]}"#,
        Invalid("\"m\" has invalid volume \"data\" -> \"/x:y\": paths must not contain ':'"),
    ),
    (
        "host port 0",
        r#"{"services":[{"name":"web","image":"i","ports":[{"host_port":0,"container_port":80}]}]}"#,
        Invalid("service \"web\" publishes port 0: ports must be 1-65535"),
    ),
    (
        "container port 0",
        r#"{"services":[{"name":"web","image":"i","ports":[{"host_port":80,"container_port":0}]}]}"#,
        Invalid("service \"web\" publishes port 0: ports must be 1-65535"),
    ),
    // Rejected by the agent only: the rules the schema cannot express.
    (
        "two services with one name",
        r#"{"services":[{"name":"web","image":"i"},{"name":"web","image":"j"}]}"#,
        AgentOnly("duplicate service name \"web\": service names must be unique"),
    ),
    (
        "two init containers with one name",
        r#"{"services":[{"name":"web","image":"i"}],"init_containers":[{"name":"m","image":"m"},{"name":"m","image":"m"}]}"#,
        AgentOnly("duplicate init container name \"m\": init container names must be unique"),
    ),
    (
        "a service and an init container with one name",
        r#"{"services":[{"name":"web","image":"i"}],"init_containers":[{"name":"web","image":"m"}]}"#,
        AgentOnly("\"web\" names both a service and an init container: names must be distinct"),
    ),
    (
        "one host port in two services",
        r#"{"services":[{"name":"a","image":"i","ports":[{"host_port":8080,"container_port":80}]},{"name":"b","image":"i","ports":[{"host_port":8080,"container_port":80}]}]}"#,
        AgentOnly("host port 8080/tcp is published by both \"a\" and \"b\": a host port can be published once"),
    ),
    (
        "one host port twice in one service",
        r#"{"services":[{"name":"web","image":"i","ports":[{"host_port":8080,"container_port":80},{"host_port":8080,"container_port":81,"protocol":"tcp"}]}]}"#,
        AgentOnly("host port 8080/tcp is published by both \"web\" and \"web\": a host port can be published once"),
    ),
    (
        "a field written twice",
        r#"{"services":[{"name":"web","image":"i"}],"services":[{"name":"web","image":"i"}]}"#,
        AgentOnly("malformed score: duplicate field `services`"),
    ),
    (
        "a port with a fraction",
        r#"{"services":[{"name":"web","image":"i","ports":[{"host_port":80.0,"container_port":80}]}]}"#,
        AgentOnly("malformed score: invalid type: floating point `80.0`, expected u16"),
    ),
    (
        "a timeout with an exponent",
        r#"{"services":[{"name":"web","image":"i"}],"init_containers":[{"name":"m","image":"m","timeout":1e2}]}"#,
        AgentOnly("malformed score: invalid type: floating point `100.0`, expected u64"),
    ),
    (
        "a grace period beyond 64 bits",
        r#"{"services":[{"name":"web","image":"i"}],"lifecycle":{"grace_period_secs":18446744073709551616}}"#,
        AgentOnly("malformed score: invalid type: floating point `1.8446744073709552e+19`, expected u64"),
    ),
    // Lifetimes.
    (
        "every lifetime, and null for the default",
        r#"{"services":[{"name":"web","image":"i"}],"lifetime":null}"#,
        Valid,
    ),
    (
        "a per_run score with a setup script",
        r#"{"services":[{"name":"job","image":"i","args":["run"],"setup_script":"apk add curl\n"}],"lifetime":"per_run"}"#,
        Valid,
    ),
    (
        "a no_launch score naming an existing container",
        r#"{"services":[{"name":"proxy","image":"docker.io/library/nginx@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef","container":"systemd-nginx_1.2"}],"lifetime":"no_launch"}"#,
        Valid,
    ),
    (
        "an unknown lifetime",
        r#"{"services":[{"name":"web","image":"i"}],"lifetime":"forever"}"#,
        Invalid("malformed score: unknown variant `forever`, expected one of `persistent`, `per_run`, `no_launch`"),
    ),
    (
        "no_launch with arguments",
        r#"{"services":[{"name":"web","image":"i","args":["x"]}],"lifetime":"no_launch"}"#,
        AgentOnly("\"web\" sets args, which lifetime no_launch does not take: podfleet never creates a no_launch deployment's containers, so what would create them is refused"),
    ),
    (
        "no_launch with a setup script",
        r#"{"services":[{"name":"web","image":"i","setup_script":"true"}],"lifetime":"no_launch"}"#,
        AgentOnly("\"web\" sets setup_script, which lifetime no_launch does not take: podfleet never creates a no_launch deployment's containers, so what would create them is refused"),
    ),
    (
        "no_launch with init containers",
        r#"{"services":[{"name":"web","image":"i"}],"init_containers":[{"name":"m","image":"m"}],"lifetime":"no_launch"}"#,
        AgentOnly("\"m\" sets init_containers, which lifetime no_launch does not take: podfleet never creates a no_launch deployment's containers, so what would create them is refused"),
    ),
    (
        "no_launch with a stop policy",
        r#"{"services":[{"name":"web","image":"i"}],"lifecycle":{"grace_period_secs":5},"lifetime":"no_launch"}"#,
        AgentOnly("the score sets lifecycle, which lifetime no_launch does not take: podfleet never creates a no_launch deployment's containers, so what would create them is refused"),
    ),
    (
        "no_launch with a restart",
        r#"{"services":[{"name":"web","image":"i"}],"restart":1,"lifetime":"no_launch"}"#,
        AgentOnly("the score sets restart, which lifetime no_launch does not take: podfleet never creates a no_launch deployment's containers, so what would create them is refused"),
    ),
    (
        "no_launch with no restart asked",
        r#"{"services":[{"name":"web","image":"i"}],"restart":0,"lifetime":"no_launch"}"#,
        Valid,
    ),
    (
        "a restarted per_run score",
        r#"{"services":[{"name":"job","image":"i"}],"restart":3,"lifetime":"per_run"}"#,
        Valid,
    ),
    (
        "restart null",
        r#"{"services":[{"name":"web","image":"i"}],"restart":null}"#,
        Valid,
    ),
    (
        "a negative restart",
        r#"{"services":[{"name":"web","image":"i"}],"restart":-1}"#,
        Invalid("malformed score: invalid value: integer `-1`, expected u64"),
    ),
    (
        "an existing container named by a persistent service",
        r#"{"services":[{"name":"web","image":"i","container":"nginx"}]}"#,
        AgentOnly("\"web\" sets container, which lifetime persistent does not take: only a no_launch service names an existing container"),
    ),
    (
        "a container name with a slash",
        r#"{"services":[{"name":"web","image":"i","container":"a/b"}],"lifetime":"no_launch"}"#,
        Invalid("service \"web\" names container \"a/b\": a container name is a letter or digit, then letters, digits, '_', '.' or '-', at most 253 bytes"),
    ),
    (
        "an empty setup script",
        r#"{"services":[{"name":"web","image":"i","setup_script":""}]}"#,
        Invalid("service \"web\" has a setup_script of 0 bytes: it must be 1 to 65536 bytes"),
    ),
    // Rejected by the schema only.
    ("a score written as arrays of field values", r#"[[["web","i"]]]"#, SchemaOnly),
];
