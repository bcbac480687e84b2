//! Property tests of the config loader, the validator and `${VAR}` interpolation
//! (`cargo test fuzz_`; `scripts/fuzz` runs a million cases of each).
//!
//! Configs come two ways: arbitrary text (and YAML-like token soup, and generated
//! configs with a few bytes spliced in), and a grammar that writes mostly well-formed
//! configs with random keys, values and types, so the validator's deep paths run.
//! Each generated config is written twice, once with its strings inline and once with
//! some of them behind `${VAR}` references, and both must load to the same result.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use proptest::prelude::*;
use proptest::sample::{select, Index};
use serde_yaml_ng::Value;

use super::{interpolate, parse, ConfigError, ConfigIssue};
use crate::fuzz_support::run;

// ---------------------------------------------------------------- interpolation

/// Text with many `$`, `{`, `}` and `:-`, and names that may be set.
fn dollar_soup() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        4 => any::<char>().prop_map(String::from),
        2 => Just("$".to_string()),
        2 => Just("${".to_string()),
        1 => Just("}".to_string()),
        1 => Just(":-".to_string()),
        1 => Just("$$".to_string()),
        2 => select(&["A", "B", "HOME", "_x1", "a b", ""][..]).prop_map(str::to_string),
    ];
    proptest::collection::vec(token, 0..24).prop_map(|t| t.concat())
}

fn env_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map(
        prop_oneof![select(&["A", "B", "HOME", "_x1"][..]).prop_map(str::to_string), "[A-Za-z0-9_]{1,6}"],
        prop_oneof![any::<String>(), dollar_soup()],
        0..4,
    )
}

/// One piece of a string whose interpolation is known in advance.
#[derive(Clone, Debug)]
enum Piece {
    /// Text without `$`.
    Plain(String),
    /// `$$`.
    Dollar,
    /// `${NAME}` with NAME set to this value.
    Set(String),
    /// `${UNSET:-default}`.
    Default(String),
}

#[test]
fn fuzz_interpolate() {
    let input = (prop_oneof![any::<String>(), dollar_soup()], env_map());
    run("fuzz_interpolate", 2000, input, |(text, env)| {
        let lookup = |name: &str| env.get(name).cloned();
        let out = interpolate(&text, &lookup);
        if !text.contains('$') {
            prop_assert_eq!(out.as_deref(), Ok(text.as_str()), "text without `$` is unchanged");
        }
        // `$` escaped as `$$` comes back as the text itself, whatever it holds.
        let escaped = text.replace('$', "$$");
        let back = interpolate(&escaped, &lookup);
        prop_assert_eq!(back.as_deref(), Ok(text.as_str()));
        Ok(())
    });
}

#[test]
fn fuzz_interpolate_replaces_set_variables() {
    let piece = prop_oneof![
        3 => "[^$]{0,8}".prop_map(Piece::Plain),
        1 => Just(Piece::Dollar),
        2 => any::<String>().prop_map(Piece::Set),
        1 => "[^}]{0,8}".prop_map(Piece::Default),
    ];
    run("fuzz_interpolate_replaces_set_variables", 2000, proptest::collection::vec(piece, 0..8), |pieces| {
        let mut env = BTreeMap::new();
        let (mut text, mut want) = (String::new(), String::new());
        for (i, p) in pieces.iter().enumerate() {
            match p {
                Piece::Plain(s) => {
                    text.push_str(s);
                    want.push_str(s);
                }
                Piece::Dollar => {
                    text.push_str("$$");
                    want.push('$');
                }
                Piece::Set(v) => {
                    let name = format!("V_{i}");
                    text.push_str(&format!("${{{name}}}"));
                    want.push_str(v);
                    env.insert(name, v.clone());
                }
                Piece::Default(d) => {
                    text.push_str(&format!("${{UNSET_{i}:-{d}}}"));
                    want.push_str(d);
                }
            }
        }
        let got = interpolate(&text, &|name| env.get(name).cloned());
        prop_assert_eq!(got.as_deref(), Ok(want.as_str()), "text {:?}", text);
        Ok(())
    });
}

// ---------------------------------------------------------------- config grammar

