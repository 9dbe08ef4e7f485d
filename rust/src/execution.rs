//! Where a miss runs: for one MoE layer, split the experts that are not in a
//! device slot between "copy, then run on the device" and "run on the CPU
//! from the host tier", so that the layer finishes as early as possible.
//!
//! The model, all times in seconds from the moment the layer's routing is
//! known:
//! - One CPU executor runs its experts one after another; an expert with t
//!   tokens takes `cpu_fixed_s + cpu_per_token_s * t` (the measured time,
//!   sending the hidden states down and the results back included). Several
//!   torch threads may work inside one expert; running several experts at
//!   once on the CPU is not modelled.
//! - The copy engine first finishes `copy_backlog_s` of queued copies, then
//!   copies the chosen experts one after another, `copy_s` each (the layer's
//!   expert bytes / bus bandwidth; the experts of one layer share a size).
//! - The device is busy for `device_busy_s` (e.g. the layer's hits), then
//!   runs the copied experts in order, `device_s` each, each one no earlier
//!   than its copy has landed.
//! - After the copied experts, the device has `device_tail_s` of work that
//!   waits for all of them (the policy lab's whole-layer compute, which
//!   starts once the layer's copies have landed; 0 on the live path).
//! - The layer's finish is the later of the CPU's finish and the device
//!   path's finish; [`split_misses`] minimises it exactly.
//!
//! `device_s` is one figure for every expert of the layer (the caller passes
//! the time for the layer's largest token count): on an accelerator an
//! expert's FFN takes far less than its copy. With a device time that grew
//! with tokens, the best split would be a partition problem (NP-hard); with
//! one figure it is a sort and a scan, see [`split_misses`].

use std::cmp::Reverse;

use crate::error::{CoreError, Result};
use crate::layout::ExpertId;
use crate::timing::blend;

/// The measured costs of one MoE layer's two paths, in seconds. Every field
/// is finite and non-negative ([`split_misses`] checks).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CostModel {
    /// CPU time of one expert that does not depend on the token count
    /// (reading the expert's weights from host memory, for a few tokens).
    pub cpu_fixed_s: f64,
    /// CPU time added per token routed to the expert.
    pub cpu_per_token_s: f64,
    /// Copy engine time for one expert (its bytes / bus bandwidth).
    pub copy_s: f64,
    /// Copies already queued ahead of this layer's.
    pub copy_backlog_s: f64,
    /// Device time to run one copied expert.
    pub device_s: f64,
    /// Device work queued ahead of the copied experts (e.g. the layer's hits).
    pub device_busy_s: f64,
    /// Device work after the copied experts, waiting for all of them.
    pub device_tail_s: f64,
}

impl CostModel {
    /// The CPU's time to run one expert for `tokens` tokens.
    pub fn cpu_seconds(&self, tokens: u32) -> f64 {
        self.cpu_fixed_s + self.cpu_per_token_s * f64::from(tokens)
    }

    /// Refuses a cost that is NaN, infinite or negative, naming it.
    pub fn validate(&self) -> Result<()> {
        let fields = [
            ("cpu_fixed_s", self.cpu_fixed_s),
            ("cpu_per_token_s", self.cpu_per_token_s),
            ("copy_s", self.copy_s),
            ("copy_backlog_s", self.copy_backlog_s),
            ("device_s", self.device_s),
            ("device_busy_s", self.device_busy_s),
            ("device_tail_s", self.device_tail_s),
        ];
        for (name, value) in fields {
            if !value.is_finite() || value < 0.0 {
                return Err(CoreError::InvalidConfig(format!(
                    "execution cost `{name}` is {value}; costs are seconds, finite and >= 0 \
                     (measure it again, or pass 0 for a cost that does not apply)"
                )));
            }
        }
        Ok(())
    }

