//! mura: a from-scratch DenseNet training engine for MURA.

pub mod autograd;
pub mod cam;
pub mod cli;
pub mod data;
pub mod device;
pub mod gpu;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod net;
pub mod ops;
pub mod optim;
pub mod plot;
pub mod rng;
pub mod roofline;
pub mod spec;
pub mod weights;