/// A YAML node of a generated config.
#[derive(Clone, Debug)]
enum Node {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// A plain scalar written as it is (`~`, `yes`, `0x1F`, `1e400` ...). Not an integer
    /// beyond u64: serde_yaml_ng refuses those as a YAML error (in `fuzz_config_text`).
    Raw(&'static str),
    /// A string, always written double-quoted.
    Str(Vec<Part>),
    Seq(Vec<Node>),
    Map(Vec<(String, Node)>),
}

/// A piece of a string value.
#[derive(Clone, Debug)]
enum Part {
    Lit(String),
    /// Inline: the text; with references: `${FUZZ_Vn}`, the text in the environment.
    Var(String),
    /// Inline: the text; with references: `${FUZZ_UNSET:-text}` (the text has no `}`).
    Default(String),
    /// `${FUZZ_MISSING}`: an error either way (always a whole string).
    Unset,
    /// `${name}` with an invalid name: an error either way (always a whole string).
    BadName(&'static str),
}

type Field = BoxedStrategy<Option<(String, Node)>>;

fn lit(s: &str) -> Node {
    Node::Str(vec![Part::Lit(s.to_string())])
}

fn small_string() -> BoxedStrategy<String> {
    proptest::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter).boxed()
}

thread_local! {
    /// Set per generated config (by its plan, while its strategies are built): a clean
    /// config has no bad values, no keys of the wrong type or kind, every key it needs,
    /// so that some configs are valid and their deepest checks run.
    static CLEAN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn clean() -> bool {
    CLEAN.with(|c| c.get())
}

/// Pool entries written `!value` are bad values, drawn one time in ten (never in a
/// clean config).
fn good_or_bad<T: Clone + std::fmt::Debug + 'static>(good: Vec<T>, bad: Vec<T>) -> BoxedStrategy<T> {
    if clean() && !good.is_empty() {
        return select(good).boxed();
    }
    match (good.is_empty(), bad.is_empty()) {
        (false, false) => prop_oneof![9 => select(good), 1 => select(bad)].boxed(),
        (true, _) => select(bad).boxed(),
        (false, true) => select(good).boxed(),
    }
}

/// A string value: mostly from `pool`, sometimes behind a `${VAR}`, sometimes arbitrary.
fn st(pool: &'static [&'static str]) -> BoxedStrategy<Node> {
    st_of(pool.iter().map(|s| s.to_string()).collect())
}

fn st_of(pool: Vec<String>) -> BoxedStrategy<Node> {
    let good = pool.iter().filter(|s| !s.starts_with('!')).cloned().collect();
    let bad = pool.iter().filter_map(|s| s.strip_prefix('!')).map(str::to_string).collect();
    let from_pool = good_or_bad(good, bad);
    if clean() {
        return prop_oneof![
            10 => from_pool.clone().prop_map(|s| Node::Str(vec![Part::Lit(s)])),
            1 => from_pool.clone().prop_map(|s| Node::Str(vec![Part::Var(s)])),
            1 => from_pool.prop_map(|s| Node::Str(vec![Part::Default(s.replace('}', ""))])),
        ]
        .boxed();
    }
    prop_oneof![
        400 => from_pool.clone().prop_map(|s| Node::Str(vec![Part::Lit(s)])),
        40 => from_pool.clone().prop_map(|s| Node::Str(vec![Part::Var(s)])),
        20 => (from_pool.clone(), any::<Index>()).prop_map(|(s, at)| {
            let cut = s.char_indices().map(|(i, _)| i).chain([s.len()]).nth(at.index(s.chars().count() + 1)).unwrap_or(0);
            Node::Str(vec![Part::Lit(s[..cut].to_string()), Part::Var(s[cut..].to_string())])
        }),
        20 => from_pool.prop_map(|s| Node::Str(vec![Part::Default(s.replace('}', ""))])),
        4 => small_string().prop_map(|s| Node::Str(vec![Part::Lit(s)])),
        1 => Just(Node::Str(vec![Part::Unset])),
        1 => select(&["", "A B", "a-b", "é", "x.y"][..]).prop_map(|n| Node::Str(vec![Part::BadName(n)])),
    ]
    .boxed()
}

fn int(good: &'static [i64], bad: &'static [i64]) -> BoxedStrategy<Node> {
    good_or_bad(good.to_vec(), bad.to_vec()).prop_map(Node::Int).boxed()
}

fn float(good: &'static [f64], bad: &'static [f64]) -> BoxedStrategy<Node> {
    good_or_bad(good.to_vec(), bad.to_vec()).prop_map(Node::Float).boxed()
}

fn boolean() -> BoxedStrategy<Node> {
    any::<bool>().prop_map(Node::Bool).boxed()
}

fn list(item: BoxedStrategy<Node>, max: usize) -> BoxedStrategy<Node> {
    proptest::collection::vec(item, 0..=max).prop_map(Node::Seq).boxed()
}

/// A list of strings from `pool`; in a clean config 1..=max different good ones.
fn names_list(pool: &'static [&'static str], max: usize) -> BoxedStrategy<Node> {
    if clean() {
        let good: Vec<&'static str> = pool.iter().copied().filter(|s| !s.starts_with('!')).collect();
        let max = max.min(good.len());
        return proptest::sample::subsequence(good, 1..=max)
            .prop_map(|names| Node::Seq(names.into_iter().map(lit).collect()))
            .boxed();
    }
    list(st(pool), max)
}