    /// When the device path finishes if `copied` experts take it.
    ///
    /// Copy j (1-based) lands at `backlog + j * copy`; the device runs
    /// copied expert j from `max(its previous finish, that landing)`.
    /// Unrolled, the finish is the largest of `busy + k * device` and
    /// `backlog + j * copy + (k - j + 1) * device` over j = 1..=k; the
    /// latter is linear in j, so its largest value is at j = 1 or j = k.
    /// The tail follows either way.
    fn device_finish(&self, copied: usize) -> f64 {
        if copied == 0 {
            return self.device_busy_s + self.device_tail_s;
        }
        let k = copied as f64;
        let runs = k * self.device_s;
        let last_run = (self.device_busy_s + runs)
            .max(self.copy_backlog_s + self.copy_s + runs)
            .max(self.copy_backlog_s + k * self.copy_s + self.device_s);
        last_run + self.device_tail_s
    }
}

/// One expert of the layer that is not in a device slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Miss {
    pub expert: ExpertId,
    /// Tokens of the batch routed to this expert at this layer.
    pub tokens: u32,
}

/// The decision for one layer: which misses are copied (in copy order) and
/// which run on the CPU, with the predicted finish of each path.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// The misses by decreasing token count; the first `copied` are copied.
    order: Vec<Miss>,
    copied: usize,
    cpu_finish_s: f64,
    device_finish_s: f64,
}

impl Split {
    /// The misses to copy to a slot and run on the device, in copy order.
    pub fn copy(&self) -> &[Miss] {
        &self.order[..self.copied]
    }

    /// The misses to run on the CPU, in the order it runs them.
    pub fn cpu(&self) -> &[Miss] {
        &self.order[self.copied..]
    }

    /// When the CPU finishes its misses (0 when it has none).
    pub fn cpu_finish_s(&self) -> f64 {
        self.cpu_finish_s
    }

    /// When the device has run its hits and the copied misses.
    pub fn device_finish_s(&self) -> f64 {
        self.device_finish_s
    }

    /// When the layer's last expert is done: the later of the two paths.
    pub fn finish_s(&self) -> f64 {
        self.cpu_finish_s.max(self.device_finish_s)
    }
}

/// Splits one layer's misses between the CPU and the copy engine so that the
/// layer's finish time is minimal under the [module's model](self).
///
/// Why this is optimal: the device path's finish depends only on how many
/// misses are copied, k (every copy takes `copy_s`, every run `device_s`),
/// not on which. For a given k, the CPU's finish is the sum of the CPU times
/// of the misses it keeps, and an expert's CPU time does not decrease with
/// its tokens, so copying the k misses with the most tokens is best (swap
/// any other choice into it without raising the sum). The optimum is thus
/// the best k over the misses sorted by decreasing tokens: one sort and one
/// scan, O(n log n) time and one allocation of n misses. Among equal finish
/// times the fewest copies win, which leaves the bus to prefetches.
pub fn split_misses(misses: &[Miss], costs: &CostModel) -> Result<Split> {
    costs.validate()?;
    let mut order = misses.to_vec();
    // Stable: misses with equal tokens keep the caller's order.
    order.sort_by_key(|miss| Reverse(miss.tokens));

    // Scan k = n down to 0; `cpu_finish` sums the CPU times of order[k..].
    let mut best = Split {
        copied: order.len(),
        cpu_finish_s: 0.0,
        device_finish_s: costs.device_finish(order.len()),
        order,
    };
    let mut cpu_finish = 0.0;
    for copied in (0..best.order.len()).rev() {
        cpu_finish += costs.cpu_seconds(best.order[copied].tokens);
        let device_finish = costs.device_finish(copied);
        // `<=`: on a tie the later, smaller k (fewer copies) wins.
        if cpu_finish.max(device_finish) <= best.finish_s() {
            best.copied = copied;
            best.cpu_finish_s = cpu_finish;
            best.device_finish_s = device_finish;
        }
    }
    Ok(best)
}

/// Where the misses of a layer may run (`cpu_experts=` in Python).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuExperts {
    /// Every expert runs from a device slot; misses are copied first.
    Never,
    /// Each miss goes where [`split_misses`] says the layer ends soonest.
    #[default]
    Auto,
    /// Every miss runs on the CPU; only hits use the device slots.
    Always,
}

