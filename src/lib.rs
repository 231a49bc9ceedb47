//! mura: a from-scratch DenseNet training engine for MURA.

pub mod cli;
pub mod device;
pub mod gpu;
pub mod rng;
pub mod spec;
pub mod weights;
