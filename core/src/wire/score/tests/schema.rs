//! docs/score.schema.json against the agent: the schema accepts what
//! [`PodmanV0Score::from_json`] accepts and rejects what it rejects, but for
//! the rules JSON Schema cannot express, which are marked
//! [`Verdict::AgentOnly`] in the case table and listed in the schema's
//! description.
//!
//! The schema is compiled by `boon`, a 2020-12 validator independent of
//! schemars, which checks it against the draft's meta-schema first and reads
//! its ECMA-262 patterns through the regex crate.

use serde_json::{json, Value};

use super::cases::{Verdict, CASES};
use crate::wire::names::MAX_LABEL_LEN;
use crate::wire::{score_json_schema, PodmanV0Score};

/// The score's JSON Schema, compiled.
struct ScoreSchema {
    schemas: boon::Schemas,
    index: boon::SchemaIndex,
}

impl ScoreSchema {
    fn compile() -> Self {
        let schema: Value = serde_json::from_str(&score_json_schema()).unwrap();
        let mut compiler = boon::Compiler::new();
        compiler.add_resource("score.schema.json", schema).unwrap();
        let mut schemas = boon::Schemas::new();
        let index = compiler
            .compile("score.schema.json", &mut schemas)
            .unwrap_or_else(|e| panic!("the schema does not compile: {e:#}"));
        Self { schemas, index }
    }

    fn accepts(&self, payload: &Value) -> bool {
        self.schemas.validate(payload, self.index).is_ok()
    }
}

fn agent_accepts(payload: &Value) -> bool {
    PodmanV0Score::from_json(&serde_json::to_vec(payload).unwrap()).is_ok()
}

/// Every payload on which the agent and the schema disagree.
fn disagreements(schema: &ScoreSchema, payloads: impl IntoIterator<Item = Value>) -> Vec<String> {
    payloads
        .into_iter()
        .filter_map(|payload| {
            let (agent, schema) = (agent_accepts(&payload), schema.accepts(&payload));
            (agent != schema).then(|| format!("agent {agent}, schema {schema}: {payload}"))
        })
        .collect()
}

#[test]
fn schema_agrees_with_the_agent_on_every_case() {
    let schema = ScoreSchema::compile();
    let mut wrong = Vec::new();
    for &(what, json, verdict) in CASES {
        let agent = PodmanV0Score::from_json(json.as_bytes()).is_ok();
        let Ok(payload) = serde_json::from_str::<Value>(json) else {
            // Not JSON at all: nothing for a schema to judge.
            if agent || !matches!(verdict, Verdict::Invalid(_)) {
                wrong.push(format!("{what}: not JSON, so it must be Invalid"));
            }
            continue;
        };
        let got = (agent, schema.accepts(&payload));
        let expected = (verdict.agent_error().is_none(), verdict.schema_accepts());
        if got != expected {
            wrong.push(format!(
                "{what}: agent accepts {}, schema accepts {}; expected {verdict:?}",
                got.0, got.1
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Every string of up to three characters over an alphabet that has each
/// kind of character `validate_label` tells apart, and the length limits.
#[test]
fn schema_names_follow_validate_label_exactly() {
    const ALPHABET: [char; 10] = ['a', 'z', '0', '9', '-', '.', 'A', '_', '\n', 'é'];
    let mut names = vec![String::new()];
    let mut shorter = vec![String::new()];
    for _ in 0..3 {
        shorter = shorter
            .iter()
            .flat_map(|s| ALPHABET.iter().map(move |c| format!("{s}{c}")))
            .collect();
        names.extend(shorter.iter().cloned());
    }
    for len in [MAX_LABEL_LEN - 1, MAX_LABEL_LEN, MAX_LABEL_LEN + 1] {
        names.push("a".repeat(len));
        names.push(format!("a{}a", "-".repeat(len - 2)));
        names.push(format!("-{}", "a".repeat(len - 1)));
        names.push(format!("{}\n", "a".repeat(len - 1)));
    }
    let schema = ScoreSchema::compile();
    let payloads = names.iter().flat_map(|name| {
        [
            json!({ "services": [{ "name": name, "image": "i" }] }),
            json!({
                "services": [{ "name": "service", "image": "i" }],
                "init_containers": [{ "name": name, "image": "i" }],
            }),
        ]
    });
    let wrong = disagreements(&schema, payloads);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The image pattern, one character at a time over the Basic Multilingual
/// Plane (every Unicode white space is in it) and a few characters beyond.
/// The rule is "some character that is not white space", so a pattern that
/// judges each character as the agent does judges every string as it does.
#[test]
fn schema_image_rule_agrees_with_the_agent_on_every_character() {
    let schema = ScoreSchema::compile();
    let payloads = ('\0'..='\u{FFFF}')
        .chain(['\u{1F600}', '\u{E0020}', '\u{10FFFF}'])
        .map(|c| json!({ "services": [{ "name": "web", "image": c.to_string() }] }));
    let wrong = disagreements(&schema, payloads);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The env-name and volume patterns, one character at a time: those rules
/// only name ASCII characters, so Latin-1, the white space and a few
/// characters beyond stand for the rest.
#[test]
fn schema_env_and_volume_rules_agree_with_the_agent_on_every_character() {
    let schema = ScoreSchema::compile();
    let chars = ('\0'..='\u{FF}')
        .chain(('\u{100}'..='\u{FFFF}').filter(|c| c.is_whitespace()))
        .chain(['\u{FEFF}', '\u{1F600}', '\u{10FFFF}']);
    let payloads = chars.flat_map(|c| {
        let s = c.to_string();
        [
            json!({ "services": [{ "name": "web", "image": "i", "env": { s.clone(): "x" } }] }),
            json!({ "services": [{ "name": "web", "image": "i",
                "volumes": [{ "source": s, "target": format!("/{c}") }] }] }),
            json!({ "services": [{ "name": "web", "image": "i",
                "volumes": [{ "source": "data", "target": s }] }] }),
        ]
    });
    let wrong = disagreements(&schema, payloads);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
