//! Weights on disk: safetensors checkpoints, torchvision's `.pth` (zip and legacy formats) and the
//! seeded-weights formula the golden fixtures share with PyTorch.

#[path = "../common/mod.rs"]
mod common;

mod pth;
mod safetensors;
mod seeded;