impl CpuExperts {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "never" => Ok(Self::Never),
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            other => Err(CoreError::InvalidConfig(format!(
                "cpu_experts = {other:?}: choose \"auto\" (decide per miss from measured costs), \
                 \"never\" (copy every miss to the device) or \"always\" (run every miss on the CPU)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Never => "never",
            Self::Auto => "auto",
            Self::Always => "always",
        }
    }
}

/// Token counts up to this are "a few tokens": the expert's time is its
/// weights read from memory ([`CostModel::cpu_fixed_s`]).
const FEW_TOKENS: u32 = 4;
/// Token counts from this on are "many": the time per token is arithmetic
/// ([`CostModel::cpu_per_token_s`]).
const MANY_TOKENS: u32 = 16;

/// The CPU's measured time per expert, learned from the experts it ran:
/// a running average of the time of experts with a few tokens (the
/// weights' read, memory-bound) and of the time per token of experts with
/// many (arithmetic-bound). Counts in between teach neither: the model is
/// linear, and those are where it is least exact.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CpuCosts {
    few_tokens_s: Option<f64>,
    per_token_s: Option<f64>,
}

impl CpuCosts {
    /// The CPU ran one expert for `tokens` tokens in `seconds`.
    pub fn record(&mut self, tokens: u32, seconds: f64) {
        if !(seconds.is_finite() && seconds > 0.0) || tokens == 0 {
            return;
        }
        if tokens <= FEW_TOKENS {
            blend(&mut self.few_tokens_s, seconds);
        } else if tokens >= MANY_TOKENS {
            blend(&mut self.per_token_s, seconds / f64::from(tokens));
        }
    }

