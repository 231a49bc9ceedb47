//! MURA data: the MURA-v1.1 reader, the synthetic generator, `prep` into a memory-mapped
//! uint8 store, and the study-level loader with augmentation.

pub mod dicom;
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

    /// The study type of a study or image path: its `XR_...` folder, e.g.
    /// `MURA-v1.1/valid/XR_WRIST/patient1/study1/`; none where no folder names one of the seven.
    pub fn of_path(path: &str) -> Option<StudyType> {
        path.split(['/', '\\'])
            .find_map(|s| StudyType::ALL.into_iter().find(|t| t.name() == s))
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

#[cfg(test)]
mod tests {
    use super::StudyType;

    #[test]
    fn study_type_of_a_path() {
        let of = StudyType::of_path;
        assert_eq!(
            of("MURA-v1.1/valid/XR_WRIST/patient11185/study1_positive/"),
            Some(StudyType::Wrist)
        );
        assert_eq!(
            of("MURA-v1.1\\train\\XR_HAND\\patient1\\study1_negative\\image1.png"),
            Some(StudyType::Hand)
        );
        assert_eq!(of("no/type/here/"), None);
        // A folder that only looks like one: not one of the seven.
        assert_eq!(of("MURA-v1.1/valid/XR_KNEE/patient1/study1/"), None);
        assert_eq!(of("MURA-v1.1/valid/xr_wrist/patient1/study1/"), None);
    }
}