/// Any node at all: the wrong type in the right place.
fn wild() -> BoxedStrategy<Node> {
    let leaf = prop_oneof![
        Just(Node::Null),
        any::<bool>().prop_map(Node::Bool),
        any::<i64>().prop_map(Node::Int),
        any::<f64>().prop_map(Node::Float),
        small_string().prop_map(|s| Node::Str(vec![Part::Lit(s)])),
        select(&["~", "yes", "no", "0x1F", "0o17", "1_000", ".inf", "-.nan", "1e400", "+12", "2001-12-14", "="][..])
            .prop_map(Node::Raw),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Node::Seq),
            proptest::collection::vec(("[a-z_]{1,6}", inner), 0..3).prop_map(|e| Node::Map(dedup(e))),
        ]
    })
    .boxed()
}

fn dedup(entries: Vec<(String, Node)>) -> Vec<(String, Node)> {
    let mut seen = std::collections::BTreeSet::new();
    entries.into_iter().filter(|(k, _)| seen.insert(k.clone())).collect()
}

/// Key `name` present with probability `p`; its value is now and then of another type.
/// In a clean config a key of `p` >= 0.95 is always there, one of `p` <= 0.03 never.
fn f(name: &'static str, p: f64, value: BoxedStrategy<Node>) -> Field {
    if clean() {
        return match p {
            p if p >= 0.95 => value.prop_map(move |v| Some((name.to_string(), v))).boxed(),
            p if p <= 0.03 => Just(None).boxed(),
            p => proptest::option::weighted(p, value.prop_map(move |v| (name.to_string(), v))).boxed(),
        };
    }
    let value = prop_oneof![200 => value, 1 => wild()];
    proptest::option::weighted(p, value.prop_map(move |v| (name.to_string(), v))).boxed()
}

/// A mapping of the present fields, now and then with a key the config does not know.
fn obj(mut fields: Vec<Field>) -> BoxedStrategy<Node> {
    fields.push(f("bogus_key", 0.01, wild()));
    fields.prop_map(|entries| Node::Map(entries.into_iter().flatten().collect())).boxed()
}

/// A mapping of `size` entries named from `names` (fewer when a name comes twice).
fn named(
    names: &'static [&'static str],
    value: BoxedStrategy<Node>,
    size: std::ops::RangeInclusive<usize>,
) -> BoxedStrategy<Node> {
    let name = select(names).prop_map(|n| n.trim_start_matches('!').to_string());
    proptest::collection::vec((name, value), size).prop_map(|e| Node::Map(dedup(e))).boxed()
}

const DURATIONS: &[&str] = &[
    "250ms",
    "5s",
    "30s",
    "2m",
    "1h 30m",
    " 10s ",
    "1ns",
    "!0s",
    "!0ms",
    "!5 parsecs",
    "!-1s",
    "!",
    "!1y",
    "!18446744073709551616s",
    "!99999999999999999999999h",
    "!10",
];
const TRANSPORTS: &[&str] = &["rabbit", "mem", "redis", "kafka", "other", "a.b"];
const HANDLERS: &[&str] = &["orders", "billing", "!nope"];
const SUBSCRIPTIONS: &[&str] = &["orders", "refunds", "s-3", "x y"];
const STREAMS: &[&str] = &["orders", "refunds", "!", "!orders.dlq"];
const TOPICS: &[&str] = &["orders", "payments", "!", "!orders.retry"];
const GROUPS: &[&str] = &["billing", "g2", "!"];

fn dur() -> BoxedStrategy<Node> {
    st(DURATIONS)
}

fn retry() -> BoxedStrategy<Node> {
    obj(vec![
        f("max_attempts", 0.5, int(&[1, 3, 5, 100], &[0, -1, 4_294_967_296])),
        f("initial_delay", 0.5, st(&["250ms", "1s", "5s", "!1h 30m", "!0s", "!5 parsecs"])),
        f("multiplier", 0.3, float(&[1.0, 2.0, 1.5], &[0.5, f64::NAN, f64::INFINITY, -1.0, 1e308])),
        f("max_delay", 0.4, st(&["5m", "1h 30m", "!1s", "!-1s"])),
        f("jitter", 0.3, float(&[0.0, 0.1, 1.0], &[1.5, -0.1, f64::NAN])),
    ])
}

fn topology() -> BoxedStrategy<Node> {
    let exchange = obj(vec![
        f("name", 0.95, st(&["ex", "orders", "!", "!amq.topic"])),
        f("type", 0.5, st(&["topic", "direct", "fanout", "headers", "!bogus"])),
        f("durable", 0.3, boolean()),
    ]);
    let argument =
        prop_oneof![st(&["quorum", "classic"]), int(&[0, 10_000, -1], &[]), boolean(), float(&[], &[1.5]),].boxed();
    let queue = obj(vec![
        f("name", 0.95, st(&["orders", "orders.dlq", "!"])),
        f("durable", 0.3, boolean()),
        f("arguments", 0.3, named(&["x-queue-type", "x-max-length", "x-flag"], argument, 0..=2)),
    ]);
    let binding = obj(vec![
        f("queue", 0.95, st(&["orders", "!"])),
        f("exchange", 0.95, st(&["ex", "amq.topic", "!undeclared", "!"])),
        f("routing_key", 0.5, st(&["#", "order.*", ""])),
    ]);
    obj(vec![
        f("exchanges", 0.6, list(exchange, 2)),
        f("queues", 0.6, list(queue, 2)),
        f("bindings", 0.6, list(binding, 2)),
    ])
}

