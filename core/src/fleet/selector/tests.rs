use proptest::prelude::*;

use super::*;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// (selector, labels it matches, labels it does not match).
#[allow(clippy::type_complexity)]
const VALID: &[(&str, &[&[(&str, &str)]], &[&[(&str, &str)]])] = &[
    ("", &[&[], &[("site", "lyon")]], &[]),
    ("   ", &[&[]], &[]),
    (
        "site=lyon",
        &[&[("site", "lyon")], &[("site", "lyon"), ("tier", "edge")]],
        &[&[], &[("site", "paris")], &[("Site", "lyon")]],
    ),
    (
        "site==lyon",
        &[&[("site", "lyon")]],
        &[&[("site", "paris")]],
    ),
    (
        "site!=lyon",
        &[&[], &[("site", "paris")], &[("tier", "edge")]],
        &[&[("site", "lyon")]],
    ),
    (
        "tier in (edge,gw)",
        &[&[("tier", "edge")], &[("tier", "gw")]],
        &[&[], &[("tier", "core")]],
    ),
    (
        "tier notin (edge,gw)",
        &[&[], &[("tier", "core")]],
        &[&[("tier", "edge")], &[("tier", "gw")]],
    ),
    ("canary", &[&[("canary", "")], &[("canary", "yes")]], &[&[]]),
    ("!canary", &[&[], &[("site", "lyon")]], &[&[("canary", "")]]),
    ("site=", &[&[("site", "")]], &[&[], &[("site", "lyon")]]),
    (
        "site=lyon,tier in (edge,gw),!canary",
        &[&[("site", "lyon"), ("tier", "gw")]],
        &[
            &[("site", "lyon"), ("tier", "gw"), ("canary", "1")],
            &[("site", "lyon")],
            &[("site", "paris"), ("tier", "gw")],
        ],
    ),
    (
        "  site = lyon ,  tier   in(  edge ,gw ) , ! canary ",
        &[&[("site", "lyon"), ("tier", "edge")]],
        &[&[("site", "lyon"), ("tier", "edge"), ("canary", "x")]],
    ),
    (
        "example.com/role=gateway,app.kubernetes.io/name!=web-1",
        &[&[("example.com/role", "gateway")]],
        &[&[
            ("example.com/role", "gateway"),
            ("app.kubernetes.io/name", "web-1"),
        ]],
    ),
    (
        "Zone_A.b=Eu-West_1.x,zone in (a)",
        &[&[("Zone_A.b", "Eu-West_1.x"), ("zone", "a")]],
        &[&[("Zone_A.b", "Eu-West_1.x")]],
    ),
];

#[test]
fn valid_selectors_match_as_kubernetes_would() {
    for (text, yes, no) in VALID {
        let selector = Selector::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        for l in *yes {
            assert!(selector.matches(&labels(l)), "{text:?} should match {l:?}");
        }
        for l in *no {
            assert!(
                !selector.matches(&labels(l)),
                "{text:?} should not match {l:?}"
            );
        }
        let canonical = selector.to_string();
        assert_eq!(
            Selector::parse(&canonical),
            Ok(selector),
            "{text:?} -> {canonical:?}"
        );
    }
}

#[test]
fn display_is_canonical() {
    let cases = [
        ("", ""),
        (" site == lyon ", "site=lyon"),
        ("tier in ( gw , edge, gw )", "tier in (edge,gw)"),
        ("tier notin(b)", "tier notin (b)"),
        ("a , ! b,c!=", "a,!b,c!="),
    ];
    for (text, canonical) in cases {
        assert_eq!(
            Selector::parse(text).map(|s| s.to_string()),
            Ok(canonical.to_owned())
        );
    }
}

