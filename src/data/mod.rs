//! MURA data: the MURA-v1.1 reader, the synthetic generator, `prep` into a memory-mapped
//! uint8 store, and the study-level loader with augmentation.

pub mod image;
pub mod loader;
pub mod mura;
pub mod prep;
pub mod store;
pub mod synth;

use serde::{Deserialize, Serialize};
use std::fmt;

/// The seven MURA study types, in MURA's (alphabetical) order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum StudyType {
    #[serde(rename = "XR_ELBOW")]
    Elbow,
    #[serde(rename = "XR_FINGER")]
    Finger,
    #[serde(rename = "XR_FOREARM")]
    Forearm,
    #[serde(rename = "XR_HAND")]
    Hand,
    #[serde(rename = "XR_HUMERUS")]
    Humerus,
    #[serde(rename = "XR_SHOULDER")]
    Shoulder,
    #[serde(rename = "XR_WRIST")]
    Wrist,
}

impl StudyType {
    pub const ALL: [StudyType; 7] = [
        StudyType::Elbow,
        StudyType::Finger,
        StudyType::Forearm,
        StudyType::Hand,
        StudyType::Humerus,
        StudyType::Shoulder,
        StudyType::Wrist,
    ];

    /// The folder name, e.g. `XR_WRIST`.
    pub fn name(self) -> &'static str {
        match self {
            StudyType::Elbow => "XR_ELBOW",
            StudyType::Finger => "XR_FINGER",
            StudyType::Forearm => "XR_FOREARM",
            StudyType::Hand => "XR_HAND",
            StudyType::Humerus => "XR_HUMERUS",
            StudyType::Shoulder => "XR_SHOULDER",
            StudyType::Wrist => "XR_WRIST",
        }
    }

    /// Accepts `XR_WRIST`, `wrist`, `Wrist` (case-insensitive, `XR_` optional).
    pub fn parse(s: &str) -> anyhow::Result<StudyType> {
        let up = s.trim().to_ascii_uppercase();
        let bare = up.strip_prefix("XR_").unwrap_or(&up);
        StudyType::ALL
            .into_iter()
            .find(|t| &t.name()[3..] == bare)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown study type '{s}' (expected one of XR_ELBOW, XR_FINGER, XR_FOREARM, \
                     XR_HAND, XR_HUMERUS, XR_SHOULDER, XR_WRIST)"
                )
            })
    }

    /// Parses a comma-separated list; an empty string means all seven.
    pub fn parse_list(s: &str) -> anyhow::Result<Vec<StudyType>> {
        let mut out: Vec<StudyType> = Vec::new();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let t = StudyType::parse(part)?;
            if !out.contains(&t) {
                out.push(t);
            }
        }
        if out.is_empty() {
            out = StudyType::ALL.to_vec();
        }
        out.sort();
        Ok(out)
    }
}

impl fmt::Display for StudyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for StudyType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        StudyType::parse(s)
    }
}

/// A split of the dataset. `Test` holds test-style, unlabeled folders (`studyK`, no suffix).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Valid,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Valid, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Split> {
        Split::ALL
            .into_iter()
            .find(|x| x.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| anyhow::anyhow!("unknown split '{s}' (expected train, valid or test)"))
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Split {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Split::parse(s)
    }
}

/// Writes `bytes` to `path` atomically: a temporary sibling, fsync, rename, fsync of the folder.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename to {}", path.display()))?;
    sync_dir(path.parent());
    Ok(())
}

/// fsyncs a directory so a rename inside it is durable (best effort: not every platform allows it).
pub fn sync_dir(dir: Option<&std::path::Path>) {
    if let Some(d) = dir {
        let d = if d.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            d
        };
        if let Ok(f) = std::fs::File::open(d) {
            let _ = f.sync_all();
        }
    }
}
