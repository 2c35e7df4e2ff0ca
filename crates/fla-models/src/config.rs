//! Reading `config.json` fields with errors that name the field.
use fla_core::{Error, Result};
use serde_json::Value;

/// A JSON object with typed, named field access.
pub struct Fields<'a> {
    obj: &'a Value,
}

fn bad(field: &str, msg: impl Into<String>) -> Error {
    Error::Config { field: field.to_string(), msg: msg.into() }
}

impl<'a> Fields<'a> {
    /// Wraps an object (`config.json` or a nested `text_config`).
    pub fn new(obj: &'a Value) -> Result<Self> {
        if !obj.is_object() {
            return Err(bad("(root)", "config must be a JSON object"));
        }
        Ok(Fields { obj })
    }
    /// The raw value of `field`, if present and not null.
    pub fn get(&self, field: &str) -> Option<&'a Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }
    /// A required positive-or-zero integer.
    pub fn usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?.ok_or_else(|| bad(field, "missing"))
    }
    /// An optional integer.
    pub fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        self.get(field)
            .map(|v| {
                v.as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| bad(field, format!("expected a non-negative integer, got {v}")))
            })
            .transpose()
    }
    /// An optional number.
    pub fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        self.get(field).map(|v| v.as_f64().ok_or_else(|| bad(field, format!("expected a number, got {v}")))).transpose()
    }
    /// An optional boolean.
    pub fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        self.get(field)
            .map(|v| v.as_bool().ok_or_else(|| bad(field, format!("expected a boolean, got {v}"))))
            .transpose()
    }
    /// An optional string.
    pub fn opt_str(&self, field: &str) -> Result<Option<&'a str>> {
        self.get(field).map(|v| v.as_str().ok_or_else(|| bad(field, format!("expected a string, got {v}")))).transpose()
    }
    /// An optional list of strings.
    pub fn opt_strings(&self, field: &str) -> Result<Option<Vec<&'a str>>> {
        self.get(field)
            .map(|v| {
                v.as_array()
                    .and_then(|a| a.iter().map(|x| x.as_str()).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| bad(field, format!("expected a list of strings, got {v}")))
            })
            .transpose()
    }
    /// An optional list of integers.
    pub fn opt_usizes(&self, field: &str) -> Result<Option<Vec<usize>>> {
        self.get(field)
            .map(|v| {
                v.as_array()
                    .and_then(|a| a.iter().map(|x| x.as_u64().map(|u| u as usize)).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| bad(field, format!("expected a list of integers, got {v}")))
            })
            .transpose()
    }
    /// An optional per-layer list of two names (`layer_types`: `full_attention` /
    /// `linear_attention`) as flags: true where the entry is `yes`. It must hold `layers` entries.
    pub fn layer_flags(&self, field: &str, layers: usize, yes: &str, no: &str) -> Result<Option<Vec<bool>>> {
        let Some(types) = self.opt_strings(field)? else { return Ok(None) };
        if types.len() != layers {
            return Err(bad(field, format!("{} entries for {layers} layers", types.len())));
        }
        types
            .iter()
            .map(|&t| match t {
                t if t == yes => Ok(true),
                t if t == no => Ok(false),
                other => Err(bad(field, format!("unknown entry `{other}` (expected `{yes}` or `{no}`)"))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
    /// A nested object.
    pub fn object(&self, field: &str) -> Result<Option<Fields<'a>>> {
        self.get(field).map(Fields::new).transpose()
    }
    /// Fails unless `field` is absent or equal to `want` (for options fla-rs does not implement).
    pub fn expect_str(&self, field: &str, want: &[&str]) -> Result<()> {
        match self.opt_str(field)? {
            Some(v) if !want.contains(&v) => Err(bad(field, format!("`{v}` is not supported (supported: {want:?})"))),
            _ => Ok(()),
        }
    }
    /// Fails if a boolean option is set to true (a feature fla-rs does not implement).
    pub fn expect_false(&self, field: &str) -> Result<()> {
        if self.opt_bool(field)? == Some(true) {
            return Err(bad(field, "true is not supported"));
        }
        Ok(())
    }
}

/// The error for a field with an unsupported value.
pub fn unsupported(field: &str, msg: impl Into<String>) -> Error {
    bad(field, msg)
}
