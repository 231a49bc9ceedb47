//! `synth`: a synthetic, MURA-v1.1-shaped dataset, deterministic from a seed.
//!
//! Layout, CSVs, study types and per-type sizes and abnormal ratios follow MURA (Table 1 of the
//! paper, per split). Patients have 1-3 studies of one type, studies 1-5 views (mean ~2.7),
//! images are 150-512 px a side and non-square, mostly 8-bit gray, ~8% RGB and ~7% 16-bit.
//!
//! **Anatomy.** Each type has its own bone layout (humerus: one thick shaft with a head; forearm:
//! radius and ulna; elbow: humerus meeting the forearm bones at a random flexion; finger: three
//! phalanges and a neighbour; hand: five rays of metacarpals and phalanges; shoulder: humeral
//! head, glenoid, clavicle; wrist: forearm ends, eight carpals, metacarpal bases). Bones are
//! hollow cylinders in projection (bright cortex, darker marrow) inside soft tissue, rendered
//! as X-ray attenuation `1 - exp(-k * density)`.
//!
//! **Nuisance (both classes, independent of the label).** Per view: rotation ±25° (plus 90° for
//! landscape images), mirror, scale 0.8-1.1, shift, bone endpoint and thickness jitter, exposure
//! (k), background level, gamma, a heel-effect gradient, Gaussian noise (σ 0.015-0.05), dark
//! collimation borders (30%), inverted images (3%); bright metal side markers ("L"/"R" blocks,
//! 35%, away from bone) and, on hands and fingers, rings across a finger (6%).
//!
//! **The abnormal signal** (one finding per abnormal study, on a major bone, at 25-75% of its
//! length; each view shows it with probability 0.9, at least one view always does; sized to
//! survive downsampling to 64²):
//! - fracture (45%, 50% on hands and fingers): the bone is cut along an oblique line (35-80°
//!   to its axis) with a gap of half a radius, the distal fragment shifted sideways by 1.0-1.6
//!   bone radii and angulated 10-25°, breaking the cortex, with soft-tissue swelling around it;
//! - hardware (30%, shoulder 35%): a metal plate along the bone with 3-5 screws across it, or an
//!   intramedullary nail along its axis: bright as metal, but so are the markers and rings;
//! - lesion (25%): a lytic (dark, with a bright rim) or sclerotic (dense) oval 1.4-2.2 bone
//!   radii long and nearly as wide as the bone, with soft-tissue swelling around it.
//!
//! A quick check of learnability is in the data helper's report (a small CNN on the 64² prep).

use super::{mura::PREFIX, Split, StudyType};
use crate::disk::owned::{self, Made};
use crate::out::Progress;
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::io::Write;
use std::path::Path;

/// MURA Table 1: per type (train normal, train abnormal, valid normal, valid abnormal) studies.
pub const TABLE1: [(StudyType, [usize; 4]); 7] = [
    (StudyType::Elbow, [1094, 660, 92, 66]),
    (StudyType::Finger, [1280, 655, 92, 83]),
    (StudyType::Forearm, [590, 287, 69, 64]),
    (StudyType::Hand, [1497, 521, 101, 66]),
    (StudyType::Humerus, [321, 271, 68, 67]),
    (StudyType::Shoulder, [1364, 1457, 99, 95]),
    (StudyType::Wrist, [2134, 1326, 140, 97]),
];

#[derive(Clone, Debug)]
pub struct SynthConfig {
    pub studies: usize,
    pub seed: u64,
    /// Share of studies in the validation split. MURA's is 8.2%; the default (0.2) is larger so
    /// that a small synthetic set has enough validation studies for a stable kappa.
    pub valid_fraction: f64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            studies: 600,
            seed: 0,
            valid_fraction: 0.2,
        }
    }
}

#[derive(Clone, Debug)]
pub struct SynthSummary {
    pub studies: usize,
    pub images: usize,
    pub abnormal_studies: usize,
    pub seconds: f64,
}

// ---------- small 2-D geometry ----------

#[derive(Clone, Copy, Debug, PartialEq)]
struct V(f32, f32);

impl V {
    fn add(self, o: V) -> V {
        V(self.0 + o.0, self.1 + o.1)
    }
    fn sub(self, o: V) -> V {
        V(self.0 - o.0, self.1 - o.1)
    }
    fn mul(self, k: f32) -> V {
        V(self.0 * k, self.1 * k)
    }
    fn dot(self, o: V) -> f32 {
        self.0 * o.0 + self.1 * o.1
    }
    fn len(self) -> f32 {
        self.dot(self).sqrt()
    }
    fn unit(self) -> V {
        self.mul(1.0 / self.len().max(1e-9))
    }
    fn perp(self) -> V {
        V(-self.1, self.0)
    }
    fn rot(self, deg: f32) -> V {
        let (s, c) = deg.to_radians().sin_cos();
        V(c * self.0 - s * self.1, s * self.0 + c * self.1)
    }
}

