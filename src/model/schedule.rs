//! The DenseNet step, described once: where every tensor lives in the flat buffers ([`Layout`],
//! from the spec), and, for an input size, every stage with its shapes in the order the forward
//! runs them ([`Schedule`]; the backward runs them in reverse). The CPU model, the GPU model, the
//! roofline table and the kernel harness all walk this one description.
//!
//! ```text
//! Stem        conv0 7×7/2 → norm0 → ReLU → max pool 3×3/2   into block 0's channels [0, f0)
//! Layer b.l   norm1 → ReLU → conv1 1×1 (c_in → bn_size·k)   reads block b's channels [0, c_in)
//!             norm2 → ReLU → conv2 3×3 (→ k)                writes channels [c_in, c_in + k)
//! Transition  norm → ReLU → avg pool 2×2 → conv 1×1         block b → block b + 1's [0, c_out)
//! Head        norm5 → ReLU → global average pool → linear   one logit
//! ```
//! (mura pools before the transition's 1×1 convolution, which is exact for a linear map and a
//! quarter of its work.) A dense block owns one buffer `[n, h, w, c_total]`: each layer reads a
//! channel prefix and writes its `k` new channels after it.

use crate::ops::conv::Conv;
use crate::ops::pool::maxpool_out;
use crate::spec::{DenseNetSpec, Role};
use anyhow::{bail, Result};
use std::collections::HashMap;

/// Where one BN's tensors live: gamma at `p`, beta at `p + c` (params); running mean at `s`,
/// running var at `s + c` (stats); its counter at `counters[cnt]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BnIdx {
    pub p: usize,
    pub s: usize,
    pub cnt: usize,
    pub c: usize,
}

/// A convolution: its geometry, and its weight `[k, k, ci, co]` at `params[p..]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvIdx {
    pub p: usize,
    pub g: Conv,
    pub ci: usize,
    pub co: usize,
}

impl ConvIdx {
    pub fn len(&self) -> usize {
        self.g.k * self.g.k * self.ci * self.co
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Its weights in a flat parameter buffer.
    pub fn of<'a, T>(&self, params: &'a [T]) -> &'a [T] {
        &params[self.p..self.p + self.len()]
    }
}

/// One dense layer's tensors.
#[derive(Clone, Copy, Debug)]
pub struct LayerIdx {
    pub norm1: BnIdx,
    pub conv1: ConvIdx,
    pub norm2: BnIdx,
    pub conv2: ConvIdx,
}

/// One dense block's tensors, and its transition's (all blocks but the last).
#[derive(Clone, Debug)]
pub struct BlockIdx {
    pub c_total: usize,
    pub layers: Vec<LayerIdx>,
    pub transition: Option<(BnIdx, ConvIdx)>,
}

/// Offsets of every tensor in the flat buffers (parameters, BN running statistics, BN counters,
/// in `DenseNetSpec::state_dict_layout()` order), and the structure they describe.
#[derive(Clone, Debug)]
pub struct Layout {
    pub conv0: ConvIdx,
    pub norm0: BnIdx,
    pub blocks: Vec<BlockIdx>,
    pub norm5: BnIdx,
    /// Classifier weight `[c]` at `fc`, bias at `fc + c`.
    pub fc: usize,
    pub n_params: usize,
    pub n_stats: usize,
    pub n_counters: usize,
}

