//! DenseNet architecture specs (torchvision's presets and custom ones) and the exact
//! torchvision `state_dict` layout they imply: every tensor's name, shape and role.

use anyhow::{bail, Result};

/// The hyper-parameters that define a DenseNet (torchvision's `DenseNet.__init__`). Checked
/// ([`DenseNetSpec::validate`]) however it is made: from the command line, or read from a
/// checkpoint's metadata or a run's config.json.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "SpecFields")]
pub struct DenseNetSpec {
    /// Preset name (`densenet169`, …) or `custom`.
    pub arch: String,
    pub growth_rate: usize,
    pub block_config: Vec<usize>,
    pub num_init_features: usize,
    pub bn_size: usize,
}

/// A spec as stored, before [`DenseNetSpec::validate`].
#[derive(serde::Deserialize)]
struct SpecFields {
    arch: String,
    growth_rate: usize,
    block_config: Vec<usize>,
    num_init_features: usize,
    bn_size: usize,
}

impl TryFrom<SpecFields> for DenseNetSpec {
    type Error = anyhow::Error;
    fn try_from(f: SpecFields) -> Result<Self> {
        let spec = DenseNetSpec {
            arch: f.arch,
            growth_rate: f.growth_rate,
            block_config: f.block_config,
            num_init_features: f.num_init_features,
            bn_size: f.bn_size,
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// The largest network mura builds. Every size computed from a spec is bounded by these, so a
/// mistyped or hostile spec is refused instead of overflowing or exhausting memory. DenseNet-264
/// (the deepest published: 6-12-64-48) and DenseNet-161 (growth 48, 96 init features) fit with a
/// wide margin.
const MAX_BLOCKS: usize = 8;
const MAX_LAYERS_PER_BLOCK: usize = 256;
/// Growth rate and init features.
const MAX_WIDTH: usize = 1024;
const MAX_BN_SIZE: usize = 16;
/// 2^30 parameters (4 GiB of f32).
const MAX_PARAMS: usize = 1 << 30;

/// What a state-dict tensor is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Trained by the optimiser (conv/BN/linear weights and biases).
    Param,
    /// BN running mean / running var (f32, not trained).
    RunningStat,
    /// BN `num_batches_tracked` (int64 scalar, shape `[]`).
    Counter,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: Role,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

pub const PRESETS: &[&str] = &["densenet121", "densenet161", "densenet169", "densenet201"];

impl DenseNetSpec {
    /// torchvision's presets: densenet121/161/169/201.
    pub fn preset(name: &str) -> Result<Self> {
        let (k, blocks, init): (usize, &[usize], usize) = match name {
            "densenet121" => (32, &[6, 12, 24, 16], 64),
            "densenet161" => (48, &[6, 12, 36, 24], 96),
            "densenet169" => (32, &[6, 12, 32, 32], 64),
            "densenet201" => (32, &[6, 12, 48, 32], 64),
            _ => bail!(
                "unknown architecture '{name}': use one of {} or 'custom'",
                PRESETS.join(", ")
            ),
        };
        Ok(DenseNetSpec {
            arch: name.to_string(),
            growth_rate: k,
            block_config: blocks.to_vec(),
            num_init_features: init,
            bn_size: 4,
        })
    }

    pub fn custom(
        growth_rate: usize,
        block_config: Vec<usize>,
        num_init_features: usize,
        bn_size: usize,
    ) -> Result<Self> {
        let spec = DenseNetSpec {
            arch: "custom".to_string(),
            growth_rate,
            block_config,
            num_init_features,
            bn_size,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Refuses a spec mura cannot build: a non-positive size, more than the stated maxima of
    /// blocks, layers, widths or parameters, or a preset's name on other hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        let (k, f0, bn) = (self.growth_rate, self.num_init_features, self.bn_size);
        if k == 0 || f0 == 0 || bn == 0 {
            bail!("custom DenseNet: growth rate, init features and bn size must be positive");
        }
        let blocks = &self.block_config;
        if blocks.is_empty() || blocks.contains(&0) {
            bail!("custom DenseNet: block config must list at least one block, each with at least one layer");
        }
        if blocks.len() > MAX_BLOCKS || blocks.iter().any(|&l| l > MAX_LAYERS_PER_BLOCK) {
            bail!(
                "DenseNet with blocks {blocks:?}: at most {MAX_BLOCKS} blocks of at most \
                 {MAX_LAYERS_PER_BLOCK} layers"
            );
        }
        if k > MAX_WIDTH || f0 > MAX_WIDTH || bn > MAX_BN_SIZE {
            bail!(
                "DenseNet with growth rate {k}, {f0} init features, bn size {bn}: at most \
                 {MAX_WIDTH}, {MAX_WIDTH} and {MAX_BN_SIZE}"
            );
        }
        match self.arch.as_str() {
            "custom" => {}
            name => {
                let preset = Self::preset(name)?;
                if *self != preset {
                    bail!("a spec named {name} has other hyper-parameters than {name}'s");
                }
            }
        }
        // (Bounded above: at most 2048 layers of at most ~2^18 × 2^14 weights each.)
        let params = self.num_params();
        if params > MAX_PARAMS {
            bail!("DenseNet with {params} parameters: at most {MAX_PARAMS}");
        }
        Ok(())
    }

    /// Channels entering each dense block, and after the last block (the classifier's width).
    pub fn block_input_channels(&self) -> (Vec<usize>, usize) {
        let mut c = self.num_init_features;
        let mut ins = Vec::new();
        for (b, &layers) in self.block_config.iter().enumerate() {
            ins.push(c);
            c += layers * self.growth_rate;
            if b + 1 < self.block_config.len() {
                c /= 2;
            }
        }
        (ins, c)
    }

    /// Width of the final feature map (`classifier.in_features`).
    pub fn num_features(&self) -> usize {
        self.block_input_channels().1
    }

    /// Every tensor of torchvision's `state_dict` for this model with a single-logit
    /// classifier, in torchvision's order.
    pub fn state_dict_layout(&self) -> Vec<TensorSpec> {
        let mut out = Vec::new();
        let bn = |out: &mut Vec<TensorSpec>, prefix: &str, c: usize| {
            for (s, role) in [
                ("weight", Role::Param),
                ("bias", Role::Param),
                ("running_mean", Role::RunningStat),
                ("running_var", Role::RunningStat),
            ] {
                out.push(TensorSpec {
                    name: format!("{prefix}.{s}"),
                    shape: vec![c],
                    role,
                });
            }
            out.push(TensorSpec {
                name: format!("{prefix}.num_batches_tracked"),
                shape: vec![],
                role: Role::Counter,
            });
        };
        let conv = |out: &mut Vec<TensorSpec>, name: &str, o: usize, i: usize, k: usize| {
            out.push(TensorSpec {
                name: format!("{name}.weight"),
                shape: vec![o, i, k, k],
                role: Role::Param,
            });
        };
        let f0 = self.num_init_features;
        conv(&mut out, "features.conv0", f0, 3, 7);
        bn(&mut out, "features.norm0", f0);
        let (ins, c_final) = self.block_input_channels();
        let k = self.growth_rate;
        let mid = self.bn_size * k;
        for (b, &layers) in self.block_config.iter().enumerate() {
            let bi = b + 1;
            for l in 0..layers {
                let c = ins[b] + l * k;
                let p = format!("features.denseblock{bi}.denselayer{}", l + 1);
                bn(&mut out, &format!("{p}.norm1"), c);
                conv(&mut out, &format!("{p}.conv1"), mid, c, 1);
                bn(&mut out, &format!("{p}.norm2"), mid);
                conv(&mut out, &format!("{p}.conv2"), k, mid, 3);
            }
            if b + 1 < self.block_config.len() {
                let c = ins[b] + layers * k;
                bn(&mut out, &format!("features.transition{bi}.norm"), c);
                conv(
                    &mut out,
                    &format!("features.transition{bi}.conv"),
                    c / 2,
                    c,
                    1,
                );
            }
        }
        bn(&mut out, "features.norm5", c_final);
        out.push(TensorSpec {
            name: "classifier.weight".into(),
            shape: vec![1, c_final],
            role: Role::Param,
        });
        out.push(TensorSpec {
            name: "classifier.bias".into(),
            shape: vec![1],
            role: Role::Param,
        });
        out
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> usize {
        self.state_dict_layout()
            .iter()
            .filter(|t| t.role == Role::Param)
            .map(|t| t.numel())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn densenet169_matches_torchvision() {
        let s = DenseNetSpec::preset("densenet169").unwrap();
        assert_eq!(s.num_features(), 1664);
        // torchvision densenet169 has 14,149,480 params with the 1000-way head;
        // the 1-logit head has 1664 + 1 instead of 1664*1000 + 1000.
        assert_eq!(s.num_params(), 14_149_480 - 1_665_000 + 1665);
        let l = s.state_dict_layout();
        assert_eq!(l[0].name, "features.conv0.weight");
        assert!(l.iter().any(
            |t| t.name == "features.denseblock4.denselayer32.conv2.weight"
                && t.shape == vec![32, 128, 3, 3]
        ));
    }

    #[test]
    fn densenet121_features() {
        assert_eq!(
            DenseNetSpec::preset("densenet121").unwrap().num_features(),
            1024
        );
        assert_eq!(
            DenseNetSpec::preset("densenet161").unwrap().num_features(),
            2208
        );
        assert_eq!(
            DenseNetSpec::preset("densenet201").unwrap().num_features(),
            1920
        );
        assert!(DenseNetSpec::preset("resnet50").is_err());
    }
}