fn lerp(a: V, b: V, t: f32) -> V {
    a.add(b.sub(a).mul(t))
}

/// Distance from p to the segment a-b.
fn dist_seg(p: V, a: V, b: V) -> f32 {
    let ab = b.sub(a);
    let t = (p.sub(a).dot(ab) / ab.dot(ab).max(1e-12)).clamp(0.0, 1.0);
    p.sub(a.add(ab.mul(t))).len()
}

// ---------- anatomy ----------

/// A bone in canonical coordinates (about [-1.2, 1.2]², y down, 1 = half the short image side).
#[derive(Clone, Copy, Debug)]
struct Bone {
    a: V,
    b: V,
    r: f32,
    /// Marrow radius as a fraction of r.
    inner: f32,
    /// Findings go on major bones only.
    rank: Rank,
}

/// Whether a bone may carry a finding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rank {
    Major,
    Minor,
}

fn bone(a: V, b: V, r: f32, rank: Rank) -> Bone {
    Bone {
        a,
        b,
        r,
        inner: 0.62,
        rank,
    }
}

/// The bones of one patient's limb of type `t`.
fn anatomy(t: StudyType, rng: &mut Rng) -> Vec<Bone> {
    use Rank::{Major, Minor};
    let k = rng.range(0.88, 1.12) as f32; // patient thickness
    let flex = rng.range(-35.0, 35.0) as f32; // elbow flexion
    let side = if rng.bernoulli(0.5) { 0.75 } else { -0.75 }; // a finger's neighbour
    let mut j = |x: f32| x + rng.range(-0.04, 0.04) as f32;
    let mut v = Vec::new();
    match t {
        StudyType::Humerus => {
            v.push(bone(V(j(0.0), -1.0), V(j(0.0), 1.05), 0.15 * k, Major));
            v.push(bone(V(j(0.0), -1.05), V(0.02, -1.05), 0.3 * k, Minor)); // head
            v.push(bone(V(-0.25, 1.15), V(0.25, 1.15), 0.12 * k, Minor)); // condyles
        }
        StudyType::Forearm => {
            v.push(bone(V(j(-0.16), -1.2), V(j(-0.12), 1.2), 0.1 * k, Major));
            v.push(bone(V(j(0.14), -1.2), V(j(0.15), 1.2), 0.09 * k, Major));
        }
        StudyType::Elbow => {
            v.push(bone(V(j(0.0), -1.3), V(0.0, -0.05), 0.15 * k, Major));
            v.push(bone(V(-0.24, 0.0), V(0.24, 0.0), 0.12 * k, Minor));
            let d1 = V(-0.05, 1.2).rot(flex);
            let d2 = V(0.08, 1.2).rot(flex);
            v.push(bone(V(-0.1, 0.22), V(-0.1, 0.22).add(d1), 0.1 * k, Major));
            v.push(bone(V(0.14, 0.17), V(0.14, 0.17).add(d2), 0.09 * k, Major));
        }
        StudyType::Finger => {
            let x = j(0.0);
            v.push(bone(V(x, -1.2), V(x, -0.45), 0.13 * k, Major));
            v.push(bone(V(x, -0.33), V(x, 0.3), 0.12 * k, Major));
            v.push(bone(V(x, 0.42), V(x, 0.85), 0.11 * k, Major));
            v.push(bone(V(x, 0.97), V(x, 1.2), 0.1 * k, Minor));
            let n = side;
            v.push(bone(V(x + n, -1.2), V(x + n * 1.1, 0.1), 0.1 * k, Minor));
        }
        StudyType::Hand => {
            for i in 0..5 {
                let f = i as f32 - 2.0;
                let base = V(f * 0.17, 0.75);
                let dir = V(f * 0.18, -1.0).unit();
                let len = if i == 0 { 0.5 } else { 0.65 };
                let mc_end = base.add(dir.mul(len));
                v.push(bone(base, mc_end, 0.075 * k, Major));
                let p1 = mc_end.add(dir.mul(0.1));
                let rank = if i != 0 { Major } else { Minor };
                v.push(bone(p1, p1.add(dir.mul(0.42)), 0.065 * k, rank));
                let p2 = p1.add(dir.mul(0.52));
                v.push(bone(p2, p2.add(dir.mul(0.26)), 0.055 * k, Minor));
            }
            v.push(bone(V(-0.35, 0.95), V(0.35, 0.95), 0.14 * k, Minor)); // carpus
        }
        StudyType::Shoulder => {
            v.push(bone(V(0.25, 0.05), V(0.26, 0.06), 0.34 * k, Minor)); // humeral head
            v.push(bone(V(j(0.3), 0.3), V(j(0.42), 1.35), 0.17 * k, Major));
            v.push(bone(V(-0.35, -0.25), V(-0.75, 1.0), 0.13 * k, Minor)); // glenoid/scapula
            v.push(bone(V(-1.3, -0.75), V(j(0.45), -0.6), 0.085 * k, Major)); // clavicle
        }
        StudyType::Wrist => {
            v.push(bone(V(j(-0.2), 1.3), V(-0.18, 0.12), 0.15 * k, Major)); // radius
            v.push(bone(V(j(0.25), 1.3), V(0.22, 0.18), 0.1 * k, Major)); // ulna
            for i in 0..8 {
                let c = V(
                    -0.3 + 0.18 * (i % 4) as f32,
                    if i < 4 { -0.08 } else { -0.3 },
                );
                v.push(bone(c, c.add(V(0.02, 0.0)), 0.075 * k, Minor));
            }
            for i in 0..4 {
                let b = V(-0.28 + 0.19 * i as f32, -0.45);
                let rank = if i == 1 || i == 2 { Major } else { Minor };
                v.push(bone(
                    b,
                    b.add(V(0.04 * (i as f32 - 1.5), -0.75)),
                    0.07 * k,
                    rank,
                ));
            }
        }
    }
    v
}

