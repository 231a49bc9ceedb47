//! mura: a from-scratch DenseNet training engine for MURA.

pub mod autograd;
pub mod cli;
pub mod device;
pub mod model;
pub mod ops;
pub mod rng;
pub mod spec;
pub mod weights;
