//! Tape autograd: a recorded forward (train or eval BN mode) records one node per stage of the
//! schedule (a fused op) together with what its backward needs; `DenseNet::backward` walks the
//! schedule backwards, popping one node per stage. Parameters and their gradients live in two
//! flat buffers owned by the model (zero-grad is one fill).
//!
//! Dense blocks never concatenate: a block owns one `[pixels, channels]` activation buffer
//! and, during backward, one gradient buffer of the same shape. Each dense layer reads a
//! channel prefix of the buffer and writes its new channels in place; its backward
//! accumulates into the prefix of the gradient buffer, so a prefix read by several layers
//! receives the sum of their gradients.

use super::Schedule;

/// One recorded stage with its saved tensors. Block activations are kept once, in
/// `Tape::blocks`.
pub(crate) enum Node<T> {
    /// conv0 → norm0 → ReLU → max pool, writing block 0's first channels.
    Stem {
        x: Vec<T>,  // [n, h, w, 3]
        y0: Vec<T>, // [n, h0, w0, f0] conv0 output (before norm0)
        mean: Vec<T>,
        var: Vec<T>,
    },
    /// BN-ReLU-1×1 conv → BN-ReLU-3×3 conv, reading a prefix of its block and writing `k`
    /// channels.
    DenseLayer {
        y1: Vec<T>, // [pixels, bn_size*k] bottleneck output (before norm2)
        mean2: Vec<T>,
        var2: Vec<T>,
    },
    /// BN-ReLU → 2×2 avg pool → 1×1 conv (pooling first: both are linear per pixel, so
    /// they commute), from block `b` into the first channels of block `b + 1`.
    Transition {
        pooled: Vec<T>, // [pixels/4, channels of block b]
    },
    /// norm5 → ReLU → global average pool → linear.
    Head {
        feat: Vec<T>, // [n, c]
    },
}

/// A dense block's activations in a forward pass.
pub(crate) struct BlockAct<T> {
    pub buf: Vec<T>, // [n, h, w, c_total]
    pub n: usize,
    pub h: usize,
    pub w: usize,
    /// Train mode: batch mean / biased variance of every channel, computed once when the
    /// channel is written and reused by every later BN that reads it.
    pub mean: Vec<T>,
    pub var: Vec<T>,
}

impl<T> BlockAct<T> {
    pub fn rows(&self) -> usize {
        self.n * self.h * self.w
    }
}

/// What one recorded forward left for one backward: the schedule it ran, its batch size, one
/// node per stage and every block's activations.
pub(crate) struct Tape<T> {
    pub schedule: Schedule,
    pub n: usize,
    pub nodes: Vec<Node<T>>,
    pub blocks: Vec<BlockAct<T>>,
}
