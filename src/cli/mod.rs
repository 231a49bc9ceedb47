//! One file per subcommand: its clap `Args` and its `run`.
pub mod arch;
pub mod bench;
pub mod demo;
pub mod eval;
pub mod export;
pub mod info;
pub mod inspect;
pub mod predict;
pub mod prep;
pub mod report;
pub mod score;
pub mod synth;
pub mod train;

/// The parser of a count-valued argument, with the bounds `count` states (see `bounds`): a value
/// outside them is an argument that does not parse.
pub fn count(count: crate::bounds::Count) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(count.min..=count.max)
}
