//! Tools for the parts of the config that a component owns: a broker's transport and
//! subscription sections, a delivery target's handler section. The loader hands each
//! component its part as a YAML mapping; the component parses it into its own type
//! (which denies unknown fields) with [`parse`], which names any problem by its key
//! path in the file, and reports what it finds wrong through [`Issues`].

use serde::de::{self, DeserializeOwned, Visitor};
use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

use super::ConfigIssue;

/// The problems found so far, each at its key path.
#[derive(Debug, Default)]
pub struct Issues(Vec<ConfigIssue>);

impl Issues {
    pub fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigIssue::new(path, message));
    }

    pub fn push(&mut self, issue: ConfigIssue) {
        self.0.push(issue);
    }

    /// Each of `names` (the list at `path`, of `what`: topics, streams) is not empty
    /// and listed once.
    pub fn check_names(&mut self, names: &[String], path: &str, what: &str) {
        for (i, name) in names.iter().enumerate() {
            if name.is_empty() {
                self.add(format!("{path}[{i}]"), "must not be empty");
            } else if names[..i].contains(name) {
                self.add(format!("{path}[{i}]"), format!("{what} {name:?} is listed twice"));
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_vec(self) -> Vec<ConfigIssue> {
        self.0
    }
}

/// `map` as a `T`; a problem is named by its key path under `path` (`subscriptions.orders`).
pub fn parse<T: DeserializeOwned>(map: Mapping, path: &str) -> Result<T, ConfigIssue> {
    serde_path_to_error::deserialize(Value::Mapping(map)).map_err(|e| {
        let inner = e.path().to_string();
        let path = match (path.is_empty(), inner.as_str()) {
            (_, ".") => path.to_string(),
            (true, _) => inner,
            (false, _) if inner.starts_with('[') => format!("{path}{inner}"),
            (false, _) => format!("{path}.{inner}"),
        };
        ConfigIssue::new(path, e.inner().to_string())
    })
}

/// Split `map` into the entries whose key is one of `fields` and the rest.
pub fn split(map: Mapping, fields: &[&str]) -> (Mapping, Mapping) {
    map.into_iter().partition(|(k, _)| k.as_str().is_some_and(|k| fields.contains(&k)))
}

/// The keys a struct deriving `Deserialize` takes (skipped fields excepted), as serde
/// itself lists them: the one list the parse and the messages about keys share.
pub fn field_names<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    let mut names: &'static [&'static str] = &[];
    // The deserializer stops with an error once serde has told it the names.
    let _ = T::deserialize(FieldNames(&mut names));
    names
}

struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> de::Deserializer<'de> for FieldNames<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("only structs list their fields"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("fields listed"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// `url` parses and has one of `schemes`.
pub fn check_url(url: &str, schemes: &[&str], path: &str, issues: &mut Issues) {
    if url.is_empty() {
        return issues.add(path, format!("set the broker's URL ({}://...)", schemes[0]));
    }
    match url::Url::parse(url) {
        Ok(u) if schemes.contains(&u.scheme()) => {}
        Ok(u) => issues.add(path, format!("scheme must be {}, not {:?}", schemes.join(" or "), u.scheme())),
        Err(e) => issues.add(path, format!("not a valid URL: {e}")),
    }
}

/// `` `a`, `b`, `c` ``, for messages about keys.
pub fn quoted(names: &[&str]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Section {
        name: String,
        #[serde(default)]
        items: Vec<u32>,
        #[serde(skip)]
        filled_later: (),
    }

    fn mapping(yaml: &str) -> Mapping {
        serde_yaml_ng::from_str(yaml).expect("test yaml")
    }

    #[test]
    fn field_names_are_serdes_own_list() {
        assert_eq!(field_names::<Section>(), ["name", "items"]);
    }

    #[test]
    fn problems_are_named_under_the_section_path() {
        let e = parse::<Section>(mapping("{ name: a, items: [1, x] }"), "things.one").expect_err("bad item");
        assert_eq!(e.path, "things.one.items[1]");
        let e = parse::<Section>(mapping("{ items: [] }"), "things.one").expect_err("no name");
        assert_eq!(e.path, "things.one");
        assert!(e.message.contains("missing field `name`"), "{e:?}");
        let e = parse::<Section>(mapping("{ name: a, nmae: b }"), "").expect_err("unknown");
        assert_eq!(e.path, "nmae");
    }

    #[test]
    fn split_keeps_the_named_keys_apart() {
        let (mine, rest) = split(mapping("{ name: a, other: 1, 3: x }"), field_names::<Section>());
        assert_eq!(mine, mapping("{ name: a }"));
        assert_eq!(rest, mapping("{ other: 1, 3: x }"));
    }
}
