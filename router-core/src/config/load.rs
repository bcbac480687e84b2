//! File → YAML value → `${VAR}` interpolation → typed config (with the key path of any
//! error) → semantic validation.

use std::fmt;
use std::path::Path;

use serde_yaml_ng::{Mapping, Value};

use super::Config;

/// One problem at one place in the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted key path (`subscriptions.orders.retry.initial_delay`); empty for the root.
    pub path: String,
    pub message: String,
}

impl ConfigIssue {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigIssue { path: path.into(), message: message.into() }
    }
}

/// Why a config could not be used. `Display` gives one `FILE: PATH: MESSAGE` line per
/// problem, ready for a terminal.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read { file: String, source: std::io::Error },
    #[error("{file}: {message}")]
    Syntax { file: String, message: String },
    #[error("{}", render(.file, .issues))]
    Invalid { file: String, issues: Vec<ConfigIssue> },
}

fn render(file: &str, issues: &[ConfigIssue]) -> String {
    let mut out = String::new();
    for (i, issue) in issues.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        if issue.path.is_empty() {
            out.push_str(&format!("{file}: {}", issue.message));
        } else {
            out.push_str(&format!("{file}: {}: {}", issue.path, issue.message));
        }
    }
    out
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Read, interpolate, parse and validate a config file, taking `${VAR}` values from
/// the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, &|_| Vec::new())
}

/// [`load`], with the checks of a front (`front`: what the daemon's targets find in
/// their handler sections ...) reported together with the core's.
pub fn load_with(path: &Path, front: &dyn Fn(&Config) -> Vec<ConfigIssue>) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: file.clone(), source })?;
    parse_with(&text, &file, &|name| std::env::var(name).ok(), front)
}

/// Parse and validate config text; `file` names it in errors, `env` resolves `${VAR}`.
pub fn parse(text: &str, file: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    parse_with(text, file, env, &|_| Vec::new())
}

/// [`parse`], with a front's checks as in [`load_with`].
pub fn parse_with(
    text: &str,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
    front: &dyn Fn(&Config) -> Vec<ConfigIssue>,
) -> Result<Config, ConfigError> {
    let mut value: Value = serde_yaml_ng::from_str(text)
        .map_err(|e| ConfigError::Syntax { file: file.to_string(), message: format!("invalid YAML: {e}") })?;
    let mut issues = Vec::new();
    interpolate_value(&mut value, "", env, &mut issues);
    if !issues.is_empty() {
        return Err(ConfigError::Invalid { file: file.to_string(), issues });
    }
    let invalid = |issues| ConfigError::Invalid { file: file.to_string(), issues };
    let Value::Mapping(top) = value else {
        return Err(invalid(vec![ConfigIssue::new("", "the file must be a mapping (transports:, handlers: ...)")]));
    };
    let raw: Config<Mapping, Mapping> = super::section::parse(top, "").map_err(|issue| invalid(vec![issue]))?;
    let (config, mut issues) = raw.resolve().map_err(invalid)?;
    issues.extend(config.validate());
    issues.extend(front(&config));
    if issues.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid { file: file.to_string(), issues })
    }
}

fn interpolate_value(
    value: &mut Value,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    issues: &mut Vec<ConfigIssue>,
) {
    match value {
        Value::String(s) => match interpolate(s, env) {
            Ok(v) => *s = v,
            Err(message) => issues.push(ConfigIssue::new(path, message)),
        },
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate_value(item, &format!("{path}[{i}]"), env, issues);
            }
        }
        Value::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                let key = match k {
                    Value::String(s) => s.clone(),
                    other => format!("{other:?}"),
                };
                let sub = if path.is_empty() { key } else { format!("{path}.{key}") };
                interpolate_value(v, &sub, env, issues);
            }
        }
        Value::Tagged(tagged) => interpolate_value(&mut tagged.value, path, env, issues),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Replace `${VAR}` and `${VAR:-default}` in `s`; `$$` is a literal `$`. Interpolation
/// happens on parsed string values, so a secret containing YAML syntax stays a value.
pub fn interpolate(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body.find('}').ok_or_else(|| format!("unclosed `${{` in {s:?}"))?;
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("invalid variable name {name:?} in {s:?}"));
            }
            match (env(name), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set (set it, or write ${{{name}:-default}})"
                    ))
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod fuzz;
