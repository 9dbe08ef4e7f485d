//! Running estimates of how long an expert copy and a MoE layer's compute
//! take on the live path, for the planner's prefetch cost model
//! ([`Timing`](crate::planner::Timing)); and [`Intervals`], the device-side
//! measurements (copies, stream stalls) that are read once the device has
//! got past them, never by waiting for it.

use std::time::Instant;

use crate::error::Result;
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

/// Moves a running average a tenth of the way to `value` (the
/// first value sets it).
pub(crate) fn blend(average: &mut Option<f64>, value: f64) {
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

    /// How long a copy of `bytes` takes, once a copy was measured.
    pub fn copy_seconds(&self, bytes: usize) -> Option<f64> {
        Some(self.seconds_per_byte? * bytes as f64)
    }

    /// The estimate for experts of `expert_bytes`, once both are measured.
    pub fn timing(&self, expert_bytes: usize) -> Option<Timing> {
        Some(Timing {
            copy_s: (self.seconds_per_byte? * expert_bytes as f64) as f32,
            layer_s: self.layer_seconds? as f32,
            copies_compete: self.copies_compete,
            // The live copy workers copy whole experts.
            chunk_s: None,
        })
    }
}

/// A stretch of a device stream between two recorded marks (CUDA: two
/// timed events), whose length can be read once the stream has passed both.
pub trait Interval {
    /// Seconds between the marks; `None` while the stream has not passed
    /// both yet.
    fn seconds(&self) -> Result<Option<f64>>;
}

/// Intervals recorded and not read yet, each with what it measured (`T`),
/// and spares to record the next ones in. At most `capacity` intervals
/// exist: a stream running far behind costs no more events, its further
/// measurements are skipped instead.
pub struct Intervals<I, T> {
    spare: Vec<I>,
    pending: Vec<(I, T)>,
    created: usize,
    capacity: usize,
}

impl<I: Interval, T> Intervals<I, T> {
    pub fn new(capacity: usize) -> Self {
        Self {
            spare: Vec::new(),
            pending: Vec::new(),
            created: 0,
            capacity,
        }
    }

    /// An interval to record the next measurement in: a spare, else a new
    /// one from `make` while fewer than `capacity` exist; `None` when every
    /// one is still pending.
    pub fn take(&mut self, make: impl FnOnce() -> Result<I>) -> Result<Option<I>> {
        if let Some(interval) = self.spare.pop() {
            return Ok(Some(interval));
        }
        if self.created == self.capacity {
            return Ok(None);
        }
        let interval = make()?;
        self.created += 1;
        Ok(Some(interval))
    }

    /// An interval from [`take`](Self::take) that was not recorded after all
    /// (a failed call in between): a spare again.
    pub fn give_back(&mut self, interval: I) {
        self.spare.push(interval);
    }

    /// Both marks of `interval` are recorded; it measures `what`.
    pub fn recorded(&mut self, interval: I, what: T) {
        self.pending.push((interval, what));
    }

    /// What each interval the device has passed measured, and how many
    /// seconds it took; those intervals become spares. Pending ones stay
    /// (streams finish out of order). One whose time cannot be read (a
    /// driver error) is dropped from the measurements but kept as a spare.
    pub fn harvest(&mut self) -> Vec<(T, f64)> {
        let mut done = Vec::new();
        let mut index = 0;
        while index < self.pending.len() {
            match self.pending[index].0.seconds() {
                Ok(None) => index += 1,
                outcome => {
                    let (interval, what) = self.pending.swap_remove(index);
                    self.spare.push(interval);
                    if let Ok(Some(seconds)) = outcome {
                        done.push((what, seconds));
                    }
                }
            }
        }
        done
    }

    /// Intervals recorded and not yet harvested.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;
    use std::time::Duration;

    use crate::error::CoreError;

    /// A stand-in for a pair of timed events: the test says when the
    /// stream has passed it (and how long it took) or fails the query.
    #[derive(Clone, Default)]
    struct FakeInterval(Rc<Cell<Option<std::result::Result<f64, ()>>>>);

    impl Interval for FakeInterval {
        fn seconds(&self) -> Result<Option<f64>> {
            match self.0.get() {
                None => Ok(None),
                Some(Ok(seconds)) => Ok(Some(seconds)),
                Some(Err(())) => Err(CoreError::Protocol("sticky device error".into())),
            }
        }
    }

    #[test]
    fn intervals_are_read_once_passed_and_reused_within_capacity() {
        let mut intervals = Intervals::<FakeInterval, &str>::new(2);
        let (a, b) = (FakeInterval::default(), FakeInterval::default());
        let first = intervals.take(|| Ok(a.clone())).unwrap().unwrap();
        intervals.recorded(first, "first");
        let second = intervals.take(|| Ok(b.clone())).unwrap().unwrap();
        intervals.recorded(second, "second");
        // Both pending: no third event is made, that measurement is skipped.
        assert!(intervals
            .take(|| panic!("over capacity"))
            .unwrap()
            .is_none());
        assert!(intervals.harvest().is_empty(), "nothing passed yet");
        // The second stream got there first; the first is still pending.
        b.0.set(Some(Ok(0.25)));
        assert_eq!(intervals.harvest(), vec![("second", 0.25)]);
        assert_eq!(intervals.pending(), 1);
        assert!(intervals.harvest().is_empty(), "each is read once");
        // Its events are reused rather than new ones made.
        let reused = intervals.take(|| panic!("a spare exists")).unwrap();
        assert!(reused.is_some());
        intervals.give_back(reused.unwrap());
        a.0.set(Some(Err(())));
        assert!(
            intervals.harvest().is_empty(),
            "a failed read measures nothing"
        );
        assert_eq!(intervals.pending(), 0, "but frees its interval");
    }

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
