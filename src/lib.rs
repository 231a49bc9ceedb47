//! mura: a from-scratch DenseNet training engine for MURA.

// Every line goes through `out` (one line, escaped; a closed stream never stops a command).
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod backend;
pub mod bounds;
pub mod cam;
pub mod checkpoint;
pub mod cli;
pub mod consts;
pub mod data;
pub mod device;
pub mod disk;
pub mod eval;
pub mod gpu;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod net;
pub mod onnx;
pub mod ops;
pub mod optim;
pub mod out;
pub mod plot;
pub mod precision;
pub mod predict;
pub mod report;
pub mod rng;
pub mod roofline;
pub mod spec;
pub mod train;
pub mod weights;