// ---------- findings ----------

/// A bone cut along an oblique line, the distal fragment shifted and angulated.
#[derive(Clone, Copy, Debug)]
struct Fracture {
    bone: usize,
    /// Where along the bone, 0-1.
    t: f32,
    cut_deg: f32,
    gap: f32,
    shift: f32,
    tilt_deg: f32,
}

#[derive(Clone, Copy, Debug)]
enum Finding {
    Fracture(Fracture),
    Plate {
        bone: usize,
        t: f32,
        len: f32,
        side: f32,
        screws: usize,
    },
    Nail {
        bone: usize,
    },
    Lesion {
        bone: usize,
        t: f32,
        a: f32,
        b: f32,
        kind: LesionKind,
    },
}

/// A lesion's kind: lytic (dark, with a bright rim) or sclerotic (dense).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LesionKind {
    Lytic,
    Sclerotic,
}

fn pick_finding(t: StudyType, bones: &[Bone], rng: &mut Rng) -> Finding {
    let majors: Vec<usize> = (0..bones.len())
        .filter(|&i| bones[i].rank == Rank::Major)
        .collect();
    let b = majors[rng.below(majors.len() as u64) as usize];
    let r = bones[b].r;
    let (p_frac, p_hw) = match t {
        StudyType::Hand | StudyType::Finger => (0.5, 0.25),
        StudyType::Shoulder => (0.4, 0.35),
        _ => (0.45, 0.3),
    };
    let u = rng.uniform();
    let pos = rng.range(0.25, 0.75) as f32;
    let sign = if rng.bernoulli(0.5) { 1.0 } else { -1.0 };
    if u < p_frac {
        Finding::Fracture(Fracture {
            bone: b,
            t: pos,
            cut_deg: sign * rng.range(35.0, 80.0) as f32,
            gap: (0.5 * r).max(0.07),
            shift: sign * rng.range(1.0, 1.6) as f32 * r,
            tilt_deg: -sign * rng.range(10.0, 25.0) as f32,
        })
    } else if u < p_frac + p_hw {
        if rng.bernoulli(0.7) {
            let len = rng.range(0.45, 0.8) as f32;
            Finding::Plate {
                bone: b,
                t: pos,
                len,
                side: sign,
                screws: 3 + rng.below(3) as usize,
            }
        } else {
            Finding::Nail { bone: b }
        }
    } else {
        Finding::Lesion {
            bone: b,
            t: pos,
            a: r * rng.range(1.4, 2.2) as f32,
            b: r * rng.range(0.8, 1.0) as f32,
            kind: match rng.bernoulli(0.6) {
                true => LesionKind::Lytic,
                false => LesionKind::Sclerotic,
            },
        }
    }
}

// ---------- rendering ----------

/// Density layers of one view: soft tissue (max-combined), bone and metal (summed).
struct Canvas {
    w: usize,
    h: usize,
    tissue: Vec<f32>,
    bone: Vec<f32>,
    metal: Vec<f32>,
}

/// A half-plane: keep points p with dot(p - q, m) > 0.
type Clip = (V, V);

impl Canvas {
    /// Pixel bounding box of a disc-swept segment, clipped to the canvas.
    fn bbox(&self, a: V, b: V, r: f32) -> (usize, usize, usize, usize) {
        let f = |lo: f32, n: usize| (lo.floor().max(0.0) as usize).min(n);
        let x0 = f(a.0.min(b.0) - r - 1.0, self.w);
        let x1 = f(a.0.max(b.0) + r + 2.0, self.w);
        let y0 = f(a.1.min(b.1) - r - 1.0, self.h);
        let y1 = f(a.1.max(b.1) + r + 2.0, self.h);
        (x0, x1, y0, y1)
    }

