//! Named tensors with torchvision names and layouts: the boundary between mura's internal
//! parameter buffers and files on disk (safetensors checkpoints, torchvision `.pth` files).

/// The data of one named tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
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
