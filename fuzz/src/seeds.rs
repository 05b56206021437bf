//! The seed corpora under fuzz/corpus/, generated from the wire tests'
//! fixtures: the insta snapshots (core/tests/snapshots/wire__*.snap) and the JSON
//! literals of core/tests/wire.rs, which include the legacy payloads.
//!
//! It also writes the libFuzzer dictionaries under fuzz/dict/: JSON syntax
//! plus every field name and enum value in the wire types' JSON schemas,
//! and the tokens of keys and subjects.
//!
//! `seed_corpus_is_current` fails when a committed seed or dictionary is
//! missing or stale; with `PODFLEET_BLESS=1` it writes them instead (and
//! removes `seed-*` files no fixture produces any more). `cargo xtask fuzz
//! seeds` runs it that way. Corpus files not named `seed-*` are left alone.
//!
//! The reconciler target reads its input as test-kit ops
//! (`podfleet_testkit::Op::decode_all`), so its seeds are op lists written
//! with `Op::encode`; every encoded seed is decoded back and compared.

#![allow(clippy::unwrap_used)] // a panic is how a test fails

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use podfleet_core::reconciler::fnv1a64;
use serde_json::Value;

use podfleet_testkit::ops::{
    Deployment, ErrorKind, InitSketch, LifecycleSketch, Mutation, Op, OpName, RawBytes,
    ScoreSketch, ServiceSketch, Wait,
};

/// A reconciler seed: the ops in the test kit's byte format, checked to
/// decode back.
fn encode_ops(ops: &[Op]) -> Vec<u8> {
    let out = Op::encode_all(ops);
    assert_eq!(Op::decode_all(&out), ops, "an encoded seed decodes back");
    out
}

fn core_tests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../core/tests")
}

/// A JSON payload from a fixture, with the name of its seed file.
struct Payload {
    name: String,
    text: String,
    value: Value,
}

/// Every payload of every wire snapshot (`wire__*.snap`; the reconciler's
/// transcripts beside them are text); an array snapshot gives one per element.
fn snapshot_payloads() -> Vec<Payload> {
    let dir = core_tests().join("snapshots");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "snap"))
        .filter(|path| {
            path.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("wire__"))
        })
        .collect();
    files.sort();
    let mut payloads = Vec::new();
    for path in files {
        let text = fs::read_to_string(&path).unwrap();
        // An insta snapshot: a `---`-delimited header, then the JSON body.
        let body = text
            .strip_prefix("---\n")
            .and_then(|rest| rest.split_once("\n---\n"))
            .map(|(_, body)| body.trim())
            .unwrap_or_else(|| panic!("{} is not an insta snapshot", path.display()));
        let value: Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("{} holds no JSON: {e}", path.display()));
        let stem = path.file_stem().unwrap().to_string_lossy();
        let stem = stem.strip_prefix("wire__").unwrap_or(&stem).to_owned();
        match &value {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    payloads.push(Payload {
                        name: format!("{stem}-{i}"),
                        text: item.to_string(),
                        value: item.clone(),
                    });
                }
            }
            _ => payloads.push(Payload {
                name: stem,
                text: body.to_owned(),
                value,
            }),
        }
    }
    payloads
}

/// The JSON objects written as raw string literals in core/tests/wire.rs:
/// the legacy and minimal payloads the snapshots do not show as sent.
fn literal_payloads() -> Vec<Payload> {
    let source = fs::read_to_string(core_tests().join("wire.rs")).unwrap();
    let mut payloads = Vec::new();
    let mut rest = source.as_str();
    while let Some(start) = rest.find("r#\"") {
        let after = &rest[start + 3..];
        let Some(end) = after.find("\"#") else { break };
        let text = &after[..end];
        rest = &after[end + 2..];
        if let Ok(value @ Value::Object(_)) = serde_json::from_str::<Value>(text) {
            payloads.push(Payload {
                name: format!("literal-{:08x}", fnv1a64(text.as_bytes()) as u32),
                text: text.to_owned(),
                value,
            });
        }
    }
    payloads
}

