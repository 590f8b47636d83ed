//! YAML files read once, with saphyr: a tree of [`Value`]s that serde types are deserialized
//! from, and the position of every value ([`Locations`]), so that a problem found by serde or
//! later by planning names its line.
//!
//! Enums are written as YAML users expect: a unit variant as a plain string (`start: earliest`),
//! any other as a one-key map (`sink: {parquet: {path: out.parquet}}`).

use std::borrow::Cow;
use std::fmt;

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};
use serde::de::value::{MapDeserializer, SeqDeserializer};
use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
use serde::ser::{SerializeMap, SerializeSeq};

use super::locate::{Locations, Position};

/// A YAML value (after YAML 1.2 core-schema resolution: `yes` is a string, `1.0` a float).
/// Mappings keep their order; their keys are the keys' text.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Value {
    #[default]
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
    Seq(Vec<Value>),
    Map(Vec<(String, Value)>),
}

/// A document that is not YAML, or uses YAML that ferry files do not (tags, complex keys).
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub message: String,
    pub position: Option<Position>,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some(p) => write!(f, "{} (line {}, column {})", self.message, p.line, p.column),
            None => f.write_str(&self.message),
        }
    }
}

/// Parses `text` (one document; an empty one is [`Value::Null`]) and indexes where each value
/// sits: a map entry at its key, a sequence item at the item.
pub fn parse(text: &str) -> Result<(Value, Locations), SyntaxError> {
    let mut docs = MarkedYaml::load_from_str(text).map_err(|e| SyntaxError {
        message: e.info().to_string(),
        position: Some(position(e.marker())),
    })?;
    if docs.len() > 1 {
        return Err(SyntaxError {
            message: "the file holds more than one YAML document (`---`); put one per file".into(),
            position: Some(position(&docs[1].span.start)),
        });
    }
    let mut locations = Locations::default();
    let value = match docs.pop() {
        None => Value::Null,
        Some(doc) => convert(doc, "", &mut locations)?,
    };
    Ok((value, locations))
}

/// Deserializes a whole YAML text into `T` (files whose problems need no line: tests,
/// embedded defaults).
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    let (value, _) = parse(text).map_err(|e| e.to_string())?;
    T::deserialize(value).map_err(|e| e.to_string())
}

fn position(m: &saphyr::Marker) -> Position {
    Position {
        line: m.line(),
        column: m.col() + 1,
    }
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

fn convert(node: MarkedYaml<'_>, path: &str, at: &mut Locations) -> Result<Value, SyntaxError> {
    let here = position(&node.span.start);
    let fail = |message: String| SyntaxError {
        message,
        position: Some(here),
    };
    Ok(match node.data {
        YamlData::Value(s) => scalar(s),
        YamlData::Representation(text, style, tag) => {
            match Scalar::parse_from_cow_and_metadata(text.clone(), style, tag.as_ref()) {
                Some(s) => scalar(s),
                None => return Err(fail(format!("'{text}' does not fit its tag"))),
            }
        }
        YamlData::Sequence(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                let p = format!("{path}[{i}]");
                at.insert(p.clone(), position(&item.span.start));
                out.push(convert(item, &p, at)?);
            }
            Value::Seq(out)
        }
        YamlData::Mapping(entries) => {
            let mut out = Vec::with_capacity(entries.len());
            for (key, value) in entries {
                let key_at = position(&key.span.start);
                let key = match convert(key, path, &mut Locations::default())? {
                    Value::String(s) => s,
                    Value::Bool(b) => b.to_string(),
                    Value::Int(i) => i.to_string(),
                    Value::Float(f) => f.to_string(),
                    Value::Null => "null".to_string(),
                    Value::Seq(_) | Value::Map(_) => {
                        return Err(SyntaxError {
                            message: "a key must be a plain value, not a list or a mapping".into(),
                            position: Some(key_at),
                        });
                    }
                };
                let p = join(path, &key);
                at.insert(p.clone(), key_at);
                out.push((key, convert(value, &p, at)?));
            }
            Value::Map(out)
        }
        YamlData::Tagged(tag, _) => {
            return Err(fail(format!(
                "YAML tags ({}{}) are not used in ferry files; write the value without it",
                tag.handle, tag.suffix
            )));
        }
        YamlData::Alias(_) => return Err(fail("an alias to an unknown anchor".into())),
        // An empty document.
        YamlData::BadValue if path.is_empty() => Value::Null,
        // A scalar whose tag it does not fit (`!!int abc`).
        YamlData::BadValue => return Err(fail("a value that does not fit its tag".into())),
    })
}