fn properties() -> BoxedStrategy<Node> {
    let value = prop_oneof![
        st(&["x", "6000", "earliest", "PLAINTEXT", "!-1", "!nonsense", "!", "!SASL_PLAINTEXT"]),
        int(&[6000], &[0, -1]),
        boolean(),
        float(&[], &[0.5]),
    ]
    .boxed();
    named(
        &[
            "client.id",
            "session.timeout.ms",
            "fetch.wait.max.ms",
            "group.id",
            "enable.auto.commit",
            "bogus.property",
            "auto.offset.reset",
            "security.protocol",
        ],
        value,
        1..=2,
    )
}

/// A transport of `kind`, now and then with what belongs to another kind.
fn transport(kind: &'static str) -> BoxedStrategy<Node> {
    let (url_p, url_pool): (f64, &'static [&'static str]) = match kind {
        "amqp" => (
            0.95,
            &[
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "amqps://u:p@h:5671/v",
                "amqp://h",
                "!redis://h",
                "!http://x",
                "!not a url",
                "!",
                "!amqp://[::1",
                "!amqp://h:99999",
            ],
        ),
        "redis" => {
            (0.95, &["redis://127.0.0.1:6379/0", "rediss://:pw@h:6380", "redis://h", "!amqp://h", "!redis:x", "!"])
        }
        _ => (0.03, &["kafka://x:1", "amqp://h", ""]),
    };
    let kind_node =
        prop_oneof![30 => Just(lit(kind)), 1 => st(&["amqp", "redis", "kafka", "memory", "!kafkaa"])].boxed();
    let kafka = kind == "kafka";
    obj(vec![
        f("type", 0.98, kind_node),
        f("url", url_p, st(url_pool)),
        f(
            "brokers",
            if kafka { 0.95 } else { 0.02 },
            names_list(&["127.0.0.1:9092", "[::1]:9092", "!localhost", "!:9092", "!h:99999", "!h:"], 3),
        ),
        // librdkafka builds a client to check them: mostly none, to keep the rate up.
        f("properties", if kafka { 0.1 } else { 0.02 }, properties()),
        f("consumer", if kind == "redis" { 0.3 } else { 0.02 }, st(&["worker-1", "!", "!  "])),
        f("reconnect_max_delay", 0.1, dur()),
        f("topology", if kind == "amqp" { 0.3 } else { 0.02 }, topology()),
    ])
}

/// The transports of the plan (each of its kind), now and then one more.
fn transports(present: &[(&'static str, &'static str)]) -> BoxedStrategy<Node> {
    let mut fields: Vec<Field> = present.iter().map(|(name, kind)| f(name, 0.98, transport(kind))).collect();
    fields.push(
        proptest::option::weighted(
            0.03,
            (select(&["other", "a.b", "ünï", "x y"][..]), select(&["amqp", "redis", "kafka", "memory"][..]))
                .prop_flat_map(|(name, kind)| transport(kind).prop_map(move |t| (name.to_string(), t))),
        )
        .boxed(),
    );
    fields.prop_map(|e| Node::Map(e.into_iter().flatten().collect())).boxed()
}

fn handler() -> BoxedStrategy<Node> {
    obj(vec![
        f(
            "endpoints",
            0.9,
            names_list(
                &[
                    "http://127.0.0.1:8080/",
                    "https://h.example/x",
                    "http://[::1]:9/",
                    "!ftp://x/",
                    "!http://",
                    "!not a url",
                ],
                3,
            ),
        ),
        f("balance", 0.2, st(&["least_outstanding", "round_robin", "!random"])),
        f("timeout", 0.4, dur()),
        f("max_in_flight", 0.3, max_in_flight()),
        f("signing", 0.15, obj(vec![f("secret", 0.9, st(&["0123456789abcdef0123", "!short", "!"]))])),
    ])
}

/// `64`, `auto` or `{ auto: { max: 32 } }`.
fn max_in_flight() -> BoxedStrategy<Node> {
    let auto = obj(vec![f("max", 0.6, int(&[1, 32, 256], &[0, -1]))]);
    prop_oneof![
        6 => int(&[1, 64], &[0, -1, i64::MAX]),
        2 => st(&["auto", "!automatic", "!"]),
        2 => obj(vec![f("auto", 0.95, auto)]),
    ]
    .boxed()
}

