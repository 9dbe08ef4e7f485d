//! Which experts exist and how many bytes each one's blob holds.

use crate::error::{CoreError, Result};

/// Dense index of one expert over all MoE layers (layer-major).
pub type ExpertId = u32;

/// The experts of a model: per MoE layer, how many experts and how many
/// bytes one expert's packed tensors take. Experts of one layer share a size;
/// layers may differ (encoder and decoder FFNs of different widths).
#[derive(Debug, Clone)]
pub struct ExpertLayout {
    first_id: Vec<ExpertId>,
    experts: Vec<u32>,
    bytes: Vec<usize>,
}

impl ExpertLayout {
    /// `layers[i] = (experts in MoE layer i, bytes of one of its experts)`.
    pub fn new(layers: &[(u32, usize)]) -> Result<Self> {
        if layers.is_empty() {
            return Err(CoreError::InvalidConfig(
                "the layout has no MoE layer".into(),
            ));
        }
        let mut first_id = Vec::with_capacity(layers.len());
        let mut next: u64 = 0;
        for (i, &(experts, bytes)) in layers.iter().enumerate() {
            if experts == 0 || bytes == 0 {
                return Err(CoreError::InvalidConfig(format!(
                    "MoE layer {i} has {experts} experts of {bytes} bytes; both must be positive"
                )));
            }
            first_id.push(next as ExpertId);
            next += u64::from(experts);
        }
        if next > u64::from(u32::MAX) {
            return Err(CoreError::InvalidConfig("more than 2^32 experts".into()));
        }
        Ok(Self {
            first_id,
            experts: layers.iter().map(|l| l.0).collect(),
            bytes: layers.iter().map(|l| l.1).collect(),
        })
    }

    pub fn num_layers(&self) -> usize {
        self.experts.len()
    }

    pub fn num_experts(&self) -> usize {
        self.experts.iter().map(|&e| e as usize).sum()
    }

    pub fn experts_in_layer(&self, layer: u32) -> u32 {
        self.experts.get(layer as usize).copied().unwrap_or(0)
    }

    /// The dense id of `expert` in `layer`, or an error naming both.
    pub fn id(&self, layer: u32, expert: u32) -> Result<ExpertId> {
        let l = layer as usize;
        match self.experts.get(l) {
            Some(&n) if expert < n => Ok(self.first_id[l] + expert),
            _ => Err(CoreError::UnknownExpert {
                layer,
                expert,
                layers: self.num_layers(),
                experts: self.experts.get(l).copied().unwrap_or(0) as usize,
            }),
        }
    }

    /// The (layer, expert) pair of a dense id.
    pub fn locate(&self, id: ExpertId) -> (u32, u32) {
        let layer = self.first_id.partition_point(|&first| first <= id) - 1;
        (layer as u32, id - self.first_id[layer])
    }

    pub fn bytes(&self, id: ExpertId) -> usize {
        self.bytes[self.locate(id).0 as usize]
    }

    /// Checks that `offset..offset + len` lies inside expert `id`'s blob.
    pub fn check_range(&self, id: ExpertId, offset: usize, len: usize) -> Result<()> {
        let size = self.bytes(id);
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            end => {
                let (layer, expert) = self.locate(id);
                Err(CoreError::OutOfBounds {
                    layer,
                    expert,
                    offset,
                    end: end.unwrap_or(usize::MAX),
                    size,
                })
            }
        }
    }

    pub fn max_expert_bytes(&self) -> usize {
        self.bytes.iter().copied().max().unwrap_or(0)
    }

    pub fn total_bytes(&self) -> usize {
        self.experts
            .iter()
            .zip(&self.bytes)
            .map(|(&n, &b)| n as usize * b)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_dense_and_locate_inverts_them() {
        let layout = ExpertLayout::new(&[(4, 100), (2, 50), (3, 10)]).unwrap();
        assert_eq!(layout.num_experts(), 9);
        assert_eq!(layout.total_bytes(), 400 + 100 + 30);
        let mut seen = Vec::new();
        for layer in 0..3 {
            for e in 0..layout.experts_in_layer(layer) {
                let id = layout.id(layer, e).unwrap();
                assert_eq!(layout.locate(id), (layer, e));
                seen.push(id);
            }
        }
        assert_eq!(seen, (0..9).collect::<Vec<_>>());
        assert_eq!(layout.bytes(5), 50);
        assert_eq!(layout.max_expert_bytes(), 100);
    }

    #[test]
    fn unknown_experts_are_errors() {
        let layout = ExpertLayout::new(&[(4, 100)]).unwrap();
        assert!(matches!(
            layout.id(0, 4),
            Err(CoreError::UnknownExpert { .. })
        ));
        assert!(matches!(
            layout.id(1, 0),
            Err(CoreError::UnknownExpert { .. })
        ));
        assert!(ExpertLayout::new(&[]).is_err());
        assert!(ExpertLayout::new(&[(0, 10)]).is_err());
    }

    #[test]
    fn ranges_outside_a_blob_are_rejected() {
        let layout = ExpertLayout::new(&[(2, 100)]).unwrap();
        assert!(layout.check_range(1, 0, 100).is_ok());
        assert!(layout.check_range(1, 50, 51).is_err());
        assert!(layout.check_range(0, usize::MAX, 2).is_err());
    }
}
