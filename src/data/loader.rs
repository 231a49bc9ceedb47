//! Study-level batches from a store: B studies with all their views, reshuffled each epoch,
//! augmented (flip, rotation, bilinear resample) and normalised on worker threads. An evaluation
//! batch (no augmentation) holds at most [`EVAL_BATCH_PIXELS`] input pixels: a study with more
//! views than that is split over batches of its own, so no study makes evaluation allocate
//! without bound (training takes a study's views at once: its loss and the batch statistics
//! need them together).
//!
//! Determinism: the study order of epoch `e` and the augmentation of store image `i` in epoch
//! `e` depend only on (seed, e, i), never on the worker count or on timing.

use super::store::Store;
use super::{Split, StudyType};
use crate::ops::augment::{self, AugParams};
use crate::rng::Rng;
use anyhow::{bail, Result};
use std::ops::Range;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Training augmentation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Augment {
    /// Random lateral inversion (horizontal flip) with probability 1/2.
    pub flip: bool,
    /// Rotation drawn uniformly from [-max, max] degrees.
    pub max_rotation_deg: f32,
}

/// A training recipe's input size and augmentation (`--preset`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// The reference blog post: 224², flips, rotations within ±10°.
    Blog,
    /// The MURA paper: 320², lateral inversions, rotations within ±30°.
    Paper,
}

impl Preset {
    /// The network input's side.
    pub fn image_size(self) -> usize {
        match self {
            Preset::Blog => 224,
            Preset::Paper => 320,
        }
    }
    /// The training augmentation.
    pub fn augment(self) -> Augment {
        let max_rotation_deg = match self {
            Preset::Blog => 10.0,
            Preset::Paper => 30.0,
        };
        Augment {
            flip: true,
            max_rotation_deg,
        }
    }
}

impl std::str::FromStr for Preset {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "blog" => Ok(Preset::Blog),
            "paper" => Ok(Preset::Paper),
            _ => bail!("unknown preset '{s}': use blog or paper"),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct LoaderConfig {
    pub batch_studies: usize,
    /// Keep at most this many views (the first ones) of each study.
    pub max_views: Option<usize>,
    /// Side of the network input.
    pub image_size: usize,
    /// None: evaluation (resize and normalise only).
    pub augment: Option<Augment>,
    pub seed: u64,
    pub shuffle: bool,
    /// Worker threads building batches; 0 builds them on the calling thread.
    pub workers: usize,
    /// Batches each worker may have ready ahead of the consumer.
    pub prefetch: usize,
}

impl LoaderConfig {
    /// The blog post's training setup ([`Preset::Blog`]), batch 8.
    pub fn blog() -> Self {
        LoaderConfig {
            batch_studies: 8,
            max_views: None,
            image_size: Preset::Blog.image_size(),
            augment: Some(Preset::Blog.augment()),
            seed: 0,
            shuffle: true,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            prefetch: 4,
        }
    }

    /// The paper's training setup ([`Preset::Paper`]).
    pub fn paper() -> Self {
        LoaderConfig {
            image_size: Preset::Paper.image_size(),
            augment: Some(Preset::Paper.augment()),
            ..Self::blog()
        }
    }

    /// This config for evaluation: no augmentation, no shuffling.
    pub fn for_eval(&self) -> Self {
        LoaderConfig {
            augment: None,
            shuffle: false,
            ..self.clone()
        }
    }
}

/// The augmentation of store image `image` in `epoch`: a pure function of its arguments.
pub fn aug_params(aug: &Augment, seed: u64, epoch: u64, image: usize) -> AugParams {
    let base = Rng::derive(seed, epoch.wrapping_mul(2).wrapping_add(1)).next_u64();
    let mut r = Rng::derive(base, image as u64);
    let flip = r.bernoulli(0.5) && aug.flip;
    let angle_deg = r.range(-aug.max_rotation_deg as f64, aug.max_rotation_deg as f64) as f32;
    AugParams { flip, angle_deg }
}

/// The most input pixels of an evaluation batch: 64 images of 224².
pub const EVAL_BATCH_PIXELS: usize = 64 * 224 * 224;

/// Of the store study `study`, the views (store image indices) `views` that a batch holds.
#[derive(Clone, Debug, PartialEq)]
struct Part {
    study: usize,
    views: Range<usize>,
}

/// B studies with all their (at most `max_views`) views, or one part of a study split over
/// evaluation batches.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// images: [n_images, size, size, 3] f32, NHWC, normalised (empty in a raw batch)
    pub images: Vec<f32>,
    /// Raw batches (for a model that augments on its device, see `Loader::epoch_raw`): the store
    /// images as they are, [n_images, src_size, src_size] u8, to be augmented by `aug` into
    /// `size`² inputs.
    pub raw: Option<Vec<u8>>,
    /// The store's image side.
    pub src_size: usize,
    pub n_images: usize,
    /// Side of the network input.
    pub size: usize,
    /// Per image: index into this batch's `studies`.
    pub view_study: Vec<usize>,
    /// Store study indices.
    pub studies: Vec<usize>,
    /// Per study: 1.0 abnormal, 0.0 normal, NaN unlabeled.
    pub labels: Vec<f32>,
    /// Per study.
    pub types: Vec<StudyType>,
    /// Per image: the store image index and how it was augmented.
    pub image_ids: Vec<usize>,
    pub aug: Vec<AugParams>,
    /// Whether the batch holds its studies with all their views (false: it holds one part of a
    /// study whose views fill more than one evaluation batch; its parts come one after another).
    pub whole: bool,
}