/// Which decoder targets a payload seeds: those with a type that decodes it
/// (validation aside), or all of them when none does, since a refused
/// fixture is as good a start as any.
fn decoder_targets(text: &str) -> Vec<&'static str> {
    use podfleet_core::wire::*;
    fn decodes<T: serde::de::DeserializeOwned>(text: &str) -> bool {
        serde_json::from_str::<T>(text).is_ok()
    }
    let mut targets = Vec::new();
    if decodes::<PodmanV0Score>(text) {
        targets.push("score");
    }
    if decodes::<DeploymentState>(text)
        || decodes::<FailureCause>(text)
        || decodes::<Heartbeat>(text)
    {
        targets.push("report");
    }
    if decodes::<LogsRequest>(text)
        || decodes::<ExecRequest>(text)
        || decodes::<CommandReply<PingReply>>(text)
        || decodes::<CommandReply<LogsReply>>(text)
        || decodes::<CommandReply<ExecReply>>(text)
    {
        targets.push("command");
    }
    if targets.is_empty() {
        targets = vec!["score", "report", "command"];
    }
    targets
}

/// Every string found under `key` anywhere in `value`.
fn strings_under(value: &Value, key: &str, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match v {
                    Value::String(s) if k == key => found.push(s.clone()),
                    _ => strings_under(v, key, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| strings_under(v, key, found)),
        _ => {}
    }
}

/// Identifiers, keys and subjects built from the fixtures' device ids,
/// deployment, service and container names.
fn name_seeds(payloads: &[Payload]) -> Vec<(String, Vec<u8>)> {
    let mut devices = Vec::new();
    let mut deployments = Vec::new();
    for payload in payloads {
        strings_under(&payload.value, "device_id", &mut devices);
        strings_under(&payload.value, "deployment", &mut deployments);
        strings_under(&payload.value, "name", &mut deployments);
        strings_under(&payload.value, "service", &mut deployments);
        strings_under(&payload.value, "container", &mut deployments);
    }
    devices.sort();
    devices.dedup();
    deployments.sort();
    deployments.dedup();
    let mut texts = Vec::new();
    for device in &devices {
        texts.push(device.clone());
        texts.push(format!("device-commands.{device}.ping"));
        texts.push(format!("device-commands.{device}.logs"));
        texts.push(format!("device-commands.{device}.exec"));
        for deployment in &deployments {
            texts.push(format!("{device}.{deployment}"));
        }
    }
    texts.extend(deployments.iter().cloned());
    texts.sort();
    texts.dedup();
    texts
        .into_iter()
        .map(|text| {
            let name = format!("{:08x}", fnv1a64(text.as_bytes()) as u32);
            (name, text.into_bytes())
        })
        .collect()
}

/// A seed's service: a plain one with the first environment variable.
fn service(name: u8, image: u8) -> ServiceSketch {
    ServiceSketch {
        env: Some((0, 0)),
        ..ServiceSketch::plain(name, image)
    }
}

fn init(name: u8, image: u8, timeout: Option<u8>) -> InitSketch {
    InitSketch {
        name,
        image,
        timeout,
        env: None,
    }
}

fn score(mut services: Vec<ServiceSketch>, inits: Vec<InitSketch>) -> ScoreSketch {
    ScoreSketch {
        service: services.remove(0),
        more_services: services,
        init_containers: inits,
        lifecycle: Some(LifecycleSketch {
            signal: Some(0),
            grace: Some(1),
        }),
        unknown_field: false,
        lifetime: 0,
    }
}

/// A service with setup script `script` (an index into
/// `podfleet_testkit::scripts::ALL`).
fn scripted(name: u8, image: u8, script: u8) -> ServiceSketch {
    ServiceSketch {
        setup_script: Some(script),
        ..service(name, image)
    }
}