    fn each(&mut self, a: V, b: V, r: f32, mut f: impl FnMut(&mut Canvas, usize, V, f32)) {
        let (x0, x1, y0, y1) = self.bbox(a, b, r);
        for y in y0..y1 {
            for x in x0..x1 {
                let p = V(x as f32 + 0.5, y as f32 + 0.5);
                let d = dist_seg(p, a, b);
                if d < r + 1.0 {
                    f(self, y * self.w + x, p, d);
                }
            }
        }
    }

    /// A hollow cylinder seen from the side: bright cortex, darker marrow.
    fn bone_cap(&mut self, a: V, b: V, r: f32, inner: f32, dens: f32, clips: &[Clip]) {
        let ri = r * inner;
        self.each(a, b, r, |c, i, p, d| {
            if d >= r || clips.iter().any(|&(q, m)| p.sub(q).dot(m) <= 0.0) {
                return;
            }
            let outer = (r * r - d * d).sqrt();
            let marrow = (ri * ri - d * d).max(0.0).sqrt();
            c.bone[i] += dens * (outer - 0.65 * marrow) / r;
        });
    }

    fn tissue_cap(&mut self, a: V, b: V, r: f32, dens: f32) {
        self.each(a, b, r, |c, i, _, d| {
            let v = dens * (1.0 - (d / r).powi(2)).max(0.0).sqrt();
            c.tissue[i] = c.tissue[i].max(v);
        });
    }

    fn swelling(&mut self, c: V, r: f32, dens: f32) {
        self.each(c, c, r, |cv, i, _, d| {
            cv.tissue[i] += dens * (1.0 - (d / r).powi(2)).max(0.0);
        });
    }

    /// A solid, anti-aliased metal rod.
    fn metal_cap(&mut self, a: V, b: V, r: f32, dens: f32) {
        self.each(a, b, r, |c, i, _, d| {
            c.metal[i] += dens * (r - d + 0.5).clamp(0.0, 1.0);
        });
    }

    /// Scales (lytic) or adds to (sclerotic) bone density inside an oval around `c`.
    fn lesion(&mut self, c: V, u: V, a: f32, b: f32, kind: LesionKind, rim: f32) {
        let n = u.perp();
        let r = a.max(b) + rim;
        self.each(c, c, r, |cv, i, p, _| {
            let q = p.sub(c);
            let e = ((q.dot(u) / a).powi(2) + (q.dot(n) / b).powi(2)).sqrt();
            let inside = (1.0 - e).clamp(0.0, 0.15) / 0.15;
            if kind == LesionKind::Lytic {
                let on_rim = (e > 1.0 && e < 1.0 + rim / a.min(b)) as u8 as f32;
                cv.bone[i] = cv.bone[i] * (1.0 - 0.9 * inside)
                    + 0.25 * on_rim * (cv.bone[i] > 0.0) as u8 as f32;
            } else if cv.bone[i] > 0.0 {
                cv.bone[i] += 1.2 * inside;
            }
        });
    }

    /// Bone `b` (canonical, placed by `pose`) cut by fracture `f`: the proximal fragment in place, the distal one turned and
    /// shifted.
    fn fractured(&mut self, pose: &Pose, b: &Bone, dens: f32, f: &Fracture) {
        let unit = pose.unit;
        let u = b.b.sub(b.a).unit();
        let p = lerp(b.a, b.b, f.t);
        let mut m = u.rot(f.cut_deg).perp();
        if m.dot(u) < 0.0 {
            m = m.mul(-1.0);
        }
        // Proximal fragment keeps dot(x - p, m) < -gap/2.
        let q1 = p.sub(m.mul(f.gap / 2.0));
        self.bone_cap(
            pose.map(b.a),
            pose.map(b.b),
            b.r * unit,
            b.inner,
            dens,
            &[(pose.map(q1), pose.lin(m.mul(-1.0)))],
        );
        // Distal fragment: turned about p, shifted sideways.
        let off = u.perp().mul(f.shift);
        let turn = |x: V| p.add(x.sub(p).rot(f.tilt_deg)).add(off);
        let m2 = m.rot(f.tilt_deg);
        let q2 = turn(p.add(m.mul(f.gap / 2.0)));
        self.bone_cap(
            pose.map(turn(b.a)),
            pose.map(turn(b.b)),
            b.r * unit,
            b.inner,
            dens,
            &[(pose.map(q2), pose.lin(m2))],
        );
    }
}

/// What one view looks like on disk.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Format {
    Gray8,
    Rgb8,
    Gray16,
}

#[derive(Clone, Debug)]
struct ViewSpec {
    w: usize,
    h: usize,
    shows: bool,
    format: Format,
    seed: u64,
}

#[derive(Clone, Debug)]
struct StudySpec {
    split: Split,
    ty: StudyType,
    patient: usize,
    number: usize,
    label: u8,
    bones: Vec<Bone>,
    finding: Option<Finding>,
    views: Vec<ViewSpec>,
}