pub struct Loader {
    store: Arc<Store>,
    cfg: LoaderConfig,
    selected: Vec<usize>,
}

impl Loader {
    /// Studies of `split` whose type is in `study_types`.
    pub fn new(
        store: Arc<Store>,
        split: Split,
        study_types: &[StudyType],
        cfg: LoaderConfig,
    ) -> Result<Loader> {
        if cfg.batch_studies == 0 || cfg.image_size == 0 || cfg.max_views == Some(0) {
            bail!("loader: batch size, image size and max views must be positive");
        }
        let selected: Vec<usize> = (0..store.studies.len())
            .filter(|&i| {
                store.studies[i].split == split
                    && study_types.contains(&store.studies[i].study_type)
            })
            .collect();
        if selected.is_empty() {
            let names: Vec<&str> = study_types.iter().map(|t| t.name()).collect();
            bail!(
                "the store at {} has no {split} studies of type {}",
                store.dir.display(),
                names.join(",")
            );
        }
        Ok(Loader {
            store,
            cfg,
            selected,
        })
    }

    /// Store indices of the studies this loader serves, in store order.
    pub fn studies(&self) -> &[usize] {
        &self.selected
    }

    pub fn n_batches(&self) -> usize {
        self.plan(&self.selected).len()
    }

    /// Images per epoch (after `max_views`).
    pub fn n_images(&self) -> usize {
        self.selected.iter().map(|&s| self.views(s)).sum()
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// The views of the store study `study` this loader serves (after `max_views`).
    pub fn views(&self, study: usize) -> usize {
        views(&self.store, &self.cfg, study)
    }

    /// The batches of the studies `order`: `batch_studies` studies each, or fewer where the next
    /// study would take an evaluation batch past [`EVAL_BATCH_PIXELS`]; a study with more views
    /// than one holds goes in parts, each in a batch of its own.
    fn plan(&self, order: &[usize]) -> Vec<Vec<Part>> {
        let side = self.cfg.image_size;
        let cap = match self.cfg.augment {
            Some(_) => usize::MAX,
            None => (EVAL_BATCH_PIXELS / (side * side)).max(1),
        };
        let (mut plan, mut batch, mut images) = (Vec::new(), Vec::new(), 0usize);
        for &study in order {
            let first = self.store.studies[study].first_image;
            let n = self.views(study);
            let full = batch.len() == self.cfg.batch_studies || images.saturating_add(n) > cap;
            if full && !batch.is_empty() {
                plan.push(std::mem::take(&mut batch));
                images = 0;
            }
            if n > cap {
                for at in (0..n).step_by(cap) {
                    let views = first + at..first + n.min(at + cap);
                    plan.push(vec![Part { study, views }]);
                }
                continue;
            }
            batch.push(Part {
                study,
                views: first..first + n,
            });
            images += n;
        }
        if !batch.is_empty() {
            plan.push(batch);
        }
        plan
    }

    /// The batches of one epoch, in order, built ahead on worker threads.
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        self.epoch_as(epoch, Carry::Inputs)
    }

    /// The batches of `epoch` as [`Loader::epoch`] gives them, but carrying the store's u8 images
    /// and their augmentation parameters instead of f32 inputs (built by a model on its device).
    pub fn epoch_raw(&self, epoch: u64) -> EpochIter {
        self.epoch_as(epoch, Carry::Raw)
    }

