//! PHP values to Rust data: a config given as a PHP array, the options of `run()`.

use std::time::Duration;

use ext_php_rs::prelude::*;
use ext_php_rs::types::{ZendHashTable, Zval};
use router_core::config::Config;
use serde_json::{Map, Number, Value};

use crate::worker::{Limits, Selection};

/// Deepest nesting accepted in a config array (a cycle through references would
/// otherwise recurse forever).
const MAX_DEPTH: u32 = 64;

/// A config array, checked exactly as the daemon checks its YAML (JSON is YAML).
pub fn config_from_array(array: &ZendHashTable) -> PhpResult<Config> {
    let value = array_to_json(array, "", 0).map_err(|e| format!("MessageRouter\\Router: config array: {e}"))?;
    let text = serde_json::to_string(&value).map_err(|e| e.to_string())?;
    router_core::config::parse(&text, "<config array>", &|var| std::env::var(var).ok())
        .map_err(|e| e.to_string().into())
}

fn array_to_json(array: &ZendHashTable, path: &str, depth: u32) -> Result<Value, String> {
    if depth > MAX_DEPTH {
        return Err(format!("{path}: nested more than {MAX_DEPTH} levels deep"));
    }
    // A list (keys 0..n) is a sequence; anything else a mapping. The empty array is
    // taken as an empty mapping.
    if !array.is_empty() && array.has_sequential_keys() {
        let mut items = Vec::new();
        for (i, v) in array.values().enumerate() {
            items.push(to_json(v, &format!("{path}[{i}]"), depth + 1)?);
        }
        return Ok(Value::Array(items));
    }
    let mut map = Map::new();
    for (k, v) in array.iter() {
        let key = k.to_string();
        let sub = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
        map.insert(key, to_json(v, &sub, depth + 1)?);
    }
    Ok(Value::Object(map))
}

fn to_json(zv: &Zval, path: &str, depth: u32) -> Result<Value, String> {
    let zv = zv.dereference();
    if zv.is_null() {
        return Ok(Value::Null);
    }
    if let Some(b) = zv.bool() {
        return Ok(Value::Bool(b));
    }
    if let Some(i) = zv.long() {
        return Ok(Value::from(i));
    }
    if let Some(f) = zv.double() {
        return Number::from_f64(f).map(Value::Number).ok_or_else(|| format!("{path}: {f} is not a finite number"));
    }
    if let Some(s) = zv.str() {
        return Ok(Value::String(s.to_string()));
    }
    if let Some(a) = zv.array() {
        return array_to_json(a, path, depth);
    }
    Err(format!("{path}: a {} cannot be a config value (strings, numbers, booleans, arrays)", zv.get_type()))
}

/// `run()` options: `limit`, `time_limit` (seconds), `memory_limit` (bytes or
/// "128M"). An unknown option or a bad value is an error naming it.
/// The options of `run()`: its limits, and which subscriptions it consumes.
pub fn run_options(options: &ZendHashTable) -> PhpResult<(Limits, Selection)> {
    let mut limits = Limits::default();
    let mut selection = Selection::default();
    for (key, value) in options.iter() {
        let key = key.to_string();
        let value = value.dereference();
        let bad =
            |what: &str| -> PhpException { format!("MessageRouter\\Router::run(): option {key:?} {what}").into() };
        if value.is_null() {
            continue;
        }
        match key.as_str() {
            "limit" => {
                let n = value.long().filter(|n| *n > 0).ok_or_else(|| bad("must be a positive integer"))?;
                limits.messages = Some(n as u64);
            }
            "time_limit" => {
                let secs = value
                    .long()
                    .map(|n| n as f64)
                    .or_else(|| value.double())
                    .filter(|s| *s > 0.0 && s.is_finite())
                    .ok_or_else(|| bad("must be a positive number of seconds"))?;
                limits.time = Some(Duration::from_secs_f64(secs));
            }
            "memory_limit" => {
                let bytes = match (value.long(), value.str()) {
                    (Some(n), _) if n > 0 => Some(n as u64),
                    (_, Some(s)) => parse_bytes(s),
                    _ => None,
                };
                limits.memory_bytes =
                    Some(bytes.ok_or_else(|| bad("must be a size in bytes, like 134217728 or \"128M\""))?);
            }
            "subscriptions" | "queues" => {
                let names = value
                    .array()
                    .map(|a| a.values().map(|v| v.str().map(str::to_string)).collect::<Option<Vec<_>>>())
                    .and_then(|names| names.filter(|n| n.iter().all(|n| !n.is_empty())))
                    .ok_or_else(|| bad("must be a list of names"))?;
                match key.as_str() {
                    "subscriptions" => selection.subscriptions = names,
                    _ => selection.queues = names,
                }
            }
            _ => return Err(bad("is unknown (known: limit, time_limit, memory_limit, subscriptions, queues)")),
        }
    }
    Ok((limits, selection))
}

/// "128M", "1G", "512K", "1000" (PHP's shorthand, as in php.ini).
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c.to_ascii_uppercase()),
        _ => (s, 'B'),
    };
    let n: u64 = digits.trim().parse().ok().filter(|n| *n > 0)?;
    let factor: u64 = match unit {
        'B' => 1,
        'K' => 1 << 10,
        'M' => 1 << 20,
        'G' => 1 << 30,
        _ => return None,
    };
    n.checked_mul(factor)
}