    /// `(cpu_fixed_s, cpu_per_token_s)` once both kinds were measured.
    pub fn estimate(&self) -> Option<(f64, f64)> {
        Some((self.few_tokens_s?, self.per_token_s?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    const US: f64 = 1e-6;

    fn misses(tokens: &[u32]) -> Vec<Miss> {
        tokens
            .iter()
            .enumerate()
            .map(|(i, &tokens)| Miss {
                expert: i as ExpertId,
                tokens,
            })
            .collect()
    }

    /// The layer's finish when `copied` take the device path in that order
    /// and `cpu` run on the CPU, simulated step by step (no closed form).
    fn simulate(costs: &CostModel, copied: &[Miss], cpu: &[Miss]) -> f64 {
        let mut cpu_clock = 0.0;
        for miss in cpu {
            cpu_clock += costs.cpu_seconds(miss.tokens);
        }
        let mut copy_clock = costs.copy_backlog_s;
        let mut device_clock = costs.device_busy_s;
        for _ in copied {
            copy_clock += costs.copy_s;
            device_clock = device_clock.max(copy_clock) + costs.device_s;
        }
        cpu_clock.max(device_clock + costs.device_tail_s)
    }

    /// The best finish over all 2^n assignments.
    fn brute_force(costs: &CostModel, misses: &[Miss]) -> f64 {
        let mut best = f64::INFINITY;
        for mask in 0u32..(1 << misses.len()) {
            let (mut copied, mut cpu) = (Vec::new(), Vec::new());
            for (i, &miss) in misses.iter().enumerate() {
                if mask >> i & 1 == 1 {
                    copied.push(miss);
                } else {
                    cpu.push(miss);
                }
            }
            best = best.min(simulate(costs, &copied, &cpu));
        }
        best
    }

    fn assert_close(a: f64, b: f64) {
        assert!(
            (a - b).abs() <= 1e-12 * a.abs().max(b.abs()),
            "{a} != {b} (relative 1e-12)"
        );
    }

    /// The decode figures: a 17.3 MB expert, 346 µs over the bus,
    /// 173 µs on the CPU for one token, 10 µs on the device.
    fn decode_costs() -> CostModel {
        CostModel {
            cpu_fixed_s: 173.0 * US,
            cpu_per_token_s: 2.0 * US,
            copy_s: 346.0 * US,
            device_s: 10.0 * US,
            ..CostModel::default()
        }
    }

    #[test]
    fn decode_runs_the_misses_on_the_cpu_when_a_copy_is_slower() {
        let costs = decode_costs();
        let split = split_misses(&misses(&[1, 1]), &costs).unwrap();
        assert!(split.copy().is_empty(), "{split:?}");
        assert_eq!(split.cpu().len(), 2);
        assert_close(split.finish_s(), 2.0 * 175.0 * US);
    }

    #[test]
    fn both_paths_work_at_once_when_the_cpu_alone_is_slower() {
        // Five decode misses: the CPU alone needs 875 µs; copying one (its
        // copy and run overlap the CPU's other four, 700 µs) is best;
        // copying two would make the device path 702 µs.
        let costs = decode_costs();
        let split = split_misses(&misses(&[1, 1, 1, 1, 1]), &costs).unwrap();
        assert_eq!(split.copy().len(), 1, "{split:?}");
        assert_eq!(split.cpu().len(), 4);
        assert_close(split.cpu_finish_s(), 4.0 * 175.0 * US);
        assert_close(split.device_finish_s(), 356.0 * US);
        assert_close(split.finish_s(), 700.0 * US);
    }

    #[test]
    fn prefill_copies_experts_with_many_tokens() {
        // 512 tokens make an expert's CPU time 1.2 ms against 346 µs of copy.
        let costs = decode_costs();
        let split = split_misses(&misses(&[512, 3, 512, 600]), &costs).unwrap();
        let copied: Vec<u32> = split.copy().iter().map(|m| m.tokens).collect();
        assert_eq!(copied, [600, 512, 512], "the most tokens are copied first");
        assert_eq!(
            split.cpu(),
            &[Miss {
                expert: 1,
                tokens: 3
            }]
        );
        assert_close(split.finish_s(), 3.0 * 346.0 * US + 10.0 * US);
    }

    #[test]
    fn an_empty_miss_list_finishes_with_the_device_busy() {
        let costs = CostModel {
            device_busy_s: 40.0 * US,
            ..decode_costs()
        };
        let split = split_misses(&[], &costs).unwrap();
        assert!(split.copy().is_empty() && split.cpu().is_empty());
        assert_eq!(split.cpu_finish_s(), 0.0);
        assert_eq!(split.finish_s(), 40.0 * US);
    }

    #[test]
    fn a_copy_backlog_pushes_work_to_the_cpu() {
        // 400 tokens: 973 µs on the CPU, so both experts are copied (702 µs)
        // on an idle bus; behind 5 ms of queued copies the CPU runs both.
        let idle = decode_costs();
        let split = split_misses(&misses(&[400, 400]), &idle).unwrap();
        assert_eq!(split.copy().len(), 2, "{split:?}");
        let busy = CostModel {
            copy_backlog_s: 5e-3,
            ..idle
        };
        let split = split_misses(&misses(&[400, 400]), &busy).unwrap();
        assert_eq!(split.cpu().len(), 2, "{split:?}");
        assert_close(split.finish_s(), 2.0 * 973.0 * US);
    }

    #[test]
    fn cpu_costs_need_both_kinds_of_measurement() {
        let mut costs = CpuCosts::default();
        costs.record(1, 200.0 * US);
        assert_eq!(costs.estimate(), None, "no many-token expert measured yet");
        costs.record(8, 1.0); // between the two kinds: teaches neither
        costs.record(0, 1.0);
        costs.record(64, f64::NAN);
        assert_eq!(costs.estimate(), None);
        costs.record(64, 64.0 * 50.0 * US);
        let (fixed, per_token) = costs.estimate().unwrap();
        assert_close(fixed, 200.0 * US);
        assert_close(per_token, 50.0 * US);
        // Later measurements move the averages a tenth of the way.
        costs.record(2, 300.0 * US);
        assert_close(costs.estimate().unwrap().0, 210.0 * US);
    }

    #[test]
    fn cpu_experts_modes_parse_by_name() {
        for mode in [CpuExperts::Never, CpuExperts::Auto, CpuExperts::Always] {
            assert_eq!(CpuExperts::parse(mode.name()).unwrap(), mode);
        }
        let text = CpuExperts::parse("sometimes").unwrap_err().to_string();
        assert!(
            text.contains("\"sometimes\"") && text.contains("\"auto\""),
            "{text}"
        );
    }

    #[test]
    fn nan_infinite_and_negative_costs_are_refused_by_name() {
        let bad = [f64::NAN, f64::INFINITY, -1e-9];
        for value in bad {
            for field in 0..7 {
                let mut costs = decode_costs();
                let (slot, name) = match field {
                    0 => (&mut costs.cpu_fixed_s, "cpu_fixed_s"),
                    1 => (&mut costs.cpu_per_token_s, "cpu_per_token_s"),
                    2 => (&mut costs.copy_s, "copy_s"),
                    3 => (&mut costs.copy_backlog_s, "copy_backlog_s"),
                    4 => (&mut costs.device_s, "device_s"),
                    5 => (&mut costs.device_busy_s, "device_busy_s"),
                    _ => (&mut costs.device_tail_s, "device_tail_s"),
                };
                *slot = value;
                let err = split_misses(&misses(&[1]), &costs).unwrap_err();
                let text = err.to_string();
                assert!(matches!(err, CoreError::InvalidConfig(_)), "{text}");
                assert!(text.contains(&format!("`{name}`")), "{text}");
            }
        }
    }

    /// A cost in seconds: often 0 or a round figure (ties), else anything
    /// up to 10 ms.
    fn cost() -> impl Strategy<Value = f64> {
        prop_oneof![
            Just(0.0),
            (0u32..8).prop_map(|n| f64::from(n) * 100.0 * US),
            0.0..1e-2,
        ]
    }

    fn cost_model() -> impl Strategy<Value = CostModel> {
        (cost(), cost(), cost(), cost(), cost(), cost(), cost()).prop_map(|c| CostModel {
            cpu_fixed_s: c.0,
            cpu_per_token_s: c.1 / 100.0,
            copy_s: c.2,
            copy_backlog_s: c.3,
            device_s: c.4 / 10.0,
            device_busy_s: c.5,
            device_tail_s: c.6,
        })
    }

    fn tokens() -> impl Strategy<Value = u32> {
        prop_oneof![Just(1u32), 0u32..8, 0u32..2048]
    }

    /// Any finite, non-negative figure, extremes included.
    fn extreme() -> impl Strategy<Value = f64> {
        prop_oneof![
            Just(0.0),
            Just(f64::MAX),
            Just(f64::MIN_POSITIVE),
            Just(5e-324),
            0.0..f64::MAX,
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn the_split_is_as_fast_as_the_best_of_all_assignments(
            costs in cost_model(),
            tokens in vec(tokens(), 0..=10),
        ) {
            let misses = misses(&tokens);
            let split = split_misses(&misses, &costs).unwrap();
            let mut seen: Vec<Miss> = split.copy().iter().chain(split.cpu()).copied().collect();
            seen.sort_by_key(|m| m.expert);
            prop_assert_eq!(&seen, &misses, "every miss is placed once");
            assert_close(simulate(&costs, split.copy(), split.cpu()), split.finish_s());
            assert_close(split.finish_s(), brute_force(&costs, &misses));
        }

        #[test]
        fn any_finite_input_gets_a_split(
            costs in (extreme(), extreme(), extreme(), extreme(), extreme(), extreme(), extreme()),
            tokens in vec(prop_oneof![Just(u32::MAX), any::<u32>()], 0..=64),
        ) {
            let costs = CostModel {
                cpu_fixed_s: costs.0,
                cpu_per_token_s: costs.1,
                copy_s: costs.2,
                copy_backlog_s: costs.3,
                device_s: costs.4,
                device_busy_s: costs.5,
                device_tail_s: costs.6,
            };
            let split = split_misses(&misses(&tokens), &costs).unwrap();
            prop_assert_eq!(split.copy().len() + split.cpu().len(), tokens.len());
            prop_assert!(!split.finish_s().is_nan());
        }
    }
}
