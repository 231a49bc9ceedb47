//! The DenseNet as a whole: the CPU model's gradients against finite differences (`gradcheck`)
//! and against torchvision's golden fixtures (`golden`), and the GPU model against the CPU model
//! on the executor named by MURA_TEST_DEVICE (`gpu`, `rawpath`).

#[path = "../common/mod.rs"]
mod common;

mod golden;
mod gpu;
mod gradcheck;
mod rawpath;