/// The fields every kind of subscription takes, and those of the kind of its
/// transport, the fields of other kinds now and then.
fn subscription(name: &str, transport: (&'static str, &'static str), handlers: &[String]) -> BoxedStrategy<Node> {
    let group = if clean() { st_of(vec![format!("group-of-{name}")]) } else { st(GROUPS) };
    let (transport_name, kind) = transport;
    let (amqp, redis, kafka) = (kind == "amqp" || kind == "memory", kind == "redis", kind == "kafka");
    let p = |mine: bool, p: f64| if mine { p } else { 0.02 };
    let transport = prop_oneof![30 => Just(lit(transport_name)), 1 => st(TRANSPORTS)].boxed();
    let dead_letter = obj(vec![
        f("exchange", p(amqp, 0.4), st(&["", "dlx", "amq.direct"])),
        f("routing_key", p(amqp, 0.9), st(&["orders.dlq", "!orders", "!"])),
        f("stream", p(redis, 0.7), st(&["orders.dlq", "!orders", "!"])),
        f("maxlen", p(redis, 0.3), int(&[1, 1000], &[0, -1])),
        f("topic", p(kafka, 0.7), st(&["orders.dlq", "!orders", "!"])),
    ]);
    let dedup = obj(vec![
        f("redis", 0.9, st(&["redis://127.0.0.1:6379/1", "rediss://h", "!http://x", "!nope"])),
        f("ttl", 0.9, dur()),
    ]);
    let handler = st_of(handlers.iter().cloned().chain(["!nope".to_string()]).collect());
    obj(vec![
        f("transport", 0.98, transport),
        f("queue", p(amqp, 0.95), st(&["orders", "q.1", "!", "!orders.dlq"])),
        f("streams", p(redis, 0.95), names_list(STREAMS, 3)),
        f("group", if redis || kafka { 0.95 } else { 0.02 }, group),
        f("topics", p(kafka, 0.85), names_list(TOPICS, 3)),
        f("topic_pattern", p(kafka, 0.15), st(&["o.*", "(unclosed", "!", "!  "])),
        f("ordering", p(kafka, 0.4), st(&["partition", "key", "unordered", "!random"])),
        f("in_place_retry_max", p(kafka, 0.3), dur()),
        f("retry_topic", p(kafka, 0.2), st(&["billing.retry", "!orders", "!"])),
        f("declare", if redis || kafka { 0.1 } else { 0.02 }, boolean()),
        f("claim_idle", p(redis, 0.5), st(&["60s", "90s", "31s", "!5s", "!0s"])),
        f("body_field", p(redis, 0.3), st(&["body", "payload", "!"])),
        f("dedup", 0.1, dedup),
        f("prefetch", 0.3, int(&[1, 64, 65_535], &[0, 65_536, -1])),
        f("ordered", if kafka { 0.02 } else { 0.3 }, boolean()),
        f("retry", 0.3, retry()),
        f("dead_letter", 0.3, dead_letter),
        f("default_handler", 0.4, handler),
        f("max_body_bytes", 0.2, int(&[1, 1024, 16_777_216], &[0, -1])),
        f("envelope", 0.1, st(&["messenger", "!Messenger", "!"])),
    ])
}

fn route(index: usize, subscriptions: &[String], handlers: &[String]) -> BoxedStrategy<Node> {
    let subscription = st_of(subscriptions.iter().cloned().chain(["!nope".to_string()]).collect());
    let matcher = obj(vec![
        f("subscription", 0.4, subscription),
        f("routing_key", 0.4, st(&["#", "order.*", "a.#.b", "*", "!"])),
        f("headers", 0.2, named(&["tenant", "x"], st(&["acme", ""]), 0..=2)),
    ]);
    obj(vec![
        f("name", 0.97, st_of(vec![format!("r{index}"), format!("all-{index}"), "!".into(), "!r0".into()])),
        f("match", 0.5, matcher),
        f("handler", 0.97, st_of(handlers.iter().cloned().chain(["!nope".to_string()]).collect())),
        f("retry", 0.2, retry()),
    ])
}

/// Transports by name and kind. Kafka less often: librdkafka makes a client to check
/// each one.
const PLAN_TRANSPORTS: [(&str, &str, f64); 4] =
    [("rabbit", "amqp", 0.6), ("mem", "memory", 0.4), ("redis", "redis", 0.5), ("kafka", "kafka", 0.2)];