fn scalar(s: Scalar<'_>) -> Value {
    match s {
        Scalar::Null => Value::Null,
        Scalar::Boolean(b) => Value::Bool(b),
        Scalar::Integer(i) => Value::Int(i),
        Scalar::FloatingPoint(f) => Value::Float(f.into_inner()),
        Scalar::String(s) => Value::String(Cow::into_owned(s)),
    }
}

impl Value {
    fn unexpected(&self) -> de::Unexpected<'_> {
        match self {
            Value::Null => de::Unexpected::Unit,
            Value::Bool(b) => de::Unexpected::Bool(*b),
            Value::Int(i) => de::Unexpected::Signed(*i),
            Value::Float(f) => de::Unexpected::Float(*f),
            Value::String(s) => de::Unexpected::Str(s),
            Value::Seq(_) => de::Unexpected::Seq,
            Value::Map(_) => de::Unexpected::Map,
        }
    }
}

type Error = de::value::Error;

impl<'de> de::Deserializer<'de> for Value {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::Int(i) => visitor.visit_i64(i),
            Value::Float(f) => visitor.visit_f64(f),
            Value::String(s) => visitor.visit_string(s),
            Value::Seq(items) => {
                let mut seq = SeqDeserializer::new(items.into_iter());
                let out = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(out)
            }
            Value::Map(entries) => {
                let mut map = MapDeserializer::new(entries.into_iter());
                let out = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(out)
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self {
            Value::Null => visitor.visit_none(),
            other => visitor.visit_some(other),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self {
            Value::String(variant) => {
                let unit: de::value::StringDeserializer<Error> = variant.into_deserializer();
                visitor.visit_enum(unit)
            }
            Value::Map(mut entries) if entries.len() == 1 => {
                let (variant, value) = entries.pop().expect("one entry");
                visitor.visit_enum(Variant { variant, value })
            }
            other => Err(de::Error::invalid_type(
                other.unexpected(),
                &"a name, or a mapping with one key naming the kind",
            )),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

impl<'de> IntoDeserializer<'de, Error> for Value {
    type Deserializer = Value;

    fn into_deserializer(self) -> Value {
        self
    }
}

/// A one-key mapping read as an enum variant and its content.
struct Variant {
    variant: String,
    value: Value,
}

impl<'de> de::EnumAccess<'de> for Variant {
    type Error = Error;
    type Variant = Value;

    fn variant_seed<S: de::DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Value), Error> {
        let name: de::value::StringDeserializer<Error> = self.variant.into_deserializer();
        let variant = seed.deserialize(name)?;
        Ok((variant, self.value))
    }
}

impl<'de> de::VariantAccess<'de> for Value {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        match self {
            Value::Null => Ok(()),
            other => Err(de::Error::invalid_type(other.unexpected(), &"nothing")),
        }
    }

    fn newtype_variant_seed<S: de::DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, Error> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_seq(self, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_map(self, visitor)
    }
}

impl<'de> de::Deserialize<'de> for Value {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Value, D::Error> {
        struct ValueVisitor;

        impl<'de> Visitor<'de> for ValueVisitor {
            type Value = Value;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_unit<E>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_none<E>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
                <Value as de::Deserialize>::deserialize(d)
            }
            fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
                Ok(Value::Bool(b))
            }
            fn visit_i64<E>(self, i: i64) -> Result<Value, E> {
                Ok(Value::Int(i))
            }
            fn visit_u64<E: de::Error>(self, u: u64) -> Result<Value, E> {
                i64::try_from(u)
                    .map(Value::Int)
                    .map_err(|_| E::custom(format!("integer {u} is too large")))
            }
            fn visit_f64<E>(self, f: f64) -> Result<Value, E> {
                Ok(Value::Float(f))
            }
            fn visit_str<E>(self, s: &str) -> Result<Value, E> {
                Ok(Value::String(s.to_string()))
            }
            fn visit_string<E>(self, s: String) -> Result<Value, E> {
                Ok(Value::String(s))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element()? {
                    out.push(v);
                }
                Ok(Value::Seq(out))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(Value::Map(out))
            }
        }

        deserializer.deserialize_any(ValueVisitor)
    }
}