/// A `no_launch` score whose services verify the base system's containers
/// (indices into `podfleet_testkit::base_system::NAMES`), on img/a:1.
fn verifying(containers: &[u8]) -> ScoreSketch {
    let mut services: Vec<ServiceSketch> = containers
        .iter()
        .map(|&c| ServiceSketch {
            container: Some(c),
            ..service(0, 0)
        })
        .collect();
    ScoreSketch {
        service: services.remove(0),
        more_services: services,
        init_containers: Vec::new(),
        lifecycle: None,
        unknown_field: false,
        lifetime: 2,
    }
}

/// Tours of the reconciler's features: each fixture score rolled out,
/// crashed, redelivered, restarted and deleted; then vocabulary scores
/// through init containers, the libpod race, timeouts, faults and restarts,
/// and through the lifetimes: setup scripts that provision, fail, hang or
/// are cut short by a restart, `per_run` jobs, and `no_launch` scores
/// verifying the base system's containers.
fn reconciler_seeds(payloads: &[Payload]) -> Vec<(String, Vec<u8>)> {
    use Deployment::{Cam, Relay, Shop};
    let mut seeds = Vec::new();
    for payload in payloads {
        if serde_json::from_str::<podfleet_core::wire::PodmanV0Score>(&payload.text).is_err() {
            continue;
        }
        let steps = [
            Op::PutRaw {
                deployment: Shop,
                bytes: RawBytes(payload.text.clone().into_bytes()),
            },
            Op::Advance(Wait::Seconds(5)),
            Op::Crash {
                deployment: Shop,
                service: 0,
                code: 1,
            },
            Op::Advance(Wait::Minutes(1)),
            Op::Redeliver {
                deployment: Shop,
                back: 0,
            },
            Op::RestartAgent {
                keep_cache: false,
                watch_snapshot: true,
            },
            Op::Advance(Wait::Minutes(1)),
            Op::Delete { deployment: Shop },
            Op::Advance(Wait::Seconds(30)),
            Op::Redeliver {
                deployment: Shop,
                back: 1,
            },
        ];
        seeds.push((payload.name.clone(), encode_ops(&steps)));
    }
    let tours: [(&str, Vec<Op>); 7] = [
        (
            "tour-init-race-then-update",
            vec![
                Op::Put {
                    deployment: Shop,
                    score: score(vec![service(0, 0), service(1, 3)], vec![init(0, 1, None)]),
                },
                Op::Advance(Wait::Seconds(3)),
                Op::Put {
                    deployment: Shop,
                    score: score(
                        vec![service(0, 1), service(1, 3)],
                        vec![init(1, 0, Some(0))],
                    ),
                },
                Op::Advance(Wait::Seconds(10)),
                Op::Crash {
                    deployment: Shop,
                    service: 1,
                    code: 2,
                },
                Op::Advance(Wait::Minutes(2)),
            ],
        ),
        (
            "tour-init-timeout-superseded",
            vec![
                Op::Put {
                    deployment: Cam,
                    score: score(vec![service(0, 0)], vec![init(0, 4, Some(1))]),
                },
                Op::Advance(Wait::CentiSeconds(150)),
                Op::Put {
                    deployment: Cam,
                    score: score(vec![service(0, 4)], vec![init(0, 230, Some(2))]),
                },
                Op::Advance(Wait::Seconds(5)),
                Op::PutMutated {
                    deployment: Cam,
                    score: score(vec![service(0, 0)], vec![]),
                    mutation: Mutation::Truncate { at: 20 },
                },
                Op::Advance(Wait::Seconds(40)),
            ],
        ),
        (
            "tour-faults-and-restarts",
            vec![
                Op::Fault {
                    op: OpName::Create,
                    kind: ErrorKind::Other,
                    after_effect: true,
                },
                Op::Put {
                    deployment: Shop,
                    score: score(vec![service(0, 0), service(2, 2)], vec![]),
                },
                Op::Advance(Wait::Seconds(20)),
                Op::Fault {
                    op: OpName::List,
                    kind: ErrorKind::Unavailable,
                    after_effect: false,
                },
                Op::RestartAgent {
                    keep_cache: true,
                    watch_snapshot: false,
                },
                Op::Advance(Wait::Minutes(1)),
                Op::ToggleImage { image: 0 },
                Op::Crash {
                    deployment: Shop,
                    service: 0,
                    code: 9,
                },
                Op::Advance(Wait::Minutes(1)),
                Op::ToggleImage { image: 0 },
                Op::Advance(Wait::Minutes(5)),
            ],
        ),
        (
            "tour-delete-and-late-redelivery",
            vec![
                Op::Put {
                    deployment: Shop,
                    score: score(vec![service(0, 0)], vec![]),
                },
                Op::Put {
                    deployment: Cam,
                    score: score(vec![service(1, 1)], vec![init(2, 3, None)]),
                },
                Op::Advance(Wait::Seconds(10)),
                Op::Delete { deployment: Shop },
                Op::Advance(Wait::Seconds(40)),
                Op::RestartAgent {
                    keep_cache: true,
                    watch_snapshot: true,
                },
                Op::Redeliver {
                    deployment: Shop,
                    back: 1,
                },
                Op::Reconnect,
                Op::Advance(Wait::Minutes(2)),
            ],
        ),
        (
            "tour-setup-scripts",
            vec![
                // Provisions slowly; the agent dies meanwhile.
                Op::Put {
                    deployment: Shop,
                    score: score(vec![scripted(0, 0, 1), scripted(1, 3, 2)], vec![]),
                },
                Op::Advance(Wait::Seconds(5)),
                Op::RestartAgent {
                    keep_cache: true,
                    watch_snapshot: true,
                },
                Op::Advance(Wait::Minutes(1)),
                // Fails with output, then one that hangs past the timeout.
                Op::Put {
                    deployment: Cam,
                    score: score(vec![scripted(0, 0, 3)], vec![]),
                },
                Op::Advance(Wait::Seconds(30)),
                Op::Fault {
                    op: OpName::Exec,
                    kind: ErrorKind::Unavailable,
                    after_effect: false,
                },
                Op::Put {
                    deployment: Cam,
                    score: score(vec![scripted(0, 0, 6)], vec![]),
                },
                Op::Advance(Wait::Minutes(6)),
                Op::Crash {
                    deployment: Shop,
                    service: 0,
                    code: 1,
                },
                Op::Advance(Wait::Minutes(2)),
            ],
        ),
        (
            "tour-per-run",
            vec![
                // img/init-ok:1 exits 0, img/crash:1 exits 1.
                Op::Put {
                    deployment: Relay,
                    score: ScoreSketch {
                        lifetime: 1,
                        ..score(
                            vec![scripted(0, 5, 0), service(1, 5)],
                            vec![init(0, 0, None)],
                        )
                    },
                },
                Op::Advance(Wait::Seconds(30)),
                Op::Redeliver {
                    deployment: Relay,
                    back: 0,
                },
                Op::Put {
                    deployment: Relay,
                    score: ScoreSketch {
                        lifetime: 1,
                        ..score(vec![service(0, 2)], vec![])
                    },
                },
                Op::Advance(Wait::Seconds(3)),
                Op::RestartAgent {
                    keep_cache: false,
                    watch_snapshot: true,
                },
                Op::Advance(Wait::Minutes(1)),
                Op::Put {
                    deployment: Relay,
                    score: score(vec![service(0, 0)], vec![]),
                },
                Op::Advance(Wait::Minutes(1)),
            ],
        ),
        (
            "tour-no-launch",
            vec![
                Op::Put {
                    deployment: Cam,
                    score: score(vec![service(0, 0)], vec![]),
                },
                Op::Advance(Wait::Seconds(10)),
                // Running, stopped, drifted and missing, in place of
                // podfleet's own container.
                Op::Put {
                    deployment: Cam,
                    score: verifying(&[0, 1, 2]),
                },
                Op::Advance(Wait::Seconds(30)),
                Op::Put {
                    deployment: Shop,
                    score: verifying(&[3]),
                },
                Op::Fault {
                    op: OpName::Inspect,
                    kind: ErrorKind::Unavailable,
                    after_effect: false,
                },
                Op::Advance(Wait::Minutes(1)),
                Op::ToggleImage { image: 0 },
                Op::Advance(Wait::Minutes(1)),
                Op::RestartAgent {
                    keep_cache: true,
                    watch_snapshot: true,
                },
                Op::Advance(Wait::Minutes(1)),
                Op::Delete { deployment: Cam },
                Op::Advance(Wait::Minutes(1)),
            ],
        ),
    ];
    for (name, steps) in tours {
        seeds.push((name.to_owned(), encode_ops(&steps)));
    }
    seeds
}

