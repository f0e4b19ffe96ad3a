//! JSON parsing that refuses duplicate object keys.
//!
//! `serde_json::Value` keeps the last of two equal keys, so `{"a": 1, "a": 2}` silently means `{"a": 2}`. A
//! checkpoint header that names a tensor twice, or gives a tensor two `data_offsets`, is ambiguous (RFC 8259 §4:
//! names SHOULD be unique; readers disagree on which one wins), so the readers here reject it as a parse error
//! that names the key and its position.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// A [`Value`] whose objects, at every depth, had no duplicate keys in the source text.
pub(crate) struct StrictValue(pub Value);

/// Parses `text` into a JSON object, rejecting duplicate keys at any depth.
pub(crate) fn object_from_str(text: &str) -> serde_json::Result<Map<String, Value>> {
    match serde_json::from_str::<StrictValue>(text)?.0 {
        Value::Object(m) => Ok(m),
        _ => Err(de::Error::custom("the header is not a JSON object")),
    }
}

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = StrictValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value without duplicate object keys")
    }
    fn visit_bool<E>(self, v: bool) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Number(v.into())))
    }
    fn visit_u64<E>(self, v: u64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Number(v.into())))
    }
    fn visit_f64<E>(self, v: f64) -> Result<StrictValue, E> {
        // serde_json only produces finite floats.
        Ok(StrictValue(Number::from_f64(v).map_or(Value::Null, Value::Number)))
    }
    fn visit_str<E>(self, v: &str) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(v)))
    }
    fn visit_unit<E>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }
    fn visit_none<E>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StrictValue, A::Error> {
        let mut out = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(StrictValue(Value::Array(out)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StrictValue, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!("duplicate key `{key}`")));
            }
            let StrictValue(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(StrictValue(Value::Object(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_serde_json_without_duplicates() {
        let text = r#"{"a": {"dtype": "F32", "shape": [2, 3], "x": [1.5, -2, null, true, "s"]}, "b": {}}"#;
        let ours = object_from_str(text).unwrap();
        let theirs: Map<String, Value> = serde_json::from_str(text).unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn rejects_duplicates_at_every_depth() {
        for text in [
            r#"{"a": 1, "a": 1}"#,
            r#"{"t": {"data_offsets": [0, 4], "data_offsets": [0, 4]}}"#,
            r#"{"t": {"m": [{"k": 1, "k": 2}]}}"#,
        ] {
            let err = object_from_str(text).unwrap_err().to_string();
            assert!(err.contains("duplicate key"), "{text}: {err}");
        }
    }

    #[test]
    fn rejects_non_objects_at_the_root() {
        for text in ["[1, 2]", "3", "\"s\"", "null"] {
            assert!(object_from_str(text).is_err(), "{text}");
        }
    }
}
