//! Planner settings from Python keyword arguments, the one way both the
//! live cache and the trace replay are tuned.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::{to_py, MoeOffloadError};
use crate::planner::PlannerConfig;
use crate::trace::Replacement;

/// Keyword arguments that tune the planner, as the docs name them.
pub const SETTINGS: [&str; 13] = [
    "matches",
    "own_weight",
    "eamc_weight",
    "global_weight",
    "prefetch_depth",
    "horizon",
    "eamc_capacity",
    "replacement",
    "recency",
    "affinity_weight",
    "affinity_horizon",
    "reuse_weight",
    "lookahead_weight",
];

/// `PlannerConfig::default()` with the settings present in `kwargs`
/// (None values keep the default), checked before anything is built from
/// them: a bad value raises MoeOffloadError naming the setting.
pub fn planner_config(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<PlannerConfig> {
    let mut config = PlannerConfig::default();
    let Some(kwargs) = kwargs else {
        return Ok(config);
    };
    for (key, value) in kwargs.iter() {
        let key: String = key.extract()?;
        if value.is_none() {
            continue;
        }
        let count = || count(&key, &value);
        let weight = || weight(&key, &value);
        match key.as_str() {
            "matches" => config.matches = count()?,
            "own_weight" => config.own_weight = weight()?,
            "eamc_weight" => config.eamc_weight = weight()?,
            "global_weight" => config.global_weight = weight()?,
            "prefetch_depth" => config.prefetch_depth = count()?,
            "horizon" => config.horizon = count()?,
            "eamc_capacity" => config.eamc_capacity = count()?,
            "replacement" => {
                config.replacement =
                    Replacement::parse(&value.extract::<String>()?).map_err(to_py)?
            }
            "recency" => config.recency = weight()?,
            "affinity_weight" => config.affinity_weight = weight()?,
            "affinity_horizon" => config.affinity_horizon = count()?,
            "reuse_weight" => config.reuse_weight = weight()?,
            "lookahead_weight" => config.lookahead_weight = weight()?,
            other => {
                return Err(MoeOffloadError::new_err(format!(
                    "unknown planner setting {other:?}; known: {}",
                    SETTINGS.join(", ")
                )))
            }
        }
    }
    config.check().map_err(to_py)?;
    Ok(config)
}

/// A count setting: a non-negative integer below 2**64.
fn count(key: &str, value: &Bound<'_, PyAny>) -> PyResult<usize> {
    value
        .extract()
        .map_err(|_| bad_setting(key, value, "a non-negative integer"))
}

/// A weight setting: a number.
fn weight(key: &str, value: &Bound<'_, PyAny>) -> PyResult<f32> {
    value
        .extract()
        .map_err(|_| bad_setting(key, value, "a number"))
}

fn bad_setting(key: &str, value: &Bound<'_, PyAny>, expected: &str) -> PyErr {
    let shown = value
        .repr()
        .map_or_else(|_| "?".to_string(), |r| r.to_string());
    MoeOffloadError::new_err(format!("{key}={shown}: expected {expected}"))
}