impl StudySpec {
    fn dir(&self) -> String {
        let suffix = if self.label == 1 {
            "positive"
        } else {
            "negative"
        };
        format!(
            "{PREFIX}/{}/{}/patient{:05}/study{}_{suffix}/",
            self.split.name(),
            self.ty.name(),
            self.patient,
            self.number
        )
    }
}

/// How canonical coordinates map to one view's pixels: scale, rotation, mirror and centre.
struct Pose {
    /// Pixels per canonical unit.
    unit: f32,
    angle: f32,
    mirror: f32,
    centre: V,
}

impl Pose {
    /// Draws a view's pose (scale 0.8-1.1, rotation ±25° plus 90° for landscape, mirror, shift).
    fn draw(w: usize, h: usize, rng: &mut Rng) -> Pose {
        let unit = w.min(h) as f32 / 2.0 * rng.range(0.8, 1.1) as f32;
        let angle = rng.range(-25.0, 25.0) as f32 + if w > h { 90.0 } else { 0.0 };
        let mirror = if rng.bernoulli(0.5) { -1.0 } else { 1.0 };
        let centre = V(w as f32 / 2.0, h as f32 / 2.0)
            .add(V(rng.range(-0.15, 0.15) as f32, rng.range(-0.15, 0.15) as f32).mul(unit));
        Pose {
            unit,
            angle,
            mirror,
            centre,
        }
    }

    /// A canonical direction (or offset) in pixels.
    fn lin(&self, p: V) -> V {
        V(p.0 * self.mirror, p.1).rot(self.angle).mul(self.unit)
    }

    /// A canonical point in pixels.
    fn map(&self, p: V) -> V {
        self.centre.add(self.lin(p))
    }
}

/// The patient's bones as this view shows them: endpoints and thickness jittered.
fn jitter_bones(bones: &[Bone], rng: &mut Rng) -> Vec<Bone> {
    let mut bones = bones.to_vec();
    for b in &mut bones {
        let jit = 0.02;
        b.a =
            b.a.add(V(rng.normal() as f32 * jit, rng.normal() as f32 * jit));
        b.b =
            b.b.add(V(rng.normal() as f32 * jit, rng.normal() as f32 * jit));
        b.r *= rng.range(0.95, 1.05) as f32;
    }
    bones
}

/// The imaging chain of one view: exposure, background, gamma, heel effect, noise, collimation
/// and inversion.
struct Exposure {
    k: f32,
    bg: f32,
    gamma: f32,
    sigma: f32,
    /// Intensity gradient per pixel, in x and y.
    heel: V,
    /// The open field (left, right, top, bottom) when the borders are collimated.
    collimate: Option<(usize, usize, usize, usize)>,
    invert: bool,
}

impl Exposure {
    fn draw(w: usize, h: usize, rng: &mut Rng) -> Exposure {
        let k = rng.range(1.2, 2.0) as f32;
        let bg = rng.range(0.02, 0.12) as f32;
        let gamma = rng.range(0.75, 1.35) as f32;
        let sigma = rng.range(0.015, 0.05) as f32;
        let heel = V(
            rng.range(-0.08, 0.08) as f32 / w as f32,
            rng.range(-0.08, 0.08) as f32 / h as f32,
        );
        let collimate = rng.bernoulli(0.3).then(|| {
            let m = |n: usize, rng: &mut Rng| (n as f64 * rng.range(0.0, 0.12)) as usize;
            let (l, r, t, b) = (m(w, rng), w - m(w, rng), m(h, rng), h - m(h, rng));
            (l, r, t, b)
        });
        let invert = rng.bernoulli(0.03);
        Exposure {
            k,
            bg,
            gamma,
            sigma,
            heel,
            collimate,
            invert,
        }
    }

    /// The film: the canvas's densities as intensities in [0, 1], [h, w], with noise drawn
    /// from `rng` pixel by pixel.
    fn develop(&self, c: &Canvas, rng: &mut Rng) -> Vec<f32> {
        let (w, h) = (c.w, c.h);
        let (k, bg, heel) = (self.k, self.bg, self.heel);
        let mut out = vec![0f32; w * h];
        for y in 0..h {
            for x in 0..w {
                let i = y * w + x;
                let total = c.tissue[i] + c.bone[i] + c.metal[i];
                let mut val = bg + (1.0 - bg) * (1.0 - (-k * total).exp());
                val = val.powf(self.gamma)
                    + heel.0 * (x as f32 - w as f32 / 2.0)
                    + heel.1 * (y as f32 - h as f32 / 2.0);
                // Approximately normal noise: the sum of four uniforms.
                let z = (rng.uniform() + rng.uniform() + rng.uniform() + rng.uniform() - 2.0)
                    as f32
                    * 1.732;
                val += self.sigma * z;
                if let Some((l, r, t, b)) = self.collimate {
                    if x < l || x >= r || y < t || y >= b {
                        val = val * 0.15 + 0.01;
                    }
                }
                out[i] = if self.invert { 1.0 - val } else { val }.clamp(0.0, 1.0);
            }
        }
        out
    }
}

