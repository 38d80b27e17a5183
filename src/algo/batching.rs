//! Batching pieces every algorithm's update shares: per-token rows as padded tensors, and the seeded shuffle of a
//! step's completions into mini-batches (keyed by seed, step and epoch, so resume needs no generator state).

use anyhow::Result;
use candle_core::Tensor;

use crate::rollout::rng::{RowKey, RowRng};

/// Per-token rows right-padded with 0 to `width` columns → `[rows, width]`.
pub fn padded_rows(rows: &[Vec<f32>], width: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let flat: Vec<f32> =
        rows.iter().flat_map(|r| r.iter().copied().chain(std::iter::repeat(0.0)).take(width)).collect();
    Ok(Tensor::from_vec(flat, (rows.len(), width), dev)?)
}

/// The order of `n` completions in `epoch` of `step`: a Fisher–Yates shuffle from the stream (seed, step, `stream`,
/// epoch). `stream` tags the algorithm, so two algorithms never share a stream by accident.
pub fn shuffled_order(n: usize, seed: u64, step: u64, epoch: usize, stream: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = RowRng::new(RowKey { seed, step, prompt: stream, sample: epoch as u64 });
    for i in (1..n).rev() {
        let j = ((rng.next_u64() as u128 * (i as u128 + 1)) >> 64) as usize;
        order.swap(i, j);
    }
    order
}

/// `algorithm.num_mini_batches` must divide the step's completions (PPO, REINFORCE++).
pub fn mini_batch_problem(completions: usize, num_mini_batches: usize) -> Option<super::Problem> {
    let mb = num_mini_batches;
    (mb == 0 || !completions.is_multiple_of(mb)).then(|| {
        super::Problem::at(
            "algorithm.num_mini_batches",
            format!(
                "`algorithm.num_mini_batches` = {mb} does not divide the {completions} completions of a step \
                 (rollout.prompts_per_step × rollout.num_generations)"
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffles_are_permutations_keyed_by_step_and_epoch() {
        let a = shuffled_order(10, 0, 1, 0, 7);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(a, shuffled_order(10, 0, 1, 0, 7));
        assert_ne!(a, shuffled_order(10, 0, 1, 1, 7));
        assert_ne!(a, shuffled_order(10, 0, 2, 0, 7));
        let t = padded_rows(&[vec![1.0, 2.0], vec![3.0]], 3, &candle_core::Device::Cpu).unwrap();
        assert_eq!(t.to_vec2::<f32>().unwrap(), vec![vec![1.0, 2.0, 0.0], vec![3.0, 0.0, 0.0]]);
    }
}
