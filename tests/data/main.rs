//! The data path's readers and writers: the MURA tree, the store (and its crash-consistent
//! replacement), the loader and augmentation (`loader`); a store killed or out of space at every
//! step of its replacement (`store_crash`); the fuzz corpora and every crash the fuzzers found,
//! replayed through the fuzz targets' bodies (`fuzz_replay`).

#[path = "../common/mod.rs"]
mod common;

mod dicom;
mod fuzz_replay;
mod loader;
mod store_crash;
