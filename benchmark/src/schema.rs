//! What the result types of the benchmark and the soak share: the schema
//! version, a scenario's outcome (its figures, or the error that stopped
//! it), and how figures print.
//!
//! The JSON keeps the shape the untyped results had (results without a
//! `schema_version` are version 1, and read the same): a failed scenario is
//! `{"error": "..."}` in place of its figures, next to the fields every
//! scenario has; a figure the run could not produce (a NaN, a counter that
//! did not appear) is `null`.

use serde::{Deserialize, Deserializer, Serialize, Serializer, de::DeserializeOwned, ser::Error};
use serde_json::{Map, Value};

/// The version of the result files' schema this code writes: 1 is the
/// untyped results (no `schema_version` field), 2 adds the field, 3 times
/// the benchmark's 15 s window scrapes undecoded (`window_scrape_ms` holds
/// only those between the first and the last; 2 held the first too, timed
/// with curl decoding the body). Raise it when a field changes meaning or
/// goes away; new optional fields need not.
pub const SCHEMA_VERSION: u32 = 3;

/// Results written before the field existed.
pub fn version_1() -> u32 {
    1
}

/// A scenario's (or one size's) figures, or why there are none.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome<T> {
    Measured(T),
    Failed(String),
}

impl<T> Outcome<T> {
    pub fn measured(&self) -> Option<&T> {
        match self {
            Self::Measured(t) => Some(t),
            Self::Failed(_) => None,
        }
    }

    pub fn error(&self) -> Option<&str> {
        match self {
            Self::Measured(_) => None,
            Self::Failed(e) => Some(e),
        }
    }
}

impl<T> From<anyhow::Result<T>> for Outcome<T> {
    fn from(r: anyhow::Result<T>) -> Self {
        r.map_or_else(|e| Self::Failed(format!("{e:#}")), Self::Measured)
    }
}

/// An [`Outcome`] as a JSON object: `T`'s fields, or `{"error": ...}`.
impl<T: Serialize> Serialize for Outcome<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        object(self).map_err(S::Error::custom)?.serialize(s)
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Outcome<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = Map::deserialize(d)?;
        outcome(map).map_err(serde::de::Error::custom)
    }
}

fn object<T: Serialize>(o: &Outcome<T>) -> serde_json::Result<Map<String, Value>> {
    match o {
        Outcome::Measured(t) => match serde_json::to_value(t)? {
            Value::Object(m) => Ok(m),
            other => Err(Error::custom(format!("not an object: {other}"))),
        },
        Outcome::Failed(e) => Ok(Map::from_iter([("error".into(), Value::from(e.clone()))])),
    }
}

fn outcome<T: DeserializeOwned>(map: Map<String, Value>) -> serde_json::Result<Outcome<T>> {
    match map.get("error") {
        Some(Value::String(e)) => Ok(Outcome::Failed(e.clone())),
        _ => serde_json::from_value(Value::Object(map)).map(Outcome::Measured),
    }
}

/// An [`Outcome`] with fields it has either way (`M`: how long it took,
/// the load meanwhile; a scale row's pod count), all in one JSON object.
#[derive(Clone, Debug, PartialEq)]
pub struct Ran<M, T> {
    pub meta: M,
    pub outcome: Outcome<T>,
}

impl<M: Serialize, T: Serialize> Serialize for Ran<M, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = object(&self.outcome).map_err(S::Error::custom)?;
        match serde_json::to_value(&self.meta).map_err(S::Error::custom)? {
            Value::Object(m) => map.extend(m),
            other => return Err(S::Error::custom(format!("not an object: {other}"))),
        }
        map.serialize(s)
    }
}

impl<'de, M: DeserializeOwned, T: DeserializeOwned> Deserialize<'de> for Ran<M, T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let map = Map::deserialize(d)?;
        // Each side ignores the other's fields.
        let meta = serde_json::from_value(Value::Object(map.clone())).map_err(D::Error::custom)?;
        let outcome = outcome(map).map_err(D::Error::custom)?;
        Ok(Self { meta, outcome })
    }
}

/// `x` if it is a number (not NaN or infinite): what JSON can hold.
pub fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// `x` rounded to `digits` decimals, for readable JSON.
pub fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

/// [`round`], `None` where `x` is not a number.
pub fn rounded(x: f64, digits: i32) -> Option<f64> {
    finite(round(x, digits))
}

/// A figure as its JSON text (`null` where missing, `30.0` for a float):
/// how the soak's table has always printed them.
pub fn json_text<T: Serialize + ?Sized>(x: &T) -> String {
    serde_json::to_string(x).unwrap_or_default()
}

/// A figure as text with `digits` decimals, `–` where missing.
pub fn num(x: impl Figure, digits: usize) -> String {
    match x.figure() {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        Some(x) => format!("{x}"),
        None => "–".into(),
    }
}

/// A number of the results, or a missing one.
pub trait Figure {
    fn figure(self) -> Option<f64>;
}

impl Figure for f64 {
    fn figure(self) -> Option<f64> {
        Some(self)
    }
}

impl Figure for u64 {
    fn figure(self) -> Option<f64> {
        Some(self as f64)
    }
}

impl<T: Figure> Figure for Option<T> {
    fn figure(self) -> Option<f64> {
        self.and_then(Figure::figure)
    }
}

impl<T: Figure + Copy> Figure for &T {
    fn figure(self) -> Option<f64> {
        (*self).figure()
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Figures {
        x: Option<f64>,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Meta {
        secs: Option<f64>,
    }

    #[test]
    fn outcome_is_the_figures_or_an_error_beside_the_meta() {
        let ok: Ran<Meta, Figures> = Ran {
            meta: Meta { secs: Some(1.5) },
            outcome: Outcome::Measured(Figures { x: None }),
        };
        let text = serde_json::to_string(&ok).unwrap();
        assert_eq!(text, r#"{"secs":1.5,"x":null}"#);
        assert_eq!(
            serde_json::from_str::<Ran<Meta, Figures>>(&text).unwrap(),
            ok
        );
        let failed: Ran<Meta, Figures> = Ran {
            meta: Meta { secs: None },
            outcome: Outcome::Failed("no cluster".into()),
        };
        let text = serde_json::to_string(&failed).unwrap();
        assert_eq!(text, r#"{"error":"no cluster","secs":null}"#);
        assert_eq!(
            serde_json::from_str::<Ran<Meta, Figures>>(&text).unwrap(),
            failed
        );
    }

    #[test]
    fn a_wrong_figure_is_an_error_not_a_failure() {
        let e = serde_json::from_str::<Outcome<Figures>>(r#"{"x":"many"}"#).unwrap_err();
        assert!(e.to_string().contains("invalid type"), "{e}");
    }

    #[test]
    fn figures_print() {
        assert_eq!(num(1.23456, 2), "1.23");
        assert_eq!(num(None::<f64>, 2), "–");
        assert_eq!(num(7u64, 0), "7");
        assert_eq!(json_text(&Some(30.0)), "30.0");
        assert_eq!(json_text(&None::<f64>), "null");
        assert_eq!(finite(f64::NAN), None);
        assert_eq!(rounded(f64::INFINITY, 1), None);
    }
}
