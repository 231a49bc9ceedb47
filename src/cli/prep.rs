//! `mura prep`: decode a MURA tree once into a memory-mapped uint8 store.

use crate::data::prep::{prep, PrepConfig};
use crate::data::StudyType;
use crate::out::Progress;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The folder holding MURA-v1.1/ (or MURA-v1.1/ itself)
    #[arg(long)]
    pub mura_root: PathBuf,
    /// Store folder to write (replaced atomically if it is an earlier store)
    #[arg(long)]
    pub out: PathBuf,
    /// Side of the stored square images
    #[arg(long, default_value_t = 256, value_parser = super::count(crate::bounds::SIDE))]
    pub size: usize,
    /// Comma-separated study types, e.g. XR_WRIST,XR_HAND (default: all seven)
    #[arg(long, default_value = "")]
    pub study_types: String,
    /// Fail when any image or row had to be skipped
    #[arg(long)]
    pub strict: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = PrepConfig {
        mura_root: args.mura_root,
        out: args.out,
        size: args.size,
        study_types: StudyType::parse_list(&args.study_types)?,
        strict: args.strict,
        progress: Progress::Bars,
    };
    let s = prep(&cfg)?;
    let m = &s.manifest;
    let manifest = s.files.join(crate::data::store::MANIFEST_FILE);
    for (split, c) in &m.splits {
        crate::out!("{split}: {} studies, {} images", c.studies, c.images);
    }
    for n in m.notes.iter().take(20) {
        crate::out!("note: {n}");
    }
    if m.notes.len() > 20 {
        crate::out!(
            "note: ... and {} more (see {})",
            m.notes.len() - 20,
            manifest.display()
        );
    }
    for k in m.skipped.iter().take(20) {
        crate::out!("skipped: {}: {}", k.path, k.reason);
    }
    if m.skipped.len() > 20 {
        crate::out!(
            "skipped: ... and {} more (see {})",
            m.skipped.len() - 20,
            manifest.display()
        );
    }
    crate::out!(
        "wrote {} ({} images of {}x{}, {} skipped) in {:.1}s ({:.0} images/s)",
        cfg.out.display(),
        m.images,
        m.size,
        m.size,
        m.skipped.len(),
        s.seconds,
        m.images as f64 / s.seconds
    );
    Ok(())
}
