//! The `mura` binary as a user runs it: every command's argument checks and error lines
//! (`audit`), `mura bench --plan` (`bench`), hostile files (`hostile`), kills and full disks while training saves its
//! checkpoint (`checkpoint_crash`), `mura score` (`score`), `mura report` (`report`), and
//! training end to end (`train`).

#[path = "../common/mod.rs"]
mod common;

mod audit;
mod bench;
mod checkpoint_crash;
mod hostile;
mod report;
mod score;
mod train;
