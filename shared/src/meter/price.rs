//! What a request cost, from a price table in the configuration.
//!
//! Prices are USD per million tokens, as the providers publish them, with a
//! separate (usually lower) price for cached input and one (usually higher)
//! for input written to a prompt cache (Anthropic's
//! `cache_creation_input_tokens`). A model is looked up by
//! its exact name first, then by the longest configured name that the model
//! extends with `-` (so `gpt-4o` prices `gpt-4o-2024-08-06`, the name the
//! provider answers with). No price, or no usage, means no cost: `None`,
//! never zero.

use crate::config::ConfigError;
use crate::wire::usage::Usage;
use serde::Deserialize;
use std::collections::BTreeMap;

/// One model's prices as written in the configuration.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// USD per 1M input tokens.
    pub input: f64,
    /// USD per 1M cached input tokens; the input price when absent.
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// USD per 1M input tokens written to the prompt cache; the input price when absent.
    #[serde(default)]
    pub cache_write: Option<f64>,
    /// USD per 1M output tokens.
    pub output: f64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Price {
    input: f64,
    cached_input: f64,
    cache_write: f64,
    output: f64,
}

/// Costs are exact to this fraction of a micro-dollar: prices with up to
/// four decimals (USD per 1M) times whole tokens are multiples of it.
pub const PARTS_PER_MICRODOLLAR: u64 = 10_000;

/// The compiled price table.
#[derive(Clone, Debug, Default)]
pub struct Prices {
    by_model: BTreeMap<String, Price>,
}

impl Prices {
    pub fn compile(
        field: &str,
        table: &BTreeMap<String, PriceConfig>,
    ) -> Result<Prices, ConfigError> {
        let mut by_model = BTreeMap::new();
        for (model, p) in table {
            let check = |name: &str, v: f64| {
                if v.is_finite() && v >= 0.0 {
                    Ok(v)
                } else {
                    Err(ConfigError::new(
                        format!("{field}.{model}.{name}"),
                        format!("{v} is not a price (a finite number >= 0)"),
                    ))
                }
            };
            if model.is_empty() {
                return Err(ConfigError::new(field, "a model name is empty"));
            }
            let input = check("input", p.input)?;
            let price = Price {
                input,
                cached_input: check("cached_input", p.cached_input.unwrap_or(input))?,
                cache_write: check("cache_write", p.cache_write.unwrap_or(input))?,
                output: check("output", p.output)?,
            };
            by_model.insert(model.clone(), price);
        }
        Ok(Prices { by_model })
    }

    fn lookup(&self, model: &str) -> Option<&Price> {
        if let Some(p) = self.by_model.get(model) {
            return Some(p);
        }
        self.by_model
            .iter()
            .filter(|(name, _)| {
                model.len() > name.len()
                    && model.starts_with(name.as_str())
                    && model.as_bytes()[name.len()] == b'-'
            })
            .max_by_key(|(name, _)| name.len())
            .map(|(_, p)| p)
    }

    /// The cost in USD of `usage` on the first of `models` that has a price.
    pub fn cost(&self, models: &[Option<&str>], usage: &Usage) -> Option<f64> {
        let price = models.iter().flatten().find_map(|m| self.lookup(m))?;
        let input = usage.input_tokens?;
        let output = usage.output_tokens?;
        // Cached reads and cache writes are parts of the input.
        let cached = usage.cached_input_tokens.unwrap_or(0).min(input);
        let written = usage
            .cache_write_input_tokens
            .unwrap_or(0)
            .min(input - cached);
        let micro_usd = (input - cached - written) as f64 * price.input
            + cached as f64 * price.cached_input
            + written as f64 * price.cache_write
            + output as f64 * price.output;
        // Rounded to the part of a micro-dollar prices are exact to, so the
        // log shows 3.3e-6 rather than 3.2999999999999997e-6.
        let parts = PARTS_PER_MICRODOLLAR as f64;
        Some((micro_usd * parts).round() / parts / 1e6)
    }
}

