//! Turns a serde-saphyr error (syntax, unknown or missing key, wrong type)
//! into a [`ConfigError`] with a YAML path. serde-saphyr reports a line and
//! column but no path, so the document is read a second time as a bare
//! tree of located nodes and the error's position is mapped back to the
//! innermost key or value at or before it.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use super::ConfigError;

/// Converts a deserialization error of `text` into a located config error.
pub(super) fn serde_error(text: &str, err: &serde_saphyr::Error) -> ConfigError {
    let err = err.without_snippet();
    let mut message = err.to_string();
    let blank = text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---"
    });
    if blank {
        return ConfigError::new(
            "",
            "the config is empty (it needs at least mesh and identity)",
        );
    }
    let Some(loc) = err.location() else {
        return ConfigError::new("", message);
    };
    let (line, column) = (loc.line(), loc.column());
    // The plain rendering ends with the position; we put it in parentheses
    // after the message instead, behind the path.
    let suffix = format!(" at line {line}, column {column}");
    if let Some(stripped) = message.strip_suffix(&suffix) {
        message = stripped.to_owned();
    }
    // Raw ports and windows are wide integers only to range-check them
    // later; the user just wrote something that is not a number.
    if message == "invalid i64" {
        message = "expected an integer".to_owned();
    }
    // This hint is for Rust developers, not for whoever edits the file.
    if let Some(m) = message.strip_suffix(", set DuplicateKeyPolicy in Options if acceptable") {
        message = m.to_owned();
    }
    // A missing key is reported where its mapping starts, which is also
    // where the mapping's first key is; the path is the mapping's.
    let want_mapping = message.starts_with("missing field");
    let path = path_at(text, line, column, want_mapping).unwrap_or_default();
    ConfigError::new(path, format!("{message} (line {line}, column {column})"))
}

/// The path of the innermost node starting at or before `line:column`, or
/// `None` when the text is not even well-formed YAML.
fn path_at(text: &str, line: u64, column: u64, want_mapping: bool) -> Option<String> {
    // Repeated keys are themselves a reported error; let them through here
    // so that error can be located too.
    let mut options = super::yaml_options();
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::PassThrough;
    let root: Spanned<Node> = serde_saphyr::from_str_with_options(text, options).ok()?;
    let mut found = Vec::new();
    walk(&root, String::new(), 0, &mut found);
    found
        .into_iter()
        .filter(|s| (s.line, s.column) <= (line, column) && (!want_mapping || s.is_mapping))
        .max_by_key(|s| (s.line, s.column, s.depth))
        .map(|s| s.path)
}

struct Site {
    line: u64,
    column: u64,
    depth: usize,
    is_mapping: bool,
    path: String,
}

fn walk(node: &Spanned<Node>, path: String, depth: usize, out: &mut Vec<Site>) {
    let at = node.referenced;
    out.push(Site {
        line: at.line(),
        column: at.column(),
        depth,
        is_mapping: matches!(node.value, Node::Map(_)),
        path: path.clone(),
    });
    match &node.value {
        Node::Map(entries) => {
            for (key, value) in entries {
                let child = if path.is_empty() {
                    key.value.0.clone()
                } else {
                    format!("{path}.{}", key.value.0)
                };
                out.push(Site {
                    line: key.referenced.line(),
                    column: key.referenced.column(),
                    depth: depth + 1,
                    is_mapping: false,
                    path: child.clone(),
                });
                walk(value, child, depth + 1, out);
            }
        }
        Node::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                walk(item, format!("{path}[{i}]"), depth + 1, out);
            }
        }
        Node::Scalar => {}
    }
}

/// Any YAML node, keeping only what locating needs.
enum Node {
    Map(Vec<(Spanned<Key>, Spanned<Node>)>),
    Seq(Vec<Spanned<Node>>),
    Scalar,
}

/// A mapping key, rendered as text whatever its scalar type.
struct Key(String);

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(Node::Map(entries))
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(KeyVisitor)
    }
}

struct KeyVisitor;

impl Visitor<'_> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a scalar mapping key")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Key, E> {
        Ok(Key(v.to_string()))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Key, E> {
        Ok(Key(v.to_string()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Key, E> {
        Ok(Key(v.to_string()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Key, E> {
        Ok(Key(v.to_string()))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
        Ok(Key(v.to_owned()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Key, E> {
        Ok(Key("null".to_owned()))
    }
}