/// JSON tokens that are not podfleet's: syntax, escapes and the edges of
/// the integer types the wire uses.
const JSON_SYNTAX: [&str; 21] = [
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\"",
    "\\\\",
    "\\u0000",
    "\\ud800",
    "null",
    "true",
    "false",
    "-1",
    "0",
    "1e3",
    "4294967295",
    "65535",
    "65536",
    "18446744073709551615",
    "-9223372036854775808",
];

/// Every property name and enum or constant string value in `schema`.
fn schema_words(schema: &Value, fields: &mut BTreeSet<String>, values: &mut BTreeSet<String>) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::Object(properties)) = map.get("properties") {
                fields.extend(properties.keys().cloned());
            }
            if let Some(Value::Array(items)) = map.get("enum") {
                values.extend(items.iter().filter_map(Value::as_str).map(str::to_owned));
            }
            if let Some(Value::String(value)) = map.get("const") {
                values.insert(value.clone());
            }
            map.values().for_each(|v| schema_words(v, fields, values));
        }
        Value::Array(items) => items.iter().for_each(|v| schema_words(v, fields, values)),
        _ => {}
    }
}

/// A libFuzzer dictionary entry: the token, quoted and escaped.
fn dict_entry(token: &str) -> String {
    let mut quoted = String::from("\"");
    for byte in token.bytes() {
        match byte {
            b'"' | b'\\' => {
                quoted.push('\\');
                quoted.push(char::from(byte));
            }
            0x20..=0x7e => quoted.push(char::from(byte)),
            _ => quoted.push_str(&format!("\\x{byte:02x}")),
        }
    }
    quoted.push('"');
    quoted
}

