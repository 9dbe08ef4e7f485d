//! What the cache did, for users (`offloader.stats()`) and benchmarks.

/// Counters since construction or the last reset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Fetches that found the expert in a slot, its copy landed (on CUDA:
    /// as the device reports it, not merely queued on a copy stream).
    pub hits: u64,
    /// Fetches that had to wait for a copy (absent, or still queued or in
    /// flight).
    pub misses: u64,
    /// Copies completed into slots.
    pub copies: u64,
    /// Experts pushed out of a slot to make room.
    pub evictions: u64,
    /// Bytes copied from the host tier into slots.
    pub bytes_to_device: u64,
    /// Expert bytes held in slots at the worst moment.
    pub peak_resident_bytes: u64,
    /// Seconds the model waited for copies: the caller blocked until the
    /// copy was issued, plus, on CUDA, the reader's stream waiting for it to
    /// land (measured on that stream, added once the device got past it).
    pub stall_seconds: f64,
    /// Needed experts that had already arrived by prefetch.
    pub prefetch_hits: u64,
    /// Needed experts whose prefetch was still queued or in flight.
    pub prefetch_late: u64,
    /// Prefetched experts evicted without being used.
    pub prefetch_wasted: u64,
    /// Copies started by prefetch rather than on demand.
    pub prefetch_copies: u64,
    /// Misses run on the CPU from host memory instead of copied (counted
    /// in `misses` too).
    pub cpu_experts: u64,
    /// Seconds the CPU spent running them, as the caller measured.
    pub cpu_seconds: f64,
    /// Copies of experts just run on the CPU that the policy chose to keep.
    pub background_copies: u64,
    /// Hits and misses per MoE layer.
    pub layer_hits: Vec<u64>,
    pub layer_misses: Vec<u64>,
}

impl Stats {
    /// Zeroed counters for a model of `layers` MoE layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layer_hits: vec![0; layers],
            layer_misses: vec![0; layers],
            ..Self::default()
        }
    }

    /// Clears the counters; the peak restarts from what is resident now.
    pub fn reset(&mut self, resident_bytes: u64) {
        *self = Stats {
            peak_resident_bytes: resident_bytes,
            ..Stats::new(self.layer_hits.len())
        };
    }

    pub fn record_hit(&mut self, layer: u32) {
        self.hits += 1;
        self.layer_hits[layer as usize] += 1;
    }

    pub fn record_miss(&mut self, layer: u32) {
        self.misses += 1;
        self.layer_misses[layer as usize] += 1;
    }
}