const INVALID: &[(&str, &str)] = &[
    ("tier in (edge,gw", "expected ')' to close the value list of \"tier\" at byte 16"),
    ("tier in (edge gw)", "expected ')' to close the value list of \"tier\" at byte 14"),
    (
        "tier in ()",
        "the value list of \"tier\" at byte 8 is empty; 'in' and 'notin' need at least one value",
    ),
    (
        "tier in (a,)",
        "expected a value in the value list of \"tier\" at byte 11, found \")\"",
    ),
    (
        "tier notin edge",
        "expected '(' to open the value list of \"tier\" at byte 11, found \"edge\"",
    ),
    ("tier in", "expected '(' to open the value list of \"tier\" at byte 7, found the end"),
    ("site=lyon,", "expected a label key at byte 10, found the end"),
    ("a,,b", "expected a label key at byte 2, found \",\""),
    ("=x", "expected a label key at byte 0, found \"=\""),
    ("!", "expected a label key at byte 1, found the end"),
    (
        "Bad Key=x",
        "expected an operator (=, ==, !=, in, notin), ',' or the end after the key \"Bad\" at byte 4, found \"Key\"",
    ),
    ("a=b=c", "expected ',' or the end after the requirement on \"a\" at byte 3, found \"=\""),
    ("!a=b", "expected ',' or the end after the requirement on \"a\" at byte 2, found \"=\""),
    ("a=(b)", "expected a value for \"a\" at byte 2, found \"(\""),
    (
        "-site=lyon",
        "invalid label key \"-site\" at byte 0: its name does not start and end with a letter or digit; the rule is an optional DNS-subdomain prefix of at most 253 characters and '/', then a name of 1-63 characters of A-Z, a-z, 0-9, '-', '_' and '.', starting and ending with a letter or digit",
    ),
    (
        "x, Example.com/a",
        "invalid label key \"Example.com/a\" at byte 3: its prefix is not a DNS subdomain (dot-separated parts of a-z, 0-9 and '-', each starting and ending with a letter or digit); the rule is an optional DNS-subdomain prefix of at most 253 characters and '/', then a name of 1-63 characters of A-Z, a-z, 0-9, '-', '_' and '.', starting and ending with a letter or digit",
    ),
    (
        "a/b/c",
        "invalid label key \"a/b/c\" at byte 0: it contains more than one '/'; the rule is an optional DNS-subdomain prefix of at most 253 characters and '/', then a name of 1-63 characters of A-Z, a-z, 0-9, '-', '_' and '.', starting and ending with a letter or digit",
    ),
    (
        "/a",
        "invalid label key \"/a\" at byte 0: its prefix before '/' is empty; the rule is an optional DNS-subdomain prefix of at most 253 characters and '/', then a name of 1-63 characters of A-Z, a-z, 0-9, '-', '_' and '.', starting and ending with a letter or digit",
    ),
    (
        "site=ly*on",
        "invalid label value \"ly*on\" for \"site\" at byte 5: it contains a character other than A-Z, a-z, 0-9, '-', '_' or '.'; the rule is empty, or 1-63 characters of A-Z, a-z, 0-9, '-', '_' and '.', starting and ending with a letter or digit",
    ),
    (
        "tier in (edge, gw-)",
        "invalid label value \"gw-\" for \"tier\" at byte 15: it does not start and end with a letter or digit; the rule is empty, or 1-63 characters of A-Z, a-z, 0-9, '-', '_' and '.', starting and ending with a letter or digit",
    ),
];

#[test]
fn invalid_selectors_say_what_and_where() {
    for (text, message) in INVALID {
        match Selector::parse(text) {
            Ok(selector) => panic!("{text:?} parsed as {selector:?}"),
            Err(e) => assert_eq!(e.to_string(), *message, "{text:?}"),
        }
    }
}

#[test]
fn overlong_keys_and_values_are_refused() {
    let long = "a".repeat(64);
    assert!(matches!(
        Selector::parse(&long),
        Err(SelectorError::InvalidKey {
            problem: "its name is longer than 63 characters",
            ..
        })
    ));
    assert!(Selector::parse(&"a".repeat(63)).is_ok());
    assert!(matches!(
        Selector::parse(&format!("k={long}")),
        Err(SelectorError::InvalidValue {
            problem: "it is longer than 63 characters",
            position: 2,
            ..
        })
    ));
    let prefix = format!("{}.com/a", "b".repeat(250));
    assert!(matches!(
        Selector::parse(&prefix),
        Err(SelectorError::InvalidKey {
            problem: "its prefix is longer than 253 characters",
            ..
        })
    ));
    // A huge key is quoted by its start and length, not in full.
    let huge = format!("{}=x", "ä".repeat(10_000));
    let message = Selector::parse(&huge)
        .expect_err("non-ASCII key")
        .to_string();
    assert!(message.len() < 1000, "{message}");
}