    fn epoch_as(&self, epoch: u64, carry: Carry) -> EpochIter {
        let mut order = self.selected.clone();
        if self.cfg.shuffle {
            Rng::derive(self.cfg.seed, epoch.wrapping_mul(2)).shuffle(&mut order);
        }
        let plan = Arc::new(self.plan(&order));
        let mut it = EpochIter {
            plan: plan.clone(),
            next: 0,
            rx: Vec::new(),
            handles: Vec::new(),
            local: None,
        };
        if self.cfg.workers == 0 {
            it.local = Some((self.store.clone(), self.cfg.clone(), epoch, carry));
            return it;
        }
        for w in 0..self.cfg.workers.min(plan.len().max(1)) {
            let (tx, rx) = sync_channel(self.cfg.prefetch.max(1));
            let (store, cfg, plan) = (self.store.clone(), self.cfg.clone(), plan.clone());
            let nw = self.cfg.workers.min(plan.len().max(1));
            it.handles.push(std::thread::spawn(move || {
                for b in (w..plan.len()).step_by(nw) {
                    if tx
                        .send(build(&store, &cfg, epoch, &plan[b], carry))
                        .is_err()
                    {
                        return; // the consumer stopped early
                    }
                }
            }));
            it.rx.push(rx);
        }
        it
    }
}

/// The views of the store study `study` a loader of `cfg` serves (after `max_views`).
fn views(store: &Store, cfg: &LoaderConfig, study: usize) -> usize {
    let n = store.studies[study].n_views;
    cfg.max_views.map_or(n, |m| n.min(m))
}

/// Builds one batch of the given store studies, each with all its views.
pub fn build_batch(store: &Store, cfg: &LoaderConfig, epoch: u64, studies: &[usize]) -> Batch {
    let parts: Vec<Part> = studies
        .iter()
        .map(|&study| {
            let first = store.studies[study].first_image;
            Part {
                study,
                views: first..first + views(store, cfg, study),
            }
        })
        .collect();
    build(store, cfg, epoch, &parts, Carry::Inputs)
}

/// What a batch carries: f32 inputs augmented here, or the store's u8 images as they are (for a
/// model that augments on its device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Carry {
    Inputs,
    Raw,
}

/// One batch, carrying what `carry` says.
fn build(store: &Store, cfg: &LoaderConfig, epoch: u64, parts: &[Part], carry: Carry) -> Batch {
    let s = cfg.image_size;
    let mut image_ids = Vec::new();
    let mut view_study = Vec::new();
    for (k, part) in parts.iter().enumerate() {
        image_ids.extend(part.views.clone());
        view_study.extend(std::iter::repeat_n(k, part.views.len()));
    }
    let whole = parts
        .iter()
        .all(|p| p.views.len() == views(store, cfg, p.study));
    let studies: Vec<usize> = parts.iter().map(|p| p.study).collect();
    let aug: Vec<AugParams> = image_ids
        .iter()
        .map(|&i| {
            cfg.augment
                .as_ref()
                .map_or(AugParams::IDENTITY, |a| aug_params(a, cfg.seed, epoch, i))
        })
        .collect();
    let (images, raw) = if carry == Carry::Raw {
        let mut raw = Vec::with_capacity(image_ids.len() * store.size * store.size);
        for &i in &image_ids {
            raw.extend_from_slice(store.image(i));
        }
        (Vec::new(), Some(raw))
    } else {
        let mut images = vec![0f32; image_ids.len() * s * s * 3];
        for ((out, &i), &p) in images.chunks_exact_mut(s * s * 3).zip(&image_ids).zip(&aug) {
            augment::image(store.image(i), store.size, p, s, out);
        }
        (images, None)
    };
    Batch {
        images,
        raw,
        src_size: store.size,
        n_images: image_ids.len(),
        size: s,
        view_study,
        labels: studies
            .iter()
            .map(|&i| store.studies[i].label.map_or(f32::NAN, f32::from))
            .collect(),
        types: studies
            .iter()
            .map(|&i| store.studies[i].study_type)
            .collect(),
        image_ids,
        aug,
        studies,
        whole,
    }
}

/// One epoch's batches, in plan order whatever the number of workers.
pub struct EpochIter {
    plan: Arc<Vec<Vec<Part>>>,
    next: usize,
    rx: Vec<Receiver<Batch>>,
    handles: Vec<JoinHandle<()>>,
    /// Set when batches are built on the calling thread (workers = 0): store, config, epoch, and
    /// what the batches carry.
    local: Option<(Arc<Store>, LoaderConfig, u64, Carry)>,
}

impl Iterator for EpochIter {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.plan.len() {
            return None;
        }
        let b = self.next;
        self.next += 1;
        match &self.local {
            Some((store, cfg, epoch, carry)) => {
                Some(build(store, cfg, *epoch, &self.plan[b], *carry))
            }
            None => {
                let rx = &self.rx[b % self.rx.len()];
                Some(rx.recv().expect("loader worker thread died"))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.plan.len() - self.next;
        (left, Some(left))
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.rx.clear(); // wakes any worker blocked on a full channel
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