/// A view's canvas with its pose and bones: what the drawing steps of [`render`] share.
struct Scene {
    c: Canvas,
    pose: Pose,
    bones: Vec<Bone>,
    /// The view's bone density factor (0.85-1.15).
    dens: f32,
}

impl Scene {
    /// Soft tissue around every bone, then the bones, one of them fractured when `finding` is
    /// a fracture, then swelling around a fracture or lesion.
    fn limb(&mut self, finding: Option<Finding>) {
        let (p, unit) = (&self.pose, self.pose.unit);
        for b in &self.bones {
            self.c
                .tissue_cap(p.map(b.a), p.map(b.b), b.r * 2.8 * unit, 0.3);
        }
        for (i, b) in self.bones.iter().enumerate() {
            match finding {
                Some(Finding::Fracture(f)) if f.bone == i => self.c.fractured(p, b, self.dens, &f),
                _ => self
                    .c
                    .bone_cap(p.map(b.a), p.map(b.b), b.r * unit, b.inner, self.dens, &[]),
            }
        }
        // Soft-tissue swelling around fractures and lesions: a broad, faint cue.
        if let Some(Finding::Fracture(Fracture { bone, t, .. }) | Finding::Lesion { bone, t, .. }) =
            finding
        {
            let b = self.bones[bone];
            self.c
                .swelling(p.map(lerp(b.a, b.b, t)), 3.5 * b.r * unit, 0.45);
        }
    }

    /// Metal hardware (a plate with screws, or a nail) or a lesion, for those findings.
    fn hardware_or_lesion(&mut self, finding: Finding) {
        let (p, unit) = (&self.pose, self.pose.unit);
        match finding {
            Finding::Plate {
                bone,
                t,
                len,
                side,
                screws,
            } => {
                let b = self.bones[bone];
                let u = b.b.sub(b.a).unit();
                let n = u.perp().mul(side);
                let at = lerp(b.a, b.b, t).add(n.mul(b.r * 0.95));
                let (p0, p1) = (at.sub(u.mul(len / 2.0)), at.add(u.mul(len / 2.0)));
                self.c
                    .metal_cap(p.map(p0), p.map(p1), (0.06 * unit).max(1.2), 3.0);
                for k in 0..screws {
                    let sp = lerp(p0, p1, (k as f32 + 0.5) / screws as f32);
                    self.c.metal_cap(
                        p.map(sp),
                        p.map(sp.sub(n.mul(b.r * 2.1))),
                        (0.025 * unit).max(0.8),
                        2.5,
                    );
                }
            }
            Finding::Nail { bone } => {
                let b = self.bones[bone];
                let u = b.b.sub(b.a).unit();
                self.c.metal_cap(
                    p.map(b.a.add(u.mul(0.1))),
                    p.map(b.b.sub(u.mul(0.1))),
                    (0.5 * b.r * unit).max(1.2),
                    3.0,
                );
            }
            Finding::Lesion {
                bone,
                t,
                a,
                b: bb,
                kind,
            } => {
                let b = self.bones[bone];
                let u = p.lin(b.b.sub(b.a)).unit();
                self.c.lesion(
                    p.map(lerp(b.a, b.b, t)),
                    u,
                    a * unit,
                    bb * unit,
                    kind,
                    (0.02 * unit).max(1.0),
                );
            }
            Finding::Fracture(_) => {}
        }
    }

    /// Distractors, independent of the label: a side marker (35%) and, on hands and fingers, a
    /// ring (6%).
    fn distractors(&mut self, ty: StudyType, rng: &mut Rng) {
        let (w, h, unit) = (self.c.w, self.c.h, self.pose.unit);
        if rng.bernoulli(0.35) {
            let (cx, cy) = (
                if rng.bernoulli(0.5) { 0.1 } else { 0.82 },
                if rng.bernoulli(0.5) { 0.08 } else { 0.85 },
            );
            let o = V(w as f32 * cx, h as f32 * cy);
            let sz = w.min(h) as f32 * rng.range(0.05, 0.08) as f32;
            let r = (sz * 0.18).max(1.0);
            self.c.metal_cap(o, o.add(V(0.0, sz)), r, 2.5);
            self.c
                .metal_cap(o.add(V(0.0, sz)), o.add(V(sz * 0.7, sz)), r, 2.5);
            if rng.bernoulli(0.5) {
                self.c.metal_cap(o, o.add(V(sz * 0.6, sz * 0.3)), r, 2.5); // an "R"-ish stroke
            }
        }
        if matches!(ty, StudyType::Hand | StudyType::Finger) && rng.bernoulli(0.06) {
            let b = self.bones[rng.below(self.bones.len() as u64) as usize];
            let at = lerp(b.a, b.b, 0.5);
            let n = b.b.sub(b.a).unit().perp();
            self.c.metal_cap(
                self.pose.map(at.sub(n.mul(b.r * 1.5))),
                self.pose.map(at.add(n.mul(b.r * 1.5))),
                (0.03 * unit).max(1.0),
                2.5,
            );
        }
    }
}