impl serde::Serialize for Value {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::Float(f) => s.serialize_f64(*f),
            Value::String(v) => s.serialize_str(v),
            Value::Seq(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Value::Map(entries) => {
                let mut map = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    #[test]
    fn finds_keys_and_items() {
        let text = "name: x\nsteps:\n  - sql: SELECT 1\n  - operator: embed\n    inputs: [text]\nsink:\n  parquet:\n    path: out.parquet\n";
        let (_, loc) = parse(text).unwrap();
        assert_eq!(loc.find("name").unwrap().line, 1);
        assert_eq!(loc.find("steps[1].operator").unwrap().line, 4);
        assert_eq!(loc.find("steps[1].inputs").unwrap().line, 5);
        assert_eq!(loc.find("steps[1].inputs[0]").unwrap().line, 5);
        assert_eq!(
            loc.find("sink.parquet.path").unwrap(),
            Position { line: 8, column: 5 }
        );
        // Unknown paths fall back to their nearest ancestor.
        assert_eq!(loc.find("sink.parquet.nope").unwrap().line, 7);
    }

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(rename_all = "snake_case", deny_unknown_fields)]
    enum Kind {
        Earliest,
        Timestamp(i64),
        File { path: String, rows: Option<u32> },
    }

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        kinds: Vec<Kind>,
        props: BTreeMap<String, String>,
        ratio: f64,
        flag: Option<bool>,
        columns: Value,
    }

    #[test]
    fn deserializes_enums_maps_and_ordered_mappings() {
        let text = "kinds:\n  - earliest\n  - timestamp: 5\n  - file: {path: a.parquet}\nprops:\n  yes: no\n  'n': '1'\nratio: 2\ncolumns:\n  z: string\n  a: int64\n";
        let doc: Doc = from_str(text).unwrap();
        assert_eq!(
            doc.kinds,
            vec![
                Kind::Earliest,
                Kind::Timestamp(5),
                Kind::File {
                    path: "a.parquet".into(),
                    rows: None
                }
            ]
        );
        // YAML 1.2: `yes` and `no` are strings.
        assert_eq!(doc.props["yes"], "no");
        assert_eq!(doc.ratio, 2.0);
        assert_eq!(doc.flag, None);
        let Value::Map(columns) = doc.columns else {
            panic!("a mapping")
        };
        let names: Vec<&str> = columns.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["z", "a"], "mappings keep the file's order");
    }

    #[test]
    fn problems_have_positions() {
        let e = parse("a: 1\nb: [1, 2\n").unwrap_err();
        assert!(e.position.is_some(), "{e}");
        assert!(parse("a: 1\na: 2\n").is_err(), "a key twice");
        let e = parse("a: !!int abc\n").unwrap_err();
        assert_eq!(e.position.map(|p| p.line), Some(1), "{e}");
        let e = parse("a: !custom 1\n").unwrap_err();
        assert!(e.message.contains("tags"), "{e}");
        assert_eq!(parse("").unwrap().0, Value::Null);
        let err = from_str::<Doc>("kinds: []\nprops: {}\nratio: x\ncolumns: {}\n").unwrap_err();
        assert!(
            err.contains("invalid type: string \"x\", expected f64"),
            "{err}"
        );
    }
}