#[cfg(test)]
#[allow(clippy::type_complexity)] // tables of cases read best inline
mod tests {
    use super::*;
    use crate::wire::usage::UsageSource;

    fn table() -> Prices {
        let cfg: BTreeMap<String, PriceConfig> = serde_json::from_str(
            r#"{"gpt-4o":{"input":2.5,"cached_input":1.25,"output":10},
                "gpt-4o-mini":{"input":0.15,"output":0.6},
                "claude-sonnet-4-5":{"input":3,"cached_input":0.3,"cache_write":3.75,"output":15}}"#,
        )
        .unwrap();
        Prices::compile("prices", &cfg).unwrap()
    }

    fn usage(i: u64, o: u64, c: Option<u64>) -> Usage {
        Usage {
            input_tokens: Some(i),
            output_tokens: Some(o),
            cached_input_tokens: c,
            cache_write_input_tokens: None,
            reasoning_tokens: None,
            source: UsageSource::Provider,
        }
    }

    #[test]
    fn prices_by_exact_then_longest_prefix() {
        let p = table();
        let cases: &[(&[Option<&str>], Usage, Option<f64>)] = &[
            (&[Some("gpt-4o")], usage(1_000_000, 0, None), Some(2.5)),
            (
                &[Some("gpt-4o")],
                usage(1_000_000, 1_000_000, Some(400_000)),
                Some(1.5 + 0.5 + 10.0),
            ),
            (
                &[Some("gpt-4o-2024-08-06")],
                usage(0, 1_000_000, None),
                Some(10.0),
            ),
            (
                &[Some("gpt-4o-mini-2024-07-18")],
                usage(1_000_000, 0, Some(1_000_000)),
                Some(0.15),
            ),
            (&[Some("gpt-4omni")], usage(1, 1, None), None),
            (
                &[Some("unknown"), Some("gpt-4o")],
                usage(1_000_000, 0, None),
                Some(2.5),
            ),
            (&[None], usage(1, 1, None), None),
            // Anthropic: 1M input of which 0.5M read from and 0.25M written to the cache.
            (
                &[Some("claude-sonnet-4-5-20250929")],
                Usage {
                    cache_write_input_tokens: Some(250_000),
                    ..usage(1_000_000, 0, Some(500_000))
                },
                Some(0.75 + 0.15 + 0.9375),
            ),
            // No cache_write price: written input costs what input costs.
            (
                &[Some("gpt-4o-mini")],
                Usage {
                    cache_write_input_tokens: Some(1_000_000),
                    ..usage(1_000_000, 0, None)
                },
                Some(0.15),
            ),
            // A cheap request is not rounded away: 10 tokens of gpt-4o-mini.
            (&[Some("gpt-4o-mini")], usage(4, 6, None), Some(0.000_004_2)),
            (&[Some("gpt-4o")], usage(1, 0, Some(1)), Some(0.000_001_25)),
            (&[Some("gpt-4o")], Usage::default(), None),
        ];
        for (models, u, want) in cases {
            let got = p.cost(models, u);
            match (got, want) {
                (Some(g), Some(w)) => assert!((g - w).abs() < 1e-9, "{models:?}: {g} != {w}"),
                _ => assert_eq!(got, *want, "{models:?}"),
            }
        }
    }

    #[test]
    fn rejects_bad_prices() {
        let cfg: BTreeMap<String, PriceConfig> =
            serde_json::from_str(r#"{"m":{"input":-1,"output":1}}"#).unwrap();
        let err = Prices::compile("prices", &cfg).unwrap_err();
        assert_eq!(err.field, "prices.m.input");
        let cfg: BTreeMap<String, PriceConfig> =
            serde_json::from_str(r#"{"m":{"input":1,"cache_write":-1,"output":1}}"#).unwrap();
        let err = Prices::compile("prices", &cfg).unwrap_err();
        assert_eq!(err.field, "prices.m.cache_write");
    }
}