/// fuzz/dict/json.dict: JSON syntax, then every field name (as a key) and
/// every enum value (as a string) of the wire types.
fn json_dictionary() -> String {
    use podfleet_core::wire::*;
    let schemas = [
        schemars::schema_for!(PodmanV0Score),
        schemars::schema_for!(DeploymentState),
        schemars::schema_for!(Heartbeat),
        schemars::schema_for!(LogsRequest),
        schemars::schema_for!(ExecRequest),
        schemars::schema_for!(CommandReply<PingReply>),
        schemars::schema_for!(CommandReply<LogsReply>),
        schemars::schema_for!(CommandReply<ExecReply>),
    ];
    let mut fields = BTreeSet::new();
    let mut values = BTreeSet::new();
    for schema in &schemas {
        schema_words(
            &serde_json::to_value(schema).unwrap(),
            &mut fields,
            &mut values,
        );
    }
    values.extend(Signal::ALL.map(|s| s.name().to_owned()));
    let mut text = String::from(
        "# Generated by fuzz/src/seeds.rs (cargo xtask fuzz seeds): do not edit.\n\
         # JSON syntax, then every field name and enum value of podfleet's wire types.\n",
    );
    for token in JSON_SYNTAX {
        text.push_str(&dict_entry(token));
        text.push('\n');
    }
    for field in &fields {
        text.push_str(&dict_entry(&format!("\"{field}\":")));
        text.push('\n');
    }
    for value in &values {
        text.push_str(&dict_entry(&format!("\"{value}\"")));
        text.push('\n');
    }
    text
}