/// A config that mostly hangs together: first the names of its transports (each of
/// its kind), handlers and subscriptions, then sections that refer to those names
/// (and now and then to others).
fn config_node() -> BoxedStrategy<Node> {
    let plan = (
        PLAN_TRANSPORTS.map(|(_, _, p)| proptest::bool::weighted(p)),
        proptest::sample::subsequence(HANDLERS[..2].to_vec(), 1..=2),
        proptest::sample::subsequence(SUBSCRIPTIONS.to_vec(), 1..=2),
        proptest::bool::weighted(0.3),
    );
    plan.prop_flat_map(|(present, handlers, subscriptions, is_clean)| {
        CLEAN.with(|c| c.set(is_clean));
        let transports_present: Vec<(&'static str, &'static str)> =
            PLAN_TRANSPORTS.iter().zip(present).filter(|(_, on)| *on).map(|((n, k, _), _)| (*n, *k)).collect();
        let handlers: Vec<String> = handlers.into_iter().map(str::to_string).collect();
        let subscriptions: Vec<String> = subscriptions.into_iter().map(str::to_string).collect();
        // Each subscription reads from a transport of the plan (or from one it lacks).
        let sources: Vec<(&'static str, &'static str)> = if transports_present.is_empty() {
            PLAN_TRANSPORTS.iter().map(|(n, k, _)| (*n, *k)).collect()
        } else {
            transports_present.clone()
        };
        let subscription_fields: Vec<Field> = subscriptions
            .iter()
            .map(|name| {
                let (name, key) = (name.clone(), name.clone());
                let handlers = handlers.clone();
                proptest::option::weighted(
                    0.98,
                    select(sources.clone())
                        .prop_flat_map(move |t| {
                            CLEAN.with(|c| c.set(is_clean));
                            subscription(&name, t, &handlers)
                        })
                        .prop_map(move |node| (key.clone(), node)),
                )
                .boxed()
            })
            .collect();
        let subscriptions_node = subscription_fields.prop_map(|e| Node::Map(e.into_iter().flatten().collect())).boxed();
        let handler_fields: Vec<Field> = handlers
            .iter()
            .map(|h| {
                let h = h.clone();
                proptest::option::weighted(0.98, handler().prop_map(move |n| (h.clone(), n))).boxed()
            })
            .collect();
        let handlers_node = handler_fields.prop_map(|e| Node::Map(e.into_iter().flatten().collect())).boxed();
        let routes: Vec<BoxedStrategy<Node>> = (0..3).map(|i| route(i, &subscriptions, &handlers)).collect();
        let routes = (routes, 1..=3usize).prop_map(|(mut r, n)| {
            r.truncate(n);
            Node::Seq(r)
        });
        obj(vec![
            f(
                "admin",
                0.1,
                obj(vec![
                    f("enabled", 0.5, boolean()),
                    f("listen", 0.7, st(&["127.0.0.1:9090", "0.0.0.0:0", "[::1]:9", "!localhost:80", "!x"])),
                ]),
            ),
            f(
                "log",
                0.1,
                obj(vec![
                    f("format", 0.5, st(&["text", "json", "!xml"])),
                    f("level", 0.5, st(&["info", "debug,lapin=warn", ""])),
                ]),
            ),
            f("shutdown", 0.1, obj(vec![f("grace_period", 0.8, dur())])),
            f("transports", 0.99, transports(&transports_present)),
            f("handlers", 0.99, handlers_node),
            f("subscriptions", 0.99, subscriptions_node),
            f("routes", 0.9, routes.boxed()),
        ])
    })
    .boxed()
}

// ---------------------------------------------------------------- writing YAML

/// Characters a YAML stream may hold as they are (YAML 1.1 `c-printable`).
fn printable(c: char) -> bool {
    matches!(c, '\u{20}'..='\u{7E}' | '\u{85}' | '\u{A0}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
        && c != '\u{FEFF}'
}

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if printable(c) => out.push(c),
            c if u32::from(c) <= 0xFFFF => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => {
                let _ = write!(out, "\\U{:08X}", u32::from(c));
            }
        }
    }
    out.push('"');
    out
}

/// Writes a node as YAML, with its strings inline or (some of them) behind `${VAR}`
/// references whose values it collects.
struct Writer {
    refs: bool,
    env: BTreeMap<String, String>,
    out: String,
}

impl Writer {
    fn string(&mut self, parts: &[Part]) -> String {
        let mut raw = String::new();
        for part in parts {
            match part {
                Part::Lit(s) => raw.push_str(&s.replace('$', "$$")),
                Part::Var(v) if self.refs => {
                    let name = format!("FUZZ_V{}", self.env.len());
                    raw.push_str(&format!("${{{name}}}"));
                    self.env.insert(name, v.clone());
                }
                Part::Default(d) if self.refs => raw.push_str(&format!("${{FUZZ_UNSET:-{d}}}")),
                Part::Var(v) | Part::Default(v) => raw.push_str(&v.replace('$', "$$")),
                Part::Unset => raw.push_str("${FUZZ_MISSING}"),
                Part::BadName(n) => raw.push_str(&format!("${{{n}}}")),
            }
        }
        quote(&raw)
    }