impl Layout {
    pub fn new(spec: &DenseNetSpec) -> Layout {
        let mut at: HashMap<String, usize> = HashMap::new();
        let (mut np, mut ns, mut nc) = (0, 0, 0);
        for t in spec.state_dict_layout() {
            let slot = match t.role {
                Role::Param => &mut np,
                Role::RunningStat => &mut ns,
                Role::Counter => &mut nc,
            };
            let len = t.numel().max(1);
            at.insert(t.name, *slot);
            *slot += len;
        }
        let bn = |name: &str, c: usize| BnIdx {
            p: at[&format!("{name}.weight")],
            s: at[&format!("{name}.running_mean")],
            cnt: at[&format!("{name}.num_batches_tracked")],
            c,
        };
        let conv = |name: &str, g: Conv, ci: usize, co: usize| ConvIdx {
            p: at[&format!("{name}.weight")],
            g,
            ci,
            co,
        };
        let (ins, c_final) = spec.block_input_channels();
        let (k, mid) = (spec.growth_rate, spec.bn_size * spec.growth_rate);
        let nb = spec.block_config.len();
        let blocks = (0..nb)
            .map(|b| {
                let c_total = ins[b] + spec.block_config[b] * k;
                let layers = (0..spec.block_config[b])
                    .map(|l| {
                        let p = format!("features.denseblock{}.denselayer{}", b + 1, l + 1);
                        let c = ins[b] + l * k;
                        LayerIdx {
                            norm1: bn(&format!("{p}.norm1"), c),
                            conv1: conv(&format!("{p}.conv1"), Conv::POINTWISE, c, mid),
                            norm2: bn(&format!("{p}.norm2"), mid),
                            conv2: conv(&format!("{p}.conv2"), Conv::CONV3, mid, k),
                        }
                    })
                    .collect();
                let transition = (b + 1 < nb).then(|| {
                    let p = format!("features.transition{}", b + 1);
                    (
                        bn(&format!("{p}.norm"), c_total),
                        conv(&format!("{p}.conv"), Conv::POINTWISE, c_total, c_total / 2),
                    )
                });
                BlockIdx {
                    c_total,
                    layers,
                    transition,
                }
            })
            .collect();
        let f0 = spec.num_init_features;
        Layout {
            conv0: conv("features.conv0", Conv::STEM, 3, f0),
            norm0: bn("features.norm0", f0),
            blocks,
            norm5: bn("features.norm5", c_final),
            fc: at["classifier.weight"],
            n_params: np,
            n_stats: ns,
            n_counters: nc,
        }
    }

    /// Every convolution, in the state dict's order.
    pub fn convs(&self) -> Vec<ConvIdx> {
        let mut v = vec![self.conv0];
        for b in &self.blocks {
            for l in &b.layers {
                v.extend([l.conv1, l.conv2]);
            }
            v.extend(b.transition.map(|t| t.1));
        }
        v
    }

    /// Every BN, in the state dict's order.
    pub fn bns(&self) -> Vec<BnIdx> {
        let mut v = vec![self.norm0];
        for b in &self.blocks {
            for l in &b.layers {
                v.extend([l.norm1, l.norm2]);
            }
            v.extend(b.transition.map(|t| t.0));
        }
        v.push(self.norm5);
        v
    }

    /// The classifier's input channels (norm5's).
    pub fn features(&self) -> usize {
        self.norm5.c
    }
}

/// A spatial size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hw {
    pub h: usize,
    pub w: usize,
}

impl Hw {
    /// Pixels of a batch of `n` images of this size: the rows of its NHWC matrix.
    pub fn rows(self, n: usize) -> usize {
        n * self.h * self.w
    }
    /// Half the size, rounded down (a 2×2/2 average pool).
    pub fn halved(self) -> Hw {
        Hw {
            h: self.h / 2,
            w: self.w / 2,
        }
    }
}

/// conv0 → norm0 → ReLU → max pool, into block 0's first `conv.co` channels.
#[derive(Clone, Copy, Debug)]
pub struct Stem {
    pub conv: ConvIdx,
    pub norm: BnIdx,
    pub input: Hw,
    /// conv0's output (norm0's input).
    pub conv_out: Hw,
    /// The max pool's output: block 0's size.
    pub pool_out: Hw,
}

/// A dense layer: BN1 + ReLU → 1×1 (`c_in` → `conv1.co`) → BN2 + ReLU → 3×3 (→ `conv2.co`).
#[derive(Clone, Copy, Debug)]
pub struct Layer {
    pub block: usize,
    pub index: usize,
    pub hw: Hw,
    /// The channel prefix of the block's buffer it reads; it writes `[c_in, c_in + conv2.co)`.
    pub c_in: usize,
    /// The block buffer's channels (its row stride).
    pub c_total: usize,
    pub norm1: BnIdx,
    pub conv1: ConvIdx,
    pub norm2: BnIdx,
    pub conv2: ConvIdx,
}

