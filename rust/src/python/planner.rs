//! Planner settings from Python keyword arguments, the one way both the
//! live cache and the trace replay are tuned.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::{to_py, MoeOffloadError};
use crate::planner::PlannerConfig;
use crate::trace::Replacement;

/// Keyword arguments that tune the planner, as the docs name them.
pub const SETTINGS: [&str; 12] = [
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
];

/// `PlannerConfig::default()` with the settings present in `kwargs`
/// (None values keep the default).
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
        match key.as_str() {
            "matches" => config.matches = value.extract()?,
            "own_weight" => config.own_weight = value.extract()?,
            "eamc_weight" => config.eamc_weight = value.extract()?,
            "global_weight" => config.global_weight = value.extract()?,
            "prefetch_depth" => config.prefetch_depth = value.extract()?,
            "horizon" => config.horizon = value.extract()?,
            "eamc_capacity" => config.eamc_capacity = value.extract()?,
            "replacement" => {
                config.replacement =
                    Replacement::parse(&value.extract::<String>()?).map_err(to_py)?
            }
            "recency" => config.recency = value.extract()?,
            "affinity_weight" => config.affinity_weight = value.extract()?,
            "affinity_horizon" => config.affinity_horizon = value.extract()?,
            "reuse_weight" => config.reuse_weight = value.extract()?,
            other => {
                return Err(MoeOffloadError::new_err(format!(
                    "unknown planner setting {other:?}; known: {}",
                    SETTINGS.join(", ")
                )))
            }
        }
    }
    Ok(config)
}