    fn flow(&mut self, node: &Node) -> String {
        match node {
            Node::Null => "null".into(),
            Node::Bool(b) => b.to_string(),
            Node::Int(i) => i.to_string(),
            Node::Float(x) if x.is_nan() => ".nan".into(),
            Node::Float(x) if x.is_infinite() => if *x > 0.0 { ".inf" } else { "-.inf" }.into(),
            Node::Float(x) => format!("{x:?}"),
            Node::Raw(s) => (*s).into(),
            Node::Str(parts) => self.string(parts),
            Node::Seq(items) => {
                let items: Vec<String> = items.iter().map(|n| self.flow(n)).collect();
                format!("[{}]", items.join(", "))
            }
            Node::Map(entries) => {
                let entries: Vec<String> =
                    entries.iter().map(|(k, v)| format!("{}: {}", quote(k), self.flow(v))).collect();
                format!("{{{}}}", entries.join(", "))
            }
        }
    }

    fn block(&mut self, entries: &[(String, Node)], indent: usize) {
        for (k, v) in entries {
            let line = format!("{:indent$}{}:", "", quote(k));
            self.out.push_str(&line);
            match v {
                Node::Map(inner) if !inner.is_empty() => {
                    self.out.push('\n');
                    self.block(inner, indent + 2);
                }
                other => {
                    let value = self.flow(other);
                    self.out.push(' ');
                    self.out.push_str(&value);
                    self.out.push('\n');
                }
            }
        }
    }

    /// The document, and the environment its references need.
    fn write(node: &Node, refs: bool, block: bool) -> (String, BTreeMap<String, String>) {
        let mut w = Writer { refs, env: BTreeMap::new(), out: String::new() };
        match node {
            Node::Map(entries) if block && !entries.is_empty() => w.block(entries, 0),
            other => w.out = w.flow(other),
        }
        (w.out, w.env)
    }
}

// ---------------------------------------------------------------- properties

const FILES: &[&str] = &["router.yaml", "/etc/message router/r.yaml", "é.yml"];

/// One or more non-empty segments joined by dots (`routes[0].match.routing_key`).
fn is_dotted(path: &str) -> bool {
    !path.is_empty() && path.split('.').all(|segment| !segment.is_empty())
}

