//! `mura inspect`: summarise a store and verify its header and checksum.

use crate::data::store::Store;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Store folder written by `mura prep`
    pub store: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let store = Store::open(&args.store)?; // verifies header, shape, checksum, index
    let m = &store.manifest;
    crate::out!("store {} ({})", args.store.display(), store.id());
    crate::out!(
        "  {} studies, {} images of {}x{} u8, format v{}",
        m.studies,
        m.images,
        m.size,
        m.size,
        m.format_version
    );
    crate::out!("  source: {}", m.source);
    for (split, c) in &m.splits {
        crate::out!("  {split}: {} studies, {} images", c.studies, c.images);
        crate::out!(
            "    {:<12} {:>7} {:>7} {:>9} {:>9}",
            "type",
            "studies",
            "images",
            "abn.stud",
            "abn.imgs"
        );
        for (t, tc) in &c.by_type {
            crate::out!(
                "    {t:<12} {:>7} {:>7} {:>9} {:>9}",
                tc.studies,
                tc.images,
                tc.abnormal_studies,
                tc.abnormal_images
            );
        }
    }
    if !m.weights.is_empty() {
        crate::out!("  loss weights (from training images): type w0 w1");
        for (t, w) in &m.weights {
            crate::out!("    {t:<12} {:.4} {:.4}", w.w0, w.w1);
        }
    }
    crate::out!("  skipped: {}, notes: {}", m.skipped.len(), m.notes.len());
    for k in m.skipped.iter().take(10) {
        crate::out!("    {}: {}", k.path, k.reason);
    }
    crate::out!("  checksum ok");
    Ok(())
}
