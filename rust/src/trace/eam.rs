//! [`ActivationMatrix`]: how often a request routed to each expert.

/// An L×E matrix of counts: `get(l, e)` = tokens of the request routed to
/// expert `e` at MoE layer `l` so far.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivationMatrix {
    layers: usize,
    experts: usize,
    counts: Vec<u32>,
}

impl ActivationMatrix {
    pub fn new(layers: usize, experts: usize) -> Self {
        Self {
            layers,
            experts,
            counts: vec![0; layers * experts],
        }
    }

    /// Builds one from row-major counts (`counts.len() == layers * experts`).
    pub fn from_counts(layers: usize, experts: usize, counts: Vec<u32>) -> Option<Self> {
        (counts.len() == layers * experts).then_some(Self {
            layers,
            experts,
            counts,
        })
    }

    pub fn layers(&self) -> usize {
        self.layers
    }

    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Adds one token's routing at `layer`. Out-of-range ids are ignored by
    /// design: callers validate ids against the model before they get here.
    pub fn record(&mut self, layer: usize, experts: &[u32]) {
        let row = &mut self.counts[layer * self.experts..(layer + 1) * self.experts];
        for &e in experts {
            if let Some(count) = row.get_mut(e as usize) {
                *count += 1;
            }
        }
    }

    pub fn get(&self, layer: usize, expert: usize) -> u32 {
        self.counts[layer * self.experts + expert]
    }

    pub fn row(&self, layer: usize) -> &[u32] {
        &self.counts[layer * self.experts..(layer + 1) * self.experts]
    }

    pub fn counts(&self) -> &[u32] {
        &self.counts
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().map(|&c| u64::from(c)).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|&c| c == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_match_a_hand_computed_case() {
        // Two tokens, two layers, top-2 of 4 experts.
        let mut eam = ActivationMatrix::new(2, 4);
        eam.record(0, &[1, 3]);
        eam.record(1, &[0, 1]);
        eam.record(0, &[3, 2]);
        eam.record(1, &[1, 2]);
        assert_eq!(eam.row(0), &[0, 1, 1, 2]);
        assert_eq!(eam.row(1), &[1, 2, 1, 0]);
        assert_eq!(eam.total(), 8);
        assert!(!eam.is_empty());
        assert_eq!(ActivationMatrix::from_counts(2, 4, vec![0; 7]), None);
    }
}
