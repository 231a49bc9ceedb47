//! mura: a from-scratch DenseNet training engine for MURA.

pub mod cli;
pub mod data;
pub mod device;
pub mod rng;
pub mod spec;
pub mod weights;
