//! The `mura` binary as a user runs it: every command's argument checks and error lines
//! (`audit`), hostile files (`hostile`), kills and full disks while training saves its
//! checkpoint (`checkpoint_crash`), `mura score` (`score`), `mura report` (`report`),
//! training end to end (`train`) and the bounds of every count (`sizes`).

#[path = "../common/mod.rs"]
mod common;

mod audit;
mod checkpoint_crash;
mod hostile;
mod report;
mod score;
mod sizes;
mod train;