/// fuzz/dict/names.dict: the tokens of keys and subjects, and a few
/// characters the label rule refuses.
fn names_dictionary() -> String {
    use podfleet_core::wire::names::COMMAND_SUBJECT_PREFIX;
    use podfleet_core::wire::Verb;
    let mut tokens = vec![
        COMMAND_SUBJECT_PREFIX.to_owned(),
        ".".into(),
        "*".into(),
        ">".into(),
    ];
    tokens.extend(Verb::ALL.map(|v| v.as_str().to_owned()));
    tokens.extend(["-", "_", " ", "A", "\0", "\u{e9}"].map(str::to_owned));
    tokens.push("a".repeat(63));
    let mut text = String::from(
        "# Generated by fuzz/src/seeds.rs (cargo xtask fuzz seeds): do not edit.\n\
         # Tokens of podfleet's keys and subjects.\n",
    );
    for token in tokens {
        text.push_str(&dict_entry(&token));
        text.push('\n');
    }
    text
}

/// Every seed file, by target and file name.
fn seed_corpus() -> BTreeMap<(&'static str, String), Vec<u8>> {
    let mut payloads = snapshot_payloads();
    payloads.extend(literal_payloads());
    let mut corpus = BTreeMap::new();
    for payload in &payloads {
        for target in decoder_targets(&payload.text) {
            corpus.insert(
                (target, format!("seed-{}.json", payload.name)),
                payload.text.clone().into_bytes(),
            );
        }
    }
    for (name, bytes) in name_seeds(&payloads) {
        corpus.insert(("names", format!("seed-{name}")), bytes);
    }
    for (name, bytes) in reconciler_seeds(&payloads) {
        corpus.insert(("reconciler", format!("seed-{name}")), bytes);
    }
    corpus
}

#[test]
fn seed_corpus_is_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let corpus = seed_corpus();
    let bless = std::env::var_os("PODFLEET_BLESS").is_some();
    let mut problems = Vec::new();
    let dicts = Path::new(env!("CARGO_MANIFEST_DIR")).join("dict");
    for (name, text) in [
        ("json.dict", json_dictionary()),
        ("names.dict", names_dictionary()),
    ] {
        let path = dicts.join(name);
        if fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
            continue;
        }
        if bless {
            fs::create_dir_all(&dicts).unwrap();
            fs::write(&path, text).unwrap();
        } else {
            problems.push(format!("{} is missing or stale", path.display()));
        }
    }
    for ((target, name), bytes) in &corpus {
        let path = root.join(target).join(name);
        if fs::read(&path).ok().as_ref() == Some(bytes) {
            continue;
        }
        if bless {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, bytes).unwrap();
        } else {
            problems.push(format!("{} is missing or stale", path.display()));
        }
    }
    for dir in fs::read_dir(&root).into_iter().flatten().flatten() {
        let target = dir.file_name().to_string_lossy().into_owned();
        for file in fs::read_dir(dir.path()).into_iter().flatten().flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            let generated = corpus.keys().any(|(t, n)| *t == target && *n == name);
            if name.starts_with("seed-") && !generated {
                if bless {
                    fs::remove_file(file.path()).unwrap();
                } else {
                    problems.push(format!("{} is no longer generated", file.path().display()));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the seed corpus is out of date: run `cargo xtask fuzz seeds` and commit fuzz/corpus/\n{}",
        problems.join("\n")
    );
}

#[test]
fn every_target_has_seeds() {
    let corpus = seed_corpus();
    for target in ["score", "report", "command", "names", "reconciler"] {
        let n = corpus.keys().filter(|(t, _)| *t == target).count();
        assert!(n >= 3, "only {n} seeds for {target}");
    }
}

#[test]
fn committed_corpus_replays_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    type Check = fn(&[u8]);
    let checks: [(&str, Check); 5] = [
        ("score", crate::wire::score),
        ("report", crate::wire::report),
        ("command", crate::wire::command),
        ("names", crate::names::names),
        ("reconciler", crate::scenario::run_bytes),
    ];
    for (target, check) in checks {
        for file in fs::read_dir(root.join(target))
            .into_iter()
            .flatten()
            .flatten()
        {
            check(&fs::read(file.path()).unwrap());
        }
    }
}
