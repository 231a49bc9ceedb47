//! mura: a from-scratch DenseNet training engine for MURA.

pub mod cam;
pub mod cli;
pub mod device;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod rng;
pub mod roofline;
pub mod spec;
pub mod weights;
