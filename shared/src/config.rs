//! Plugin configuration: parsed as written, then compiled.
//!
//! Each filter's configuration is JSON (Envoy passes the `configuration` string
//! of the Wasm filter). It is read in two steps, as ripgrep reads its
//! arguments: serde structs with `deny_unknown_fields` that hold exactly what
//! the user wrote, then a `compile` step that checks values and builds the
//! runtime form. Either step fails with a [`ConfigError`] naming the field and
//! the reason, which the shell logs before returning `false` from
//! `on_configure` so that Envoy rejects the configuration whole.

use serde::de::DeserializeOwned;
use std::fmt;

/// A configuration the filter refuses, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the offending field (`prices.gpt-4o.input`; an unknown
    /// field names itself), or `.` for the whole document.
    pub field: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// Parses a plugin configuration. An empty document means "all defaults".
pub fn parse<T: DeserializeOwned + Default>(bytes: &[u8]) -> Result<T, ConfigError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        // serde_json appends " at line L column C"; the field path says more.
        let reason = e.inner().to_string();
        let reason = match reason.rfind(" at line ") {
            Some(i) => reason[..i].to_string(),
            None => reason,
        };
        ConfigError::new(field, reason)
    })?;
    de.end().map_err(|e| {
        ConfigError::new(
            ".",
            format!("trailing characters after the configuration: {e}"),
        )
    })?;
    Ok(value)
}

/// The configuration of a filter that takes none yet: only `{}` (or nothing).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// Checks that a configured header name is one Envoy will match: lower case
/// token characters (Envoy stores header names lower-cased).
pub fn header_name(field: &str, name: &str) -> Result<String, ConfigError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok {
        Ok(name.to_string())
    } else {
        Err(ConfigError::new(
            field,
            format!("{name:?} is not a lower-case HTTP header name"),
        ))
    }
}

/// A configured number, or its default, if it lies within `range`.
pub fn within<T>(
    field: &str,
    value: Option<T>,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError>
where
    T: PartialOrd + fmt::Display + Copy,
{
    let v = value.unwrap_or(default);
    if range.contains(&v) {
        Ok(v)
    } else {
        Err(ConfigError::new(
            field,
            format!("{v} is outside {}..={}", range.start(), range.end()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        limit: u32,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Doc {
        name: String,
        inner: Inner,
    }

    #[test]
    fn errors_name_the_field_and_the_reason() {
        let cases: &[(&str, &str, &str)] = &[
            (r#"{"nmae":"x"}"#, "nmae", "unknown field `nmae`"),
            (r#"{"inner":{"limit":-1}}"#, "inner.limit", "invalid value"),
            (
                r#"{"inner":{"limt":1}}"#,
                "inner.limt",
                "unknown field `limt`",
            ),
            (r#"{"name":"a"} x"#, ".", "trailing characters"),
            (r#"{"name":"#, "name", "EOF"),
        ];
        for (doc, field, reason) in cases {
            let err = parse::<Doc>(doc.as_bytes()).unwrap_err();
            assert_eq!(err.field, *field, "{doc}");
            assert!(err.reason.contains(reason), "{doc}: {}", err.reason);
        }
    }

    #[test]
    fn empty_document_is_defaults() {
        let doc: Doc = parse(b"  ").unwrap();
        assert_eq!(doc.inner.limit, 0);
    }

    #[test]
    fn numbers_must_be_within_their_range() {
        assert_eq!(within("n", None, 5, 1..=10), Ok(5));
        assert_eq!(within("n", Some(10), 5, 1..=10), Ok(10));
        let e = within("n", Some(0u64), 5, 1..=10).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.reason.as_str()),
            ("n", "0 is outside 1..=10")
        );
    }

    #[test]
    fn header_names_must_be_lower_case_tokens() {
        assert!(header_name("h", "x-consumer").is_ok());
        assert!(header_name("h", "X-Consumer").is_err());
        assert!(header_name("h", "").is_err());
        assert!(header_name("h", "a b").is_err());
    }
}