/// Renders one view to intensities in [0, 1]: [h, w] f32. Every random draw comes from the
/// view's seed, in a fixed order: pose, bone jitter, density, distractors, exposure, noise.
fn render(s: &StudySpec, v: &ViewSpec) -> Vec<f32> {
    let mut rng = Rng::new(v.seed);
    let (w, h) = (v.w, v.h);
    let c = Canvas {
        w,
        h,
        tissue: vec![0.0; w * h],
        bone: vec![0.0; w * h],
        metal: vec![0.0; w * h],
    };
    let pose = Pose::draw(w, h, &mut rng);
    let bones = jitter_bones(&s.bones, &mut rng);
    let dens = rng.range(0.85, 1.15) as f32;
    let mut scene = Scene {
        c,
        pose,
        bones,
        dens,
    };
    let finding = s.finding.filter(|_| v.shows);
    scene.limb(finding);
    if let Some(f) = finding {
        scene.hardware_or_lesion(f);
    }
    scene.distractors(s.ty, &mut rng);
    Exposure::draw(w, h, &mut rng).develop(&scene.c, &mut rng)
}

fn write_png(path: &Path, img: &[f32], w: usize, h: usize, fmt: Format) -> Result<()> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::{ExtendedColorType, ImageEncoder};
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut buf = std::io::BufWriter::new(file);
    let enc = PngEncoder::new_with_quality(&mut buf, CompressionType::Fast, FilterType::Sub);
    let (w32, h32) = (w as u32, h as u32);
    let q8 = |v: f32| (v * 255.0).round() as u8;
    match fmt {
        Format::Gray8 => {
            let px: Vec<u8> = img.iter().map(|&v| q8(v)).collect();
            enc.write_image(&px, w32, h32, ExtendedColorType::L8)
        }
        Format::Rgb8 => {
            // Gray with a faint warm tint, as scanned films sometimes are.
            let px: Vec<u8> = img
                .iter()
                .flat_map(|&v| [q8(v), q8(v * 0.98), q8(v * 0.94)])
                .collect();
            enc.write_image(&px, w32, h32, ExtendedColorType::Rgb8)
        }
        Format::Gray16 => {
            // The encoder takes native-endian samples (and writes PNG's big-endian itself).
            let px: Vec<u8> = img
                .iter()
                .flat_map(|&v| ((v * 65535.0).round() as u16).to_ne_bytes())
                .collect();
            enc.write_image(&px, w32, h32, ExtendedColorType::L16)
        }
    }
    .with_context(|| format!("cannot encode {}", path.display()))?;
    buf.flush()
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Splits `n` into parts proportional to `weights`, by largest remainder.
fn apportion(n: usize, weights: &[usize]) -> Vec<usize> {
    let total: usize = weights.iter().sum();
    let exact: Vec<f64> = weights
        .iter()
        .map(|&w| n as f64 * w as f64 / total as f64)
        .collect();
    let mut out: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| {
        (exact[b] - exact[b].floor())
            .total_cmp(&(exact[a] - exact[a].floor()))
            .then(a.cmp(&b))
    });
    for &i in order.iter().take(n - out.iter().sum::<usize>()) {
        out[i] += 1;
    }
    out
}

/// The views of one study labelled `label`: 1-5 of them, each its size, format and seed; of an
/// abnormal study, each shows the finding with probability 0.9, and at least one does.
fn plan_views(label: u8, rng: &mut Rng) -> Vec<ViewSpec> {
    let u = rng.uniform();
    let n_views = [0.1, 0.45, 0.8, 0.95, 1.0]
        .iter()
        .position(|&p| u < p)
        .unwrap_or(4)
        + 1;
    let mut views: Vec<ViewSpec> = (0..n_views)
        .map(|_| {
            let long = rng.range(260.0, 512.0);
            let short = (long * rng.range(0.55, 1.0)).max(150.0);
            let portrait = rng.bernoulli(0.75);
            let (w, h) = if portrait {
                (short, long)
            } else {
                (long, short)
            };
            let f = rng.uniform();
            ViewSpec {
                w: w as usize,
                h: h as usize,
                shows: label == 1 && rng.bernoulli(0.9),
                format: if f < 0.85 {
                    Format::Gray8
                } else if f < 0.93 {
                    Format::Rgb8
                } else {
                    Format::Gray16
                },
                seed: rng.next_u64(),
            }
        })
        .collect();
    if label == 1 && !views.iter().any(|v| v.shows) {
        let k = rng.below(views.len() as u64) as usize;
        views[k].shows = true;
    }
    views
}

