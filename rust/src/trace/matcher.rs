//! [`RequestMatcher`]: a live request's cosine similarity to every EAMC
//! entry over the layers it has seen, kept up to date incrementally.
//!
//! Per entry k it keeps the running dot product with the request's partial
//! activation matrix and the entry's squared norm over the layers seen so
//! far. A token routed to experts S at layer l adds, for each e in S, the
//! entries' (l, e) cell to the dots (one contiguous sweep over K floats per
//! expert), so one layer update costs O(K·top_k) rather than O(K·L·E).

use super::eam::ActivationMatrix;
use super::eamc::ActivationCollection;

#[derive(Debug, Clone)]
pub struct RequestMatcher {
    eam: ActivationMatrix,
    dots: Vec<f32>,
    entry_norm2: Vec<f32>,
    seen: Vec<bool>,
    own_norm2: f32,
}

impl RequestMatcher {
    pub fn new(eamc: &ActivationCollection) -> Self {
        Self {
            eam: ActivationMatrix::new(eamc.layers(), eamc.experts()),
            dots: vec![0.0; eamc.capacity()],
            entry_norm2: vec![0.0; eamc.capacity()],
            seen: vec![false; eamc.layers()],
            own_norm2: 0.0,
        }
    }

    /// The request's activation matrix so far.
    pub fn eam(&self) -> &ActivationMatrix {
        &self.eam
    }

    /// One token's routing at `layer`.
    pub fn observe(&mut self, eamc: &ActivationCollection, layer: usize, experts: &[u32]) {
        if !self.seen[layer] {
            self.seen[layer] = true;
            for (n, &add) in self.entry_norm2.iter_mut().zip(eamc.layer_norms2(layer)) {
                *n += add;
            }
        }
        for &e in experts {
            let e = e as usize;
            if e >= eamc.experts() {
                continue;
            }
            let before = self.eam.get(layer, e) as f32;
            self.own_norm2 += 2.0 * before + 1.0;
            for (dot, &v) in self.dots.iter_mut().zip(eamc.cell(layer, e)) {
                *dot += v;
            }
        }
        self.eam.record(layer, experts);
    }

    /// Cosine similarity with entry `k` over the layers seen so far.
    pub fn similarity(&self, k: usize) -> f32 {
        let denominator = (self.own_norm2 * self.entry_norm2[k]).sqrt();
        if denominator > 0.0 {
            self.dots[k] / denominator
        } else {
            0.0
        }
    }

    /// The `n` most similar entries, best first, with their similarity;
    /// entries with no overlap at all are left out.
    pub fn best(&self, eamc: &ActivationCollection, n: usize) -> Vec<(usize, f32)> {
        let mut scored: Vec<(usize, f32)> = (0..eamc.len())
            .map(|k| (k, self.similarity(k)))
            .filter(|&(_, s)| s > 0.0)
            .collect();
        let by_similarity =
            |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if scored.len() > n {
            scored.select_nth_unstable_by(n, by_similarity);
            scored.truncate(n);
        }
        scored.sort_by(by_similarity);
        scored
    }

    /// Recomputes entry `k` after the collection replaced or added it.
    pub fn refresh_entry(&mut self, eamc: &ActivationCollection, k: usize) {
        let mut dot = 0.0;
        let mut norm2 = 0.0;
        for layer in 0..eamc.layers() {
            if !self.seen[layer] {
                continue;
            }
            norm2 += eamc.layer_norms2(layer)[k];
            for (e, &c) in self.eam.row(layer).iter().enumerate() {
                if c > 0 {
                    dot += c as f32 * eamc.value(k, layer, e);
                }
            }
        }
        self.dots[k] = dot;
        self.entry_norm2[k] = norm2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Replacement;

    /// Brute force: cosine over the layers seen, from the matrices themselves.
    fn brute(eamc: &ActivationCollection, eam: &ActivationMatrix, seen: &[bool], k: usize) -> f32 {
        let entry = eamc.entry(k);
        let (mut dot, mut a, mut b) = (0.0f64, 0.0f64, 0.0f64);
        for l in (0..eam.layers()).filter(|&l| seen[l]) {
            for e in 0..eam.experts() {
                let (x, y) = (eam.get(l, e) as f64, entry.get(l, e) as f64);
                dot += x * y;
                a += x * x;
                b += y * y;
            }
        }
        if a > 0.0 && b > 0.0 {
            (dot / (a.sqrt() * b.sqrt())) as f32
        } else {
            0.0
        }
    }

    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
        fn token(&mut self, experts: u64, k: usize) -> Vec<u32> {
            let mut ids = Vec::new();
            while ids.len() < k {
                let e = self.below(experts) as u32;
                if !ids.contains(&e) {
                    ids.push(e);
                }
            }
            ids
        }
    }

    #[test]
    fn incremental_similarity_agrees_with_brute_force() {
        let (layers, experts, k) = (5, 12, 3);
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let mut eamc = ActivationCollection::new(20, layers, experts, Replacement::Oldest).unwrap();
        for _ in 0..20 {
            let mut eam = ActivationMatrix::new(layers, experts);
            for _ in 0..1 + rng.below(30) {
                for l in 0..layers {
                    eam.record(l, &rng.token(experts as u64, k));
                }
            }
            eamc.insert(&eam).unwrap();
        }
        let mut matcher = RequestMatcher::new(&eamc);
        let mut seen = vec![false; layers];
        for _token in 0..6 {
            for l in 0..layers {
                matcher.observe(&eamc, l, &rng.token(experts as u64, k));
                seen[l] = true;
                for entry in 0..eamc.len() {
                    let want = brute(&eamc, matcher.eam(), &seen, entry);
                    assert!((matcher.similarity(entry) - want).abs() < 1e-5);
                }
            }
        }
        let best = matcher.best(&eamc, 4);
        assert_eq!(best.len(), 4);
        assert!(best.windows(2).all(|w| w[0].1 >= w[1].1));
        let top = (0..eamc.len())
            .map(|e| matcher.similarity(e))
            .fold(f32::MIN, f32::max);
        assert_eq!(best[0].1, top);

        // Replacing an entry and refreshing keeps the match exact.
        let mut fresh = ActivationMatrix::new(layers, experts);
        fresh.record(0, &[1, 2, 3]);
        let index = eamc.insert(&fresh).unwrap().unwrap();
        matcher.refresh_entry(&eamc, index);
        let want = brute(&eamc, matcher.eam(), &seen, index);
        assert!((matcher.similarity(index) - want).abs() < 1e-5);
    }
}
