//! Seeded epoch sampling. Epoch e visits every example once, in an order that is a pure function of (seed, e), so
//! the whole sampler state is (epoch, cursor): a checkpoint stores two numbers and a resumed run draws exactly the
//! batches an uninterrupted one would, whatever the batch sizes and wherever the epoch boundaries fall.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::rollout::rng::{RowKey, RowRng};

/// Where the sampler stands: the next index handed out is `order(epoch)[cursor]`. Always `cursor < len`: a batch
/// that ends an epoch leaves the state at (epoch + 1, 0), so one position has one state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub epoch: u64,
    pub cursor: usize,
}

#[derive(Debug, Clone)]
pub struct Sampler {
    seed: u64,
    shuffle: bool,
    state: SamplerState,
    /// `order(seed, state.epoch)`, cached; its length is the dataset's.
    order: Vec<usize>,
}

/// Tags the shuffle streams so they never coincide with the sampling or weight-init streams of the same seed.
const SHUFFLE_STREAM: u64 = 0xda7a_0000_0000_0001;

/// The visiting order of epoch `epoch`: file order without shuffling, else a Fisher–Yates permutation drawn from
/// the stream keyed by (seed, epoch).
pub fn epoch_order(seed: u64, len: usize, shuffle: bool, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    if shuffle {
        let mut rng = RowRng::new(RowKey { seed, step: epoch, prompt: SHUFFLE_STREAM, sample: 0 });
        for i in (1..len).rev() {
            // Multiply-shift maps 64 random bits onto 0..=i; the bias (≤ i / 2^64) is immaterial.
            let j = ((rng.next_u64() as u128 * (i as u128 + 1)) >> 64) as usize;
            order.swap(i, j);
        }
    }
    order
}

impl Sampler {
    /// A sampler at the start of epoch 0. `len` must be positive (datasets are never empty).
    pub fn new(seed: u64, len: usize, shuffle: bool) -> Self {
        assert!(len > 0, "a sampler needs at least one example");
        Self { seed, shuffle, state: SamplerState { epoch: 0, cursor: 0 }, order: epoch_order(seed, len, shuffle, 0) }
    }

    /// Continue from a saved state. `seed`, `len` and `shuffle` must be those of the run that saved it (the recipe
    /// hash guards that); a cursor past the end means the data changed and is an error.
    pub fn from_state(seed: u64, len: usize, shuffle: bool, state: SamplerState) -> Result<Self> {
        if len == 0 {
            bail!("a sampler needs at least one example");
        }
        if state.cursor > len {
            bail!(
                "sampler state cursor {} is past the end of a {len}-example dataset (did the data change?)",
                state.cursor
            );
        }
        let mut s = Self { seed, shuffle, state, order: epoch_order(seed, len, shuffle, state.epoch) };
        if state.cursor == len {
            s.advance_epoch();
        }
        Ok(s)
    }

    pub fn state(&self) -> SamplerState {
        self.state
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Always false; here for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The next `n` example indices. A batch that crosses the end of epoch e takes the rest of e, then the start of
    /// e + 1 (so it may repeat an example, as any epoch-based trainer does); `n` larger than the dataset spans
    /// several epochs.
    pub fn next_batch(&mut self, n: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let take = (n - out.len()).min(self.order.len() - self.state.cursor);
            out.extend_from_slice(&self.order[self.state.cursor..self.state.cursor + take]);
            self.state.cursor += take;
            if self.state.cursor == self.order.len() {
                self.advance_epoch();
            }
        }
        out
    }

    fn advance_epoch(&mut self) {
        self.state = SamplerState { epoch: self.state.epoch + 1, cursor: 0 };
        self.order = epoch_order(self.seed, self.order.len(), self.shuffle, self.state.epoch);
    }
}