/// BN + ReLU → 2×2 average pool → 1×1 conv, from block `block` (all its channels) into block
/// `block + 1`'s first `conv.co` channels.
#[derive(Clone, Copy, Debug)]
pub struct Transition {
    pub block: usize,
    pub norm: BnIdx,
    pub conv: ConvIdx,
    pub hw_in: Hw,
    pub hw_out: Hw,
    /// Block `block`'s channels (the BN's and the conv's input).
    pub c_in: usize,
    /// Block `block + 1`'s channels (the row stride of the conv's output).
    pub next_c_total: usize,
}

/// norm5 → ReLU → global average pool → linear, on the last block.
#[derive(Clone, Copy, Debug)]
pub struct Head {
    pub norm: BnIdx,
    /// Classifier weight `[c]` at `fc`, bias at `fc + c`.
    pub fc: usize,
    pub c: usize,
    pub hw: Hw,
}

/// A dense block: its size, its channels and its layers.
#[derive(Clone, Debug)]
pub struct Block {
    pub index: usize,
    pub hw: Hw,
    pub c_total: usize,
    pub layers: Vec<Layer>,
    pub transition: Option<Transition>,
}

/// One stage of the step.
#[derive(Clone, Copy, Debug)]
pub enum Step<'a> {
    Stem(&'a Stem),
    Layer(&'a Layer),
    Transition(&'a Transition),
    Head(&'a Head),
}

/// Which way a stage runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    Fwd,
    Bwd,
}

/// Where in a training step (or an eval forward) a piece of work belongs: a stage of the
/// schedule in one direction, or the work around them. Blocks, layers and transitions are
/// numbered from 0, as in the [`Schedule`], and shown from 1, as torchvision names them
/// (`block2.layer3`, `trans1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// What a pass does before its first stage. Forward: the batch into the model (upload and
    /// cast, or augmentation), the bf16 weight copy, its scratch zeroed; backward: the logits'
    /// gradient in, its scratch zeroed.
    Start(Dir),
    /// The gradients' zeroing before a training step.
    ZeroGrad,
    Stem(Dir),
    Layer {
        block: usize,
        index: usize,
        dir: Dir,
    },
    Transition {
        block: usize,
        dir: Dir,
    },
    Head(Dir),
    /// The optimiser's update of every parameter.
    Adam,
}

impl Stage {
    /// The stage of `step` in direction `dir`.
    pub fn of(step: Step, dir: Dir) -> Stage {
        match step {
            Step::Stem(_) => Stage::Stem(dir),
            Step::Layer(l) => Stage::Layer {
                block: l.block,
                index: l.index,
                dir,
            },
            Step::Transition(t) => Stage::Transition {
                block: t.block,
                dir,
            },
            Step::Head(_) => Stage::Head(dir),
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dir = |d: &Dir| match d {
            Dir::Fwd => "fwd",
            Dir::Bwd => "bwd",
        };
        match self {
            Stage::Start(d) => write!(f, "start {}", dir(d)),
            Stage::ZeroGrad => f.write_str("zero-grad"),
            Stage::Stem(d) => write!(f, "stem {}", dir(d)),
            Stage::Layer {
                block,
                index,
                dir: d,
            } => {
                write!(f, "block{}.layer{} {}", block + 1, index + 1, dir(d))
            }
            Stage::Transition { block, dir: d } => write!(f, "trans{} {}", block + 1, dir(d)),
            Stage::Head(d) => write!(f, "head {}", dir(d)),
            Stage::Adam => f.write_str("adam"),
        }
    }
}

/// Every stage of the step for one input size, with its shapes.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub input: Hw,
    pub stem: Stem,
    pub blocks: Vec<Block>,
    pub head: Head,
}

impl Schedule {
    /// The stages for `h × w` inputs; an error if the input does not survive the stem and every
    /// transition's pooling.
    pub fn new(layout: &Layout, arch: &str, h: usize, w: usize) -> Result<Schedule> {
        let input = Hw { h, w };
        let arch = arch.to_string();
        let too_small = || crate::net::Misuse::TooSmall {
            h,
            w,
            arch: arch.clone(),
        };
        if h < 4 || w < 4 {
            bail!(too_small());
        }
        let (ch, cw) = Conv::STEM.out_hw(h, w);
        let conv_out = Hw { h: ch, w: cw };
        let (ph, pw) = maxpool_out(ch, cw);
        let mut hw = Hw { h: ph, w: pw };
        let stem = Stem {
            conv: layout.conv0,
            norm: layout.norm0,
            input,
            conv_out,
            pool_out: hw,
        };
        let mut blocks = Vec::new();
        for (b, blk) in layout.blocks.iter().enumerate() {
            if hw.h == 0 || hw.w == 0 {
                bail!(too_small());
            }
            let layers = blk
                .layers
                .iter()
                .enumerate()
                .map(|(l, li)| Layer {
                    block: b,
                    index: l,
                    hw,
                    c_in: li.norm1.c,
                    c_total: blk.c_total,
                    norm1: li.norm1,
                    conv1: li.conv1,
                    norm2: li.norm2,
                    conv2: li.conv2,
                })
                .collect();
            let transition = blk.transition.map(|(norm, conv)| Transition {
                block: b,
                norm,
                conv,
                hw_in: hw,
                hw_out: hw.halved(),
                c_in: blk.c_total,
                next_c_total: layout.blocks[b + 1].c_total,
            });
            blocks.push(Block {
                index: b,
                hw,
                c_total: blk.c_total,
                layers,
                transition,
            });
            hw = hw.halved();
        }
        let last = blocks.last().expect("a DenseNet has at least one block");
        let head = Head {
            norm: layout.norm5,
            fc: layout.fc,
            c: layout.norm5.c,
            hw: last.hw,
        };
        Ok(Schedule {
            input,
            stem,
            blocks,
            head,
        })
    }

    /// The stages in the order the forward runs them: the stem, each block's layers then its
    /// transition, the head. The backward runs them in reverse.
    pub fn forward(&self) -> Vec<Step<'_>> {
        let mut steps = vec![Step::Stem(&self.stem)];
        for b in &self.blocks {
            steps.extend(b.layers.iter().map(Step::Layer));
            steps.extend(b.transition.as_ref().map(Step::Transition));
        }
        steps.push(Step::Head(&self.head));
        steps
    }

    /// The stages in the order the backward runs them (the forward's, reversed).
    pub fn backward(&self) -> Vec<Step<'_>> {
        let mut steps = self.forward();
        steps.reverse();
        steps
    }

    /// The last block's size: the final feature map's (for class activation maps).
    pub fn feature_hw(&self) -> Hw {
        self.head.hw
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DenseNet-169 at 224²: the stages torchvision runs, with its sizes and channels.
    #[test]
    fn densenet169_schedule() {
        let spec = DenseNetSpec::preset("densenet169").unwrap();
        let lay = Layout::new(&spec);
        let s = Schedule::new(&lay, "densenet169", 224, 224).unwrap();
        assert_eq!((s.stem.conv_out.h, s.stem.pool_out.h), (112, 56));
        let sides: Vec<usize> = s.blocks.iter().map(|b| b.hw.h).collect();
        assert_eq!(sides, [56, 28, 14, 7]);
        let totals: Vec<usize> = s.blocks.iter().map(|b| b.c_total).collect();
        assert_eq!(totals, [256, 512, 1280, 1664]);
        let fwd = s.forward();
        assert_eq!(fwd.len(), 1 + (6 + 12 + 32 + 32) + 3 + 1);
        assert!(matches!(fwd[0], Step::Stem(_)));
        assert!(matches!(fwd[7], Step::Transition(t) if t.block == 0 && t.next_c_total == 512));
        assert!(matches!(fwd.last(), Some(Step::Head(h)) if h.c == 1664 && h.hw.h == 7));
        let Step::Layer(l) = fwd[8] else {
            panic!("block 1 starts after transition 0")
        };
        assert_eq!(
            (l.block, l.index, l.c_in, l.c_total, l.hw.h),
            (1, 0, 128, 512, 28)
        );
        let bwd = s.backward();
        assert!(matches!(bwd[0], Step::Head(_)) && matches!(bwd.last(), Some(Step::Stem(_))));
        assert!(Schedule::new(&lay, "densenet169", 3, 224).is_err());
        assert!(Schedule::new(&lay, "densenet169", 16, 16).is_err()); // block 4 would be 0×0
    }
}
