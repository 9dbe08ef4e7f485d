//! Running estimates of how long an expert copy and a MoE layer's compute
//! take on the live path, for the planner's prefetch cost model
//! ([`Timing`](crate::planner::Timing)).

use std::time::Instant;

use crate::planner::Timing;

/// Weight of a new measurement in the running averages.
const NEW: f64 = 0.1;

#[derive(Debug)]
pub struct TimingEstimate {
    /// Copies take the processor that computes (the host backend's memcpy).
    copies_compete: bool,
    seconds_per_byte: Option<f64>,
    layer_seconds: Option<f64>,
    /// The last observed layer, when, and the stall total then.
    last_layer: Option<(usize, Instant, f64)>,
}

fn blend(average: &mut Option<f64>, value: f64) {
    *average = Some(match *average {
        Some(a) => a + NEW * (value - a),
        None => value,
    });
}

impl TimingEstimate {
    pub fn new(copies_compete: bool) -> Self {
        Self {
            copies_compete,
            seconds_per_byte: None,
            layer_seconds: None,
            last_layer: None,
        }
    }

    /// A copy of `bytes` took `seconds` from issue to landing.
    pub fn record_copy(&mut self, bytes: usize, seconds: f64) {
        if bytes > 0 && seconds > 0.0 {
            blend(&mut self.seconds_per_byte, seconds / bytes as f64);
        }
    }

    /// Routing of MoE layer `layer` reached the core at `now`, when the
    /// model had stalled `stall_total` seconds in all. The time since the
    /// previous layer, less the stall in between, is one layer's compute.
    pub fn record_layer(&mut self, layer: usize, now: Instant, stall_total: f64) {
        if let Some((previous, at, stall)) = self.last_layer {
            if layer == previous + 1 {
                // A stats reset in between makes the stall total go back.
                let stalled = (stall_total - stall).max(0.0);
                let compute = now.duration_since(at).as_secs_f64() - stalled;
                if compute > 0.0 {
                    blend(&mut self.layer_seconds, compute);
                }
            }
        }
        self.last_layer = Some((layer, now, stall_total));
    }

    /// The estimate for experts of `expert_bytes`, once both are measured.
    pub fn timing(&self, expert_bytes: usize) -> Option<Timing> {
        Some(Timing {
            copy_s: (self.seconds_per_byte? * expert_bytes as f64) as f32,
            layer_s: self.layer_seconds? as f32,
            copies_compete: self.copies_compete,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn layer_time_excludes_stalls_and_skips_non_consecutive_layers() {
        let mut t = TimingEstimate::new(false);
        let start = Instant::now();
        t.record_copy(1000, 1e-3);
        assert_eq!(t.timing(1000), None, "no layer measured yet");
        t.record_layer(0, start, 0.0);
        t.record_layer(1, start + Duration::from_millis(5), 0.003);
        let timing = t.timing(2000).unwrap();
        assert!((timing.layer_s - 0.002).abs() < 1e-6);
        assert!((timing.copy_s - 0.002).abs() < 1e-6);
        // A new step starts at layer 0: the gap since the last layer is not compute.
        t.record_layer(0, start + Duration::from_secs(9), 0.003);
        assert!((t.timing(2000).unwrap().layer_s - 0.002).abs() < 1e-6);
    }
}
