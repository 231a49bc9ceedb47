//! Named tensors with torchvision names and layouts: the boundary between mura's internal
//! parameter buffers and files on disk (safetensors checkpoints, torchvision `.pth` files).
//!
//! - [`safetensors`]: safetensors save/load (mura's own weight format),
//! - [`pth`] + [`pickle`]: import of PyTorch `.pth` files (zip and legacy formats),
//! - [`torchvision`]: torchvision key remapping, fresh head, the exact check of weights (layout
//!   and values) every load goes through,
//! - [`Error`]: what a check or a codec refuses, typed,
//! - [`seeded`]: weights from a closed-form formula shared with `scripts/golden_fixtures.py`.

mod error;
pub mod pickle;
pub mod pth;
pub mod safetensors;
pub mod seeded;
pub mod torchvision;

pub use self::safetensors::{load_safetensors, save_safetensors, Checkpoint};
pub use error::{Error, Problem};
pub use pth::load_pth;
pub use seeded::seeded_state_dict;
pub use torchvision::{check_heads, check_state_dict, check_values, import_torchvision};

/// The data of one named tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype_name(&self) -> &'static str {
        match self {
            TensorData::F32(_) => "f32",
            TensorData::I64(_) => "i64",
        }
    }
}

/// One named tensor in PyTorch layout (row-major, conv weights `[out, in, kh, kw]`).
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// An ordered `state_dict`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StateDict {
    pub tensors: Vec<NamedTensor>,
}

impl StateDict {
    pub fn get(&self, name: &str) -> Option<&NamedTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
}