/// Plans every study and view (cheap, sequential, deterministic).
fn plan(cfg: &SynthConfig) -> Vec<StudySpec> {
    let n_valid = ((cfg.studies as f64 * cfg.valid_fraction).round() as usize).min(cfg.studies);
    let mut out = Vec::new();
    let mut patient = 0usize;
    for (split, n) in [
        (Split::Train, cfg.studies - n_valid),
        (Split::Valid, n_valid),
    ] {
        let col = if split == Split::Train { 0 } else { 2 };
        let per_type = apportion(n, &TABLE1.map(|(_, c)| c[col] + c[col + 1]));
        for (ti, &(ty, c)) in TABLE1.iter().enumerate() {
            let count = per_type[ti];
            let mut rng = Rng::derive(cfg.seed, (split as u64) << 8 | ti as u64);
            let abnormal =
                (count as f64 * c[col + 1] as f64 / (c[col] + c[col + 1]) as f64).round() as usize;
            let mut labels: Vec<u8> = (0..count).map(|i| (i < abnormal) as u8).collect();
            rng.shuffle(&mut labels);
            let mut i = 0;
            while i < count {
                patient += 1;
                let u = rng.uniform();
                let k = if u < 0.7 {
                    1
                } else if u < 0.92 {
                    2
                } else {
                    3
                };
                let bones = anatomy(ty, &mut rng);
                for number in 1..=k.min(count - i) {
                    let label = labels[i];
                    i += 1;
                    let finding = (label == 1).then(|| pick_finding(ty, &bones, &mut rng));
                    let views = plan_views(label, &mut rng);
                    out.push(StudySpec {
                        split,
                        ty,
                        patient,
                        number,
                        label,
                        bones: bones.clone(),
                        finding,
                        views,
                    });
                }
            }
        }
    }
    out
}

/// Writes the dataset under `out` (`out/MURA-v1.1/...`), replacing an earlier synthetic set
/// there (a folder marked as one, see `disk::owned`) in one step: the set is written into a new
/// folder beside `out`, which then takes its place by one rename.
pub fn synth(out: &Path, cfg: &SynthConfig, progress: Progress) -> Result<SynthSummary> {
    let t0 = std::time::Instant::now();
    // (MURA itself has 14,656 studies; far more is a typo that would fill the disk.)
    crate::bounds::STUDIES.check("--studies", cfg.studies)?;
    if !(0.0..=1.0).contains(&cfg.valid_fraction) {
        bail!("--valid-fraction must be between 0 and 1");
    }
    owned::check_replace(out, Made::Synth, None)?;
    let studies = plan(cfg);
    owned::replace_folder(out, Made::Synth, None, |root| {
        write_all(root, &studies, progress)
    })?;
    Ok(SynthSummary {
        studies: studies.len(),
        images: studies.iter().map(|s| s.views.len()).sum(),
        abnormal_studies: studies.iter().filter(|s| s.label == 1).count(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn write_all(root: &Path, studies: &[StudySpec], progress: Progress) -> Result<()> {
    let mura_dir = root.join(PREFIX);
    for s in studies {
        let dir = root.join(s.dir());
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let jobs: Vec<(usize, usize)> = studies
        .iter()
        .enumerate()
        .flat_map(|(i, s)| (0..s.views.len()).map(move |v| (i, v)))
        .collect();
    let style = indicatif::ProgressStyle::with_template(
        "synth {bar:40} {pos}/{len} images {per_sec} eta {eta}",
    )
    .expect("valid template");
    let bar = progress.bar(jobs.len() as u64, style);
    jobs.par_iter().try_for_each(|&(i, v)| {
        let (s, view) = (&studies[i], &studies[i].views[v]);
        let img = render(s, view);
        write_png(
            &root.join(format!("{}image{}.png", s.dir(), v + 1)),
            &img,
            view.w,
            view.h,
            view.format,
        )?;
        bar.inc(1);
        anyhow::Ok(())
    })?;
    bar.finish_and_clear();
    // fsync after all writes, so the file system can flush them together.
    jobs.par_iter().try_for_each(|&(i, v)| {
        let p = root.join(format!("{}image{}.png", studies[i].dir(), v + 1));
        std::fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot sync {}", p.display()))
    })?;
    for split in [Split::Train, Split::Valid] {
        let mut paths = String::new();
        let mut labels = String::new();
        for s in studies.iter().filter(|s| s.split == split) {
            for v in 0..s.views.len() {
                paths.push_str(&format!("{}image{}.png\n", s.dir(), v + 1));
            }
            labels.push_str(&format!("{},{}\n", s.dir(), s.label));
        }
        for (name, text) in [("image_paths", paths), ("labeled_studies", labels)] {
            let p = mura_dir.join(format!("{}_{name}.csv", split.name()));
            let mut f = std::fs::File::create(&p)
                .with_context(|| format!("cannot create {}", p.display()))?;
            f.write_all(text.as_bytes())
                .and_then(|_| f.sync_all())
                .with_context(|| format!("cannot write {}", p.display()))?;
        }
    }
    Ok(())
}
