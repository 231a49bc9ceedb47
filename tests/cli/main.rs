//! The `mura` binary as a user runs it: every command's argument checks and error lines
//! (`audit`), `mura bench --plan` (`bench`), hostile files (`hostile`), kills and full disks
//! while training saves its checkpoint (`checkpoint_crash`), `mura score` (`score`), `mura
//! report` (`report`), training end to end (`train`), `mura export --onnx` (`export`), loaded
//! data that is not what it claims (`loaded`), folders and outputs mura owns, streams, signals,
//! messages and moved runs (`owned`), predict and eval agreeing (`preprocess`) and the
//! bounds of every count (`sizes`); DICOM views in `predict` and `prep` (`dicom`).

#[path = "../common/mod.rs"]
mod common;

mod audit;
mod bench;
mod checkpoint_crash;
mod dicom;
mod export;
mod hostile;
mod loaded;
mod owned;
mod preprocess;
mod report;
mod score;
mod sizes;
mod train;