/// The error names the file: in its fields, and at the start of its every problem.
fn check_error(e: &ConfigError, file: &str, text: &str) -> Result<(), TestCaseError> {
    let shown = e.to_string();
    let prefix = format!("{file}: ");
    match e {
        ConfigError::Read { file: f, .. } | ConfigError::Syntax { file: f, .. } => {
            prop_assert_eq!(f.as_str(), file);
            prop_assert!(shown.starts_with(&prefix), "{:?} does not name the file", shown);
        }
        ConfigError::Invalid { file: f, issues } => {
            prop_assert_eq!(f.as_str(), file);
            prop_assert!(!issues.is_empty(), "Invalid without issues");
            prop_assert!(shown.starts_with(&prefix), "{:?} does not name the file", shown);
            // Every problem sits at a path into the document (that it parsed, as an
            // Invalid error comes after the YAML).
            let doc: Value = serde_yaml_ng::from_str(text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            for issue in issues {
                check_issue(issue, &doc)?;
            }
        }
    }
    Ok(())
}

fn check_issue(issue: &ConfigIssue, doc: &Value) -> Result<(), TestCaseError> {
    prop_assert!(!issue.message.is_empty(), "issue at {:?} without a message", issue.path);
    prop_assert!(names_a_place(doc, &issue.path), "issue path {:?} names no place in the document", issue.path);
    Ok(())
}

/// How an issue path may spell a mapping key: the text of a string key; a number or
/// boolean as serde_path_to_error writes it, or as the interpolation pass does (Debug);
/// `?` for what serde_path_to_error cannot name.
fn key_spellings(k: &Value) -> Vec<String> {
    match k {
        Value::String(s) => vec![s.clone()],
        Value::Number(n) => vec![n.to_string(), format!("{k:?}")],
        Value::Bool(b) => vec![b.to_string(), format!("{k:?}")],
        other => vec![format!("{other:?}"), "?".to_string()],
    }
}

/// `path` names a place in `doc`: every key and index on the way exists, but for the
/// last key, which may be one the mapping lacks (a required field, a default).
fn names_a_place(doc: &Value, path: &str) -> bool {
    if path.is_empty() {
        return true;
    }
    if let Value::Tagged(tagged) = doc {
        return names_a_place(&tagged.value, path);
    }
    if let Value::Sequence(items) = doc {
        let Some((index, rest)) = path.strip_prefix('[').and_then(|p| p.split_once(']')) else { return false };
        let Ok(i) = index.parse::<usize>() else { return false };
        let rest = rest.strip_prefix('.').unwrap_or(rest);
        return items.get(i).is_some_and(|item| names_a_place(item, rest));
    }
    let Value::Mapping(map) = doc else { return false };
    // Keys may hold dots and brackets themselves: try every key the path starts with.
    let found = map.iter().any(|(k, v)| {
        key_spellings(k).iter().any(|k| match path.strip_prefix(k.as_str()) {
            Some("") => true,
            Some(rest) if rest.starts_with('[') => names_a_place(v, rest),
            Some(rest) => rest.strip_prefix('.').is_some_and(|rest| names_a_place(v, rest)),
            None => false,
        })
    });
    found || !path.contains(['.', '['])
}

/// Arbitrary text as a config: never a panic, every error names the file, every
/// problem sits at an empty path or one that names a place in the document.
#[test]
fn fuzz_config_text() {
    let token = prop_oneof![
        3 => any::<char>().prop_map(String::from),
        2 => select(&[": ", "\n", "  ", "- ", "{", "}", "[", "]", ", ", "\"", "'", "&a ", "*a", "!!str ", "? ", "|\n", "#", "${", "$$", "99999999999999999999"][..])
            .prop_map(str::to_string),
        2 => select(&["transports", "handlers", "subscriptions", "routes", "type", "amqp", "url", "queue", "retry", "5s", "name", "handler"][..])
            .prop_map(str::to_string),
    ];
    let spliced = (config_node(), any::<bool>(), any::<Index>(), any::<Index>(), small_string()).prop_map(
        |(node, block, at, len, insert)| {
            let (text, _) = Writer::write(&node, false, block);
            let chars: Vec<char> = text.chars().collect();
            let at = at.index(chars.len() + 1);
            let end = (at + len.index(4)).min(chars.len());
            chars[..at].iter().chain(insert.chars().collect::<Vec<_>>().iter()).chain(&chars[end..]).collect::<String>()
        },
    );
    let text = prop_oneof![any::<String>(), proptest::collection::vec(token, 0..40).prop_map(|t| t.concat()), spliced];
    run("fuzz_config_text", 500, (text, select(FILES)), |(text, file)| {
        let env = |name: &str| (name == "PASS").then(|| "s3cret".to_string());
        match parse(&text, file, &env) {
            Ok(config) => {
                prop_assert!(config.validate().is_empty());
                let again = parse(&text, file, &env);
                prop_assert!(again.is_ok(), "valid once, invalid again: {:?}", again.err());
            }
            Err(e) => check_error(&e, file, &text)?,
        }
        Ok(())
    });
}

/// Generated configs: never a panic, never a YAML error (the writer writes valid YAML),
/// every error names the file, every problem sits at a dotted path that names a place
/// in the document; the same config with its strings behind `${VAR}` references loads
/// to the same result; a valid config loads again as valid, to the same config.
#[test]
fn fuzz_config_grammar() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let valid = AtomicU64::new(0);
    let total = AtomicU64::new(0);
    run("fuzz_config_grammar", 300, (config_node(), any::<bool>(), select(FILES)), |(node, block, file)| {
        total.fetch_add(1, Ordering::Relaxed);
        let (inline, _) = Writer::write(&node, false, block);
        let (with_refs, env) = Writer::write(&node, true, block);
        let lookup = |name: &str| env.get(name).cloned();
        let none = |_: &str| None;
        let a = parse(&inline, file, &none);
        let b = parse(&with_refs, file, &lookup);
        match (&a, &b) {
            (Ok(x), Ok(y)) => prop_assert_eq!(format!("{x:?}"), format!("{y:?}")),
            (Err(x), Err(y)) => prop_assert_eq!(x.to_string(), y.to_string()),
            _ => prop_assert!(
                false,
                "inline and ${{VAR}} forms differ:\n{}\n{:?}\n---\n{}\n{:?}",
                inline,
                a,
                with_refs,
                b
            ),
        }
        match a {
            Ok(config) => {
                valid.fetch_add(1, Ordering::Relaxed);
                prop_assert!(config.validate().is_empty());
                let again = parse(&inline, file, &none);
                prop_assert!(matches!(&again, Ok(c) if format!("{c:?}") == format!("{config:?}")), "{:?}", again.err());
            }
            Err(e) => {
                prop_assert!(
                    !matches!(e, ConfigError::Syntax { .. }),
                    "generated YAML does not parse: {}\n{}",
                    e,
                    inline
                );
                check_error(&e, file, &inline)?;
                // The generated names are not empty and neither start nor end with a dot.
                if let ConfigError::Invalid { issues, .. } = &e {
                    for issue in issues {
                        let path = &issue.path;
                        prop_assert!(path.is_empty() || is_dotted(path), "issue path {:?} is not a dotted path", path);
                    }
                }
            }
        }
        Ok(())
    });
    let (valid, total) = (valid.into_inner(), total.into_inner());
    println!("fuzz-stat fuzz_config_grammar valid={valid} of {total} generated configs");
}
