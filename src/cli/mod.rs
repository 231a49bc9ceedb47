//! One file per subcommand: its clap `Args` and its `run`.
pub mod arch;
pub mod bench;
pub mod demo;
pub mod eval;
pub mod export;
pub mod info;
pub mod inspect;
pub mod out;
pub mod predict;
pub mod prep;
pub mod report;
pub mod score;
pub mod synth;
pub mod train;
