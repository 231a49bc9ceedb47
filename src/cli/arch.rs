//! `--arch` and its custom-architecture options, shared by every command that builds a model.

use crate::checkpoint::{self, ArchRequest};
use crate::spec::DenseNetSpec;
use anyhow::Result;
use std::path::Path;

/// Command-line selection of an architecture, shared by every command that builds a model.
#[derive(clap::Args, Clone, Debug)]
pub struct ArchArgs {
    /// densenet121 | densenet161 | densenet169 | densenet201 | custom
    #[arg(long, default_value = "densenet169")]
    pub arch: String,
    /// Growth rate (custom only)
    #[arg(long, default_value_t = 32)]
    pub growth_rate: usize,
    /// Layers per dense block, comma separated (custom only)
    #[arg(long, value_delimiter = ',', default_value = "6,12,32,32")]
    pub block_config: Vec<usize>,
    /// Channels of the stem convolution (custom only)
    #[arg(long, default_value_t = 64)]
    pub num_init_features: usize,
    /// Bottleneck width multiplier (custom only)
    #[arg(long, default_value_t = 4)]
    pub bn_size: usize,
}

/// The command-line defaults: densenet169.
impl Default for ArchArgs {
    fn default() -> Self {
        ArchArgs {
            arch: "densenet169".into(),
            growth_rate: 32,
            block_config: vec![6, 12, 32, 32],
            num_init_features: 64,
            bn_size: 4,
        }
    }
}

impl ArchArgs {
    /// What these options ask for: named when `--arch` is not the default.
    pub fn request(&self) -> Result<ArchRequest> {
        let spec = self.spec()?;
        Ok(match self.arch == ArchArgs::default().arch {
            true => ArchRequest::Default(spec),
            false => ArchRequest::Named(spec),
        })
    }

    pub fn spec(&self) -> Result<DenseNetSpec> {
        if self.arch == "custom" {
            DenseNetSpec::custom(
                self.growth_rate,
                self.block_config.clone(),
                self.num_init_features,
                self.bn_size,
            )
        } else {
            DenseNetSpec::preset(&self.arch)
        }
    }
}

/// A model checkpoint for a command's `--arch` options ([`checkpoint::load_model_for`]): a mura
/// checkpoint's recorded architecture needs no `--arch` (one given other than the default is
/// insisted on); any other safetensors file loads as the `--arch` asked for.
pub fn load_model(path: &Path, arch: &ArchArgs) -> Result<checkpoint::ModelFile> {
    checkpoint::load_model_for(path, &arch.request()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_args_default_is_the_command_line_default() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            arch: ArchArgs,
        }
        let parsed = Cli::parse_from(["mura"]).arch;
        let d = ArchArgs::default();
        assert_eq!(
            (parsed.arch, parsed.growth_rate, parsed.block_config),
            (d.arch, d.growth_rate, d.block_config)
        );
        assert_eq!(
            (parsed.num_init_features, parsed.bn_size),
            (d.num_init_features, d.bn_size)
        );
    }
}