#[test]
fn serde_goes_through_the_text() {
    let selector = Selector::parse(" tier in (gw,edge) , !canary").expect("valid");
    let json = serde_json::to_string(&selector).expect("serializes");
    assert_eq!(json, "\"tier in (edge,gw),!canary\"");
    let back: Selector = serde_json::from_str(&json).expect("deserializes");
    assert_eq!(back, selector);
    let err = serde_json::from_str::<Selector>("\"tier in (\"").expect_err("invalid");
    assert!(err.to_string().contains("value list of \"tier\""), "{err}");
    let schema = schemars::schema_for!(Selector);
    assert_eq!(schema.get("type"), Some(&serde_json::json!("string")));
}

/// The model a generated selector is written from, evaluated directly.
#[derive(Debug, Clone)]
enum Model {
    Eq(String, String, bool),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Model {
    fn holds(&self, labels: &Labels) -> bool {
        match self {
            Model::Eq(k, v, _) => labels.get(k) == Some(v),
            Model::Ne(k, v) => labels.get(k) != Some(v),
            Model::In(k, vs) => vs.iter().any(|v| labels.get(k) == Some(v)),
            Model::NotIn(k, vs) => !vs.iter().any(|v| labels.get(k) == Some(v)),
            Model::Exists(k) => labels.contains_key(k),
            Model::NotExists(k) => !labels.contains_key(k),
        }
    }

    fn write(&self, pad: &str) -> String {
        let list = |vs: &[String]| {
            let sep = format!("{pad},{pad}");
            format!("({pad}{}{pad})", vs.join(&sep))
        };
        match self {
            Model::Eq(k, v, double) => {
                let op = if *double { "==" } else { "=" };
                format!("{pad}{k}{pad}{op}{pad}{v}{pad}")
            }
            Model::Ne(k, v) => format!("{pad}{k}{pad}!={pad}{v}{pad}"),
            Model::In(k, vs) => format!("{pad}{k} in{pad}{}{pad}", list(vs)),
            Model::NotIn(k, vs) => format!("{pad}{k} notin {}{pad}", list(vs)),
            Model::Exists(k) => format!("{pad}{k}{pad}"),
            Model::NotExists(k) => format!("{pad}!{pad}{k}{pad}"),
        }
    }
}

const KEYS: &[&str] = &["site", "tier", "canary", "example.com/role", "A_b.c-9"];
const VALUES: &[&str] = &["lyon", "edge", "gw", "x.Y_z-1", "0"];

fn key() -> impl Strategy<Value = String> {
    prop::sample::select(KEYS).prop_map(str::to_owned)
}

fn value() -> impl Strategy<Value = String> {
    prop::sample::select(VALUES).prop_map(str::to_owned)
}

fn value_or_empty() -> impl Strategy<Value = String> {
    prop_oneof![4 => value(), 1 => Just(String::new())]
}

fn model() -> impl Strategy<Value = Model> {
    let values = || prop::collection::vec(value(), 1..4);
    prop_oneof![
        (key(), value_or_empty(), any::<bool>()).prop_map(|(k, v, d)| Model::Eq(k, v, d)),
        (key(), value_or_empty()).prop_map(|(k, v)| Model::Ne(k, v)),
        (key(), values()).prop_map(|(k, vs)| Model::In(k, vs)),
        (key(), values()).prop_map(|(k, vs)| Model::NotIn(k, vs)),
        key().prop_map(Model::Exists),
        key().prop_map(Model::NotExists),
    ]
}

fn labels_strategy() -> impl Strategy<Value = Labels> {
    prop::collection::btree_map(key(), value_or_empty(), 0..5)
}

proptest! {
    #[test]
    fn canonical_display_round_trips_and_matches_agree_with_the_model(
        models in prop::collection::vec(model(), 0..5),
        pad in prop::sample::select(&["", " ", "\t  "][..]),
        samples in prop::collection::vec(labels_strategy(), 1..8),
    ) {
        let text = models.iter().map(|m| m.write(pad)).collect::<Vec<_>>().join(",");
        let selector = Selector::parse(&text)
            .map_err(|e| TestCaseError::fail(format!("{text:?}: {e}")))?;
        prop_assert_eq!(selector.requirements().len(), models.len());
        let canonical = selector.to_string();
        let reparsed = Selector::parse(&canonical);
        prop_assert_eq!(reparsed, Ok(selector.clone()), "{:?}", canonical);
        for labels in &samples {
            let expected = models.iter().all(|m| m.holds(labels));
            prop_assert_eq!(selector.matches(labels), expected, "{:?} on {:?}", text, labels);
        }
    }
}
