//! The training loop: Adam on weighted BCE, validation after each epoch, ReduceLROnPlateau on the
//! validation loss, best-by-validation-loss and last checkpoints, resumable, Ctrl-C safe.
//!
//! A run folder holds:
//! - `config.json`      the run's settings (what `--resume` continues with)
//! - `best.safetensors` the model with the lowest validation loss (torchvision names)
//! - `last.safetensors` the model after the last saved step (torchvision names), and the file its
//!   metadata names, `last.optim-<N>.safetensors`: Adam's moments and the run state (epoch, step,
//!   optimiser scalars, scheduler, store identity), committed with the model by one rename (see
//!   `checkpoint`), so a kill at any moment leaves a run that resumes
//! - `metrics.jsonl`    one line per finished epoch; `val_predictions.csv` the best model's validation predictions
//!
//! A `train` holds a lock on the run folder, so a second one into the same folder is refused.

use crate::backend;
use crate::checkpoint::{self, PartialEpoch, RunState};
use crate::data::loader::{Augment, Batch, Loader, LoaderConfig};
use crate::data::store::Store;
use crate::data::{Split, StudyType};
use crate::device::Device;
use crate::disk;
use crate::disk::owned::{self, Made};
use crate::eval::{predict_split, StudyPrediction};
use crate::loss::{batch_loss, LossLevel};
use crate::net::Net;
use crate::ops::Mode;
use crate::optim::{Adam, ReduceLrOnPlateau};
use crate::out::Progress;
use crate::precision::Precision;
use crate::spec::DenseNetSpec;
use crate::weights;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainConfig {
    pub store: PathBuf,
    pub out: PathBuf,
    pub spec: DenseNetSpec,
    pub init: Init,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub patience: usize,
    pub loss: LossLevel,
    pub study_types: Vec<StudyType>,
    pub image_size: usize,
    pub max_rotation_deg: f32,
    pub max_views: Option<usize>,
    pub seed: u64,
    /// Resolved (`auto`) when the run starts or resumes.
    pub device: Device,
    pub precision: Precision,
    pub workers: usize,
    pub max_batches: Option<usize>,
}

/// Where training starts (`--init`): `random` (torchvision's initialisation from the seed),
/// `imagenet:FILE` (torchvision's ImageNet weights, `.pth` or `.safetensors`, with a fresh
/// single-logit head), or a mura checkpoint to fine-tune. Stored in a run's config.json as
/// that string.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Init {
    Random,
    ImageNet(PathBuf),
    Checkpoint(PathBuf),
}

impl std::str::FromStr for Init {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Init> {
        Ok(match s {
            "random" => Init::Random,
            "" => bail!("--init is empty: use random, imagenet:FILE or a checkpoint"),
            _ => match s.strip_prefix("imagenet:") {
                Some("") => bail!("--init imagenet: names no file"),
                Some(file) => Init::ImageNet(file.into()),
                None => Init::Checkpoint(s.into()),
            },
        })
    }
}

impl std::fmt::Display for Init {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Init::Random => f.write_str("random"),
            Init::ImageNet(p) => write!(f, "imagenet:{}", p.display()),
            Init::Checkpoint(p) => write!(f, "{}", p.display()),
        }
    }
}

impl From<Init> for String {
    fn from(i: Init) -> String {
        i.to_string()
    }
}

impl TryFrom<String> for Init {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<Init> {
        s.parse()
    }
}

impl TrainConfig {
    /// Refuses settings that cannot train, before anything is written: every count within the
    /// bounds the command line states (`bounds`), whether it came from there or a config.json.
    pub fn validate(&self) -> Result<()> {
        use crate::bounds::{BATCH, EPOCHS, MAX_BATCHES, MAX_VIEWS, PATIENCE, SIDE, WORKERS};
        EPOCHS.check("--epochs", self.epochs)?;
        BATCH.check("--batch", self.batch)?;
        PATIENCE.check("--patience", self.patience)?;
        WORKERS.check("--workers", self.workers)?;
        SIDE.check("--image-size", self.image_size)?;
        for (name, value, count) in [
            ("--max-views", self.max_views, MAX_VIEWS),
            ("--max-batches", self.max_batches, MAX_BATCHES),
        ] {
            if let Some(v) = value {
                count.check(name, v)?;
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr must be a positive number, got {}", self.lr);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!(
                "--weight-decay must be zero or positive, got {}",
                self.weight_decay
            );
        }
        if !(0.0..=180.0).contains(&self.max_rotation_deg) {
            bail!("a rotation of at most {} degrees", self.max_rotation_deg);
        }
        if self.study_types.is_empty() {
            bail!("no study type to train on");
        }
        Ok(())
    }
}

/// One epoch's line in `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train_loss: f64,
    pub val_loss: f64,
    pub lr: f64,
    pub kappa: f64,
    pub kappa_by_type: std::collections::BTreeMap<crate::data::StudyType, f64>,
    pub accuracy: f64,
    pub auroc: f64,
    pub images_per_s: f64,
    pub seconds: f64,
}

/// What a finished (or stopped) run reports.
pub struct TrainOutcome {
    pub epochs: Vec<EpochMetrics>,
}

static STOP: AtomicBool = AtomicBool::new(false);

fn install_ctrlc() {
    // A second registration fails harmlessly (e.g. in tests running several trainings).
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        crate::note!("");
        crate::note!("stopping after this step (Ctrl-C again to abort without saving)");
    });
}

/// The run folder's files replaced in one rename (besides the checkpoint's, see `checkpoint`),
/// whose temporary files a kill may leave.
const REPLACED: [&str; 4] = [
    "config.json",
    "best.safetensors",
    "val_predictions.csv",
    "metrics.jsonl",
];

/// Whether a run folder holds a checkpoint (a run that trained at least one step).
fn has_checkpoint(dir: &Path) -> bool {
    ["last.safetensors", "best.safetensors"]
        .iter()
        .any(|f| dir.join(f).exists())
}

pub fn train(mut cfg: TrainConfig, progress: Progress) -> Result<TrainOutcome> {
    cfg.validate()?;
    // Only a new or empty folder, or a run of mura's that failed before its first step, is a
    // fresh run's (see `disk::owned`); what it needs is checked before the folder is touched.
    owned::check(&cfg.out, Made::Run, None)?;
    let store = Arc::new(Store::open(&cfg.store)?);
    // Recorded whole, so that `--resume` finds it from any folder.
    cfg.store = std::path::absolute(&cfg.store).unwrap_or(cfg.store);
    let mut model = initial_model(&cfg)?;
    let (adam, state) = fresh(&cfg, &store)?;
    owned::claim(&cfg.out, Made::Run, None)?;
    let _lock = disk::lock_folder(&cfg.out, "mura train")?;
    disk::remove_temporaries(&cfg.out, &REPLACED);
    // A run without a checkpoint failed before its first step: it starts afresh.
    if has_checkpoint(&cfg.out) {
        bail!(
            "{} already holds a run: use `mura train --resume {}` or another --out",
            cfg.out.display(),
            cfg.out.display()
        );
    }
    checkpoint::write_json_atomic(&cfg.out.join("config.json"), &cfg)?;
    let _ = std::fs::remove_file(cfg.out.join("metrics.jsonl"));
    run_epochs(cfg, store, model.as_mut(), adam, state, progress)
}

/// The optimiser and run state of a run that has not trained a step.
fn fresh(cfg: &TrainConfig, store: &Store) -> Result<(Adam, RunState)> {
    let adam = Adam::new(cfg.spec.num_params(), cfg.lr, cfg.weight_decay);
    let patience = u32::try_from(cfg.patience).context("--patience")?;
    let state = RunState {
        epochs_done: 0,
        batches_done: 0,
        best_val_loss: None,
        adam_step: 0,
        lr: cfg.lr,
        scheduler: ReduceLrOnPlateau {
            patience,
            ..Default::default()
        },
        store_id: store.id(),
        partial: PartialEpoch::default(),
        epoch_metrics: None,
    };
    Ok((adam, state))
}

/// What `mura train --resume` may change in a run: what a run is trained to (its epochs), and
/// where and how fast, which does not change what it computes (the store it reads, checked by
/// its identity; the device; the loader threads). A run moved to another machine resumes there.
#[derive(Clone, Debug, Default)]
pub struct Resume {
    /// The new total of epochs.
    pub epochs: Option<usize>,
    /// The store, at another path (the same store: its identity is checked).
    pub store: Option<PathBuf>,
    pub device: Option<Device>,
    pub workers: Option<usize>,
}

/// Continue the run in `dir`, to `with.epochs` in all when given (else the run's own total), from
/// its last checkpoint, or from the beginning when a kill came before the first one.
pub fn resume(dir: &Path, with: Resume, progress: Progress) -> Result<TrainOutcome> {
    let epochs = with.epochs;
    let mut cfg: TrainConfig = checkpoint::read_json(&dir.join("config.json"))
        .with_context(|| format!("{} is not a mura run folder", dir.display()))?;
    cfg.validate()
        .with_context(|| format!("{}: its config.json", dir.display()))?;
    cfg.out = dir.to_path_buf();
    if epochs == Some(0) {
        bail!("--epochs must be at least 1");
    }
    let recorded = (cfg.store.clone(), cfg.device, cfg.workers);
    if let Some(store) = with.store {
        cfg.store = std::path::absolute(&store).unwrap_or(store);
    }
    cfg.device = with.device.unwrap_or(cfg.device);
    cfg.workers = with.workers.unwrap_or(cfg.workers);
    cfg.validate()?;
    // A run of an earlier mura has no marker: its config.json, just read, is the proof.
    owned::claim(dir, Made::Run, Some(&|_: &Path| true))?;
    let _lock = disk::lock_folder(dir, "mura train")?;
    disk::remove_temporaries(dir, &REPLACED);
    let store = Arc::new(Store::open(&cfg.store)?);
    let (weights, adam, state) = match checkpoint::load_last(dir, &cfg.spec, cfg.weight_decay)? {
        Some(ck) => (Some(ck.weights), ck.adam, ck.state),
        None => {
            check_nothing_trained(dir)?;
            crate::note!(
                "{} has no checkpoint yet: training from the beginning",
                dir.display()
            );
            let (adam, state) = fresh(&cfg, &store)?;
            (None, adam, state)
        }
    };
    let mut state = state;
    if store.is_earlier_id(&state.store_id) {
        // An earlier mura's run: its store identity covers the pixels only.
        crate::note!(
            "note: {} was saved by an earlier mura, which identified its store by the pixels \
             alone: they match {}, its labels cannot be checked; from this resume on they are",
            dir.display(),
            cfg.store.display()
        );
        state.store_id = store.id();
    }
    if state.store_id != store.id() {
        bail!(
            "store {} is not the one this run was trained on (store id {} vs {}: other \
             images, labels or studies)",
            cfg.store.display(),
            store.id(),
            state.store_id
        );
    }
    sync_metrics(&dir.join("metrics.jsonl"), &state)?;
    if recorded != (cfg.store.clone(), cfg.device, cfg.workers) {
        checkpoint::write_json_atomic(&dir.join("config.json"), &cfg)?;
    }
    if let Some(e) = epochs.filter(|&e| e != cfg.epochs) {
        if e < state.epochs_done {
            bail!(
                "{} has already trained {} epochs: --epochs {e} is fewer",
                dir.display(),
                state.epochs_done
            );
        }
        cfg.epochs = e;
        checkpoint::write_json_atomic(&dir.join("config.json"), &cfg)?;
    }
    if state.epochs_done >= cfg.epochs {
        crate::note!(
            "{} has finished its {} epochs: pass --epochs N (more than {}) to train on",
            dir.display(),
            cfg.epochs,
            state.epochs_done
        );
        return Ok(TrainOutcome { epochs: Vec::new() });
    }
    let mut model = match weights {
        None => initial_model(&cfg)?,
        Some(w) => backend::build(
            cfg.device,
            cfg.precision,
            cfg.spec.clone(),
            Some(&w),
            cfg.seed,
        )?,
    };
    model.import_adam(&adam)?;
    run_epochs(cfg, store, model.as_mut(), adam, state, progress)
}

/// The epoch a line of `metrics.jsonl` reports, if it is a whole line of mura's.
fn line_epoch(line: &str) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v.get("epoch")?.as_u64()?.try_into().ok()
}

fn read_metrics(path: &Path) -> Result<String> {
    match path.symlink_metadata() {
        Err(_) => Ok(String::new()),
        Ok(_) => disk::read_regular_string(path, disk::MAX_TEXT_BYTES),
    }
}

/// A run without a last checkpoint starts again only if no epoch of it was committed (its
/// metrics lines are appended after the commit), so that a deleted `last.safetensors` does
/// not make a resume write over a long run's best model and metrics.
fn check_nothing_trained(dir: &Path) -> Result<()> {
    let metrics = dir.join("metrics.jsonl");
    if let Some(e) = read_metrics(&metrics)?.lines().filter_map(line_epoch).max() {
        bail!(
            "{} has trained {e} epoch(s) (see metrics.jsonl) but has no {}: it cannot resume; \
             start a new run from its best model with `--init {}`",
            dir.display(),
            checkpoint::LAST_MODEL,
            dir.join("best.safetensors").display()
        );
    }
    Ok(())
}

/// Makes `metrics.jsonl` hold the lines of the epochs `state` has finished: lines of later
/// epochs (or torn ones) that an interrupted run wrote are dropped, and the last finished
/// epoch's line, which the checkpoint carries, is added when a kill came before its append.
fn sync_metrics(path: &Path, state: &RunState) -> Result<()> {
    let text = read_metrics(path)?;
    let mut kept = String::new();
    let mut has_last = false;
    for line in text.lines() {
        if let Some(e) = line_epoch(line).filter(|&e| e <= state.epochs_done) {
            has_last |= e == state.epochs_done;
            kept += line;
            kept.push('\n');
        }
    }
    if let Some(m) = state.epoch_metrics.as_ref().filter(|_| !has_last) {
        kept += &format!("{m}\n");
    }
    match kept == text {
        true => Ok(()),
        false => disk::write_atomic(path, kept.as_bytes()),
    }
}

fn initial_model(cfg: &TrainConfig) -> Result<Box<dyn Net>> {
    let sd = match &cfg.init {
        Init::Random => {
            return backend::build(cfg.device, cfg.precision, cfg.spec.clone(), None, cfg.seed)
        }
        // torchvision ImageNet weights: remap legacy keys, fresh single-logit head.
        Init::ImageNet(path) => {
            let sd = match path.extension().is_some_and(|e| e == "safetensors") {
                true => weights::load_safetensors(path)?.state_dict,
                false => weights::load_pth(path)?,
            };
            weights::import_torchvision(sd, &cfg.spec, cfg.seed)
        }
        // A mura checkpoint (fine-tuning goes on from its head).
        Init::Checkpoint(path) => checkpoint::load_model(path, Some(&cfg.spec)).map(|m| m.weights),
    }
    .with_context(|| format!("--init {}", cfg.init))?;
    backend::build(
        cfg.device,
        cfg.precision,
        cfg.spec.clone(),
        Some(&sd),
        cfg.seed,
    )
    .with_context(|| format!("--init {}", cfg.init))
}

fn loader(cfg: &TrainConfig, store: &Arc<Store>, split: Split) -> Result<Loader> {
    let train = split == Split::Train;
    Loader::new(
        store.clone(),
        split,
        &cfg.study_types,
        LoaderConfig {
            batch_studies: cfg.batch,
            max_views: cfg.max_views,
            image_size: cfg.image_size,
            augment: train.then_some(Augment {
                flip: true,
                max_rotation_deg: cfg.max_rotation_deg,
            }),
            seed: cfg.seed,
            shuffle: train,
            workers: cfg.workers,
            prefetch: 2,
        },
    )
}

fn run_epochs(
    cfg: TrainConfig,
    store: Arc<Store>,
    model: &mut dyn Net,
    adam: Adam,
    state: RunState,
    progress: Progress,
) -> Result<TrainOutcome> {
    install_ctrlc();
    STOP.store(false, Ordering::SeqCst);
    let train_loader = loader(&cfg, &store, Split::Train)?;
    let val_loader = loader(&cfg, &store, Split::Valid)?;
    for l in [&train_loader, &val_loader] {
        check_labelled(&store, l.studies())?;
    }
    let n_batches = epoch_batches(&cfg, &train_loader, &state)?;
    let mut run = Training {
        cfg: &cfg,
        store: &store,
        model,
        adam,
        state,
    };
    let mut outcome = TrainOutcome { epochs: Vec::new() };
    while run.state.epochs_done < cfg.epochs {
        let totals = run.train_epoch(&train_loader, n_batches, progress)?;
        let (m, improved) = finish_epoch(
            &cfg,
            &store,
            &val_loader,
            run.model,
            &mut run.adam,
            &mut run.state,
            totals,
        )?;
        if progress == Progress::Bars {
            crate::note!(
                "epoch {:>3}  train loss {:.4}  val loss {:.4}{}  kappa {:.3}  auroc {:.3}  lr {:.1e}  {:.1} img/s",
                m.epoch,
                m.train_loss,
                m.val_loss,
                if improved { "*" } else { " " },
                m.kappa,
                m.auroc,
                m.lr,
                m.images_per_s
            );
        }
        outcome.epochs.push(m);
    }
    Ok(outcome)
}

/// The batches an epoch trains (`--max-batches` caps the loader's); refused when there are
/// none, or when the checkpoint `state` is further into an epoch than that.
fn epoch_batches(cfg: &TrainConfig, train_loader: &Loader, state: &RunState) -> Result<usize> {
    let n_batches = train_loader
        .n_batches()
        .min(cfg.max_batches.unwrap_or(usize::MAX));
    if n_batches == 0 {
        bail!("the store has no training studies of the selected types");
    }
    if state.batches_done > n_batches {
        bail!(
            "{}: the last checkpoint is at batch {} of an epoch of {n_batches}",
            cfg.out.display(),
            state.batches_done
        );
    }
    Ok(n_batches)
}

/// A run in training: its settings and store, and the model, optimiser and run state that every
/// batch moves on.
struct Training<'a> {
    cfg: &'a TrainConfig,
    store: &'a Arc<Store>,
    model: &'a mut dyn Net,
    adam: Adam,
    state: RunState,
}

impl Training<'_> {
    /// Trains epoch `state.epochs_done` from batch `state.batches_done` (where a checkpoint left
    /// it) to `n_batches`; the epoch's totals. After a Ctrl-C it saves the step it stopped at
    /// and fails with [`crate::out::Interrupted`].
    fn train_epoch(
        &mut self,
        train_loader: &Loader,
        n_batches: usize,
        progress: Progress,
    ) -> Result<PartialEpoch> {
        let epoch = self.state.epochs_done;
        // After an interruption the epoch goes on from its saved totals.
        let mut tally = Tally::resume(std::mem::take(&mut self.state.partial));
        let bar = epoch_bar(progress, n_batches as u64, &format!("epoch {}", epoch + 1));
        bar.set_position(self.state.batches_done as u64);
        // A GPU model takes the store's u8 images and augments them on its device.
        let batches = match self.model.wants_raw_input() {
            true => train_loader.epoch_raw(epoch as u64),
            false => train_loader.epoch(epoch as u64),
        };
        let skip = self.state.batches_done;
        for (b, batch) in batches.enumerate().take(n_batches).skip(skip) {
            let loss = self.step(&batch, b)?;
            tally.add(loss, batch.n_images);
            self.state.batches_done = b + 1;
            bar.set_position(self.state.batches_done as u64);
            bar.set_message(tally.message());
            disk::failpoint::hit("train.step-done")?;
            if STOP.load(Ordering::SeqCst) {
                bar.abandon();
                self.save_stopped(&tally)?;
                return Err(crate::out::Interrupted(format!(
                    "interrupted: saved epoch {} batch {}; continue with `mura train --resume {}`",
                    epoch + 1,
                    self.state.batches_done,
                    self.cfg.out.display()
                ))
                .into());
            }
        }
        bar.finish_and_clear();
        Ok(tally.totals())
    }

    /// One training step on `batch`, the epoch's batch `b`: its loss. A loss that is not finite
    /// stops training before the step is taken.
    fn step(&mut self, batch: &Batch, b: usize) -> Result<f64> {
        self.model.zero_grad()?;
        let logits = crate::net::forward_batch(self.model, batch, Mode::Train)?;
        let (loss, dz) = batch_loss(self.store, batch, &logits, self.cfg.loss);
        if !loss.is_finite() {
            let kept = if has_checkpoint(&self.cfg.out) {
                format!(
                    "the last good checkpoint is kept in {}",
                    self.cfg.out.display()
                )
            } else {
                "no checkpoint had been saved yet".to_string()
            };
            bail!(
                "training loss became {loss} at epoch {} batch {}; stopped, {kept}",
                self.state.epochs_done + 1,
                b + 1
            );
        }
        self.model.backward(&dz)?;
        self.model.adam_step(&mut self.adam)?;
        Ok(loss)
    }

    /// Saves the last checkpoint mid-epoch, with `tally`, the epoch's totals so far, so that a
    /// resume goes on from the next batch.
    fn save_stopped(&mut self, tally: &Tally) -> Result<()> {
        self.state.adam_step = self.adam.step;
        self.state.partial = tally.totals();
        self.model.export_adam(&mut self.adam)?;
        let input = input(self.cfg, self.store);
        checkpoint::save_last(&self.cfg.out, self.model, &self.adam, &self.state, input)
            .map_err(|e| stopped(e, &self.cfg.out))
    }
}

/// The running totals of the epoch in training: those it resumed from (zero for a new epoch)
/// and, added to them, those of the batches since.
struct Tally {
    resumed: PartialEpoch,
    loss_sum: f64,
    batches: usize,
    images: usize,
    t0: Instant,
}

impl Tally {
    fn resume(from: PartialEpoch) -> Tally {
        Tally {
            loss_sum: from.loss_sum,
            batches: from.batches,
            images: from.images,
            resumed: from,
            t0: Instant::now(),
        }
    }

    fn add(&mut self, loss: f64, images: usize) {
        self.loss_sum += loss;
        self.batches += 1;
        self.images += images;
    }

    /// The progress bar's message: the epoch's mean loss, and the speed since it (re)started.
    fn message(&self) -> String {
        format!(
            "loss {:.4}  {:.1} img/s",
            self.loss_sum / self.batches as f64,
            (self.images - self.resumed.images) as f64 / self.t0.elapsed().as_secs_f64()
        )
    }

    /// The epoch's totals so far, its seconds counted across interruptions.
    fn totals(&self) -> PartialEpoch {
        PartialEpoch {
            loss_sum: self.loss_sum,
            batches: self.batches,
            images: self.images,
            seconds: self.resumed.seconds + self.t0.elapsed().as_secs_f64(),
        }
    }
}

/// Refuses to train on `studies` (store indices) if one has no label: its loss would be NaN
/// (training) or left out unsaid (validation). The error names it, and what to do.
fn check_labelled(store: &Store, studies: &[usize]) -> Result<()> {
    let unlabelled: Vec<&str> = studies
        .iter()
        .map(|&i| &store.studies[i])
        .filter(|s| s.label.is_none())
        .map(|s| s.path.as_str())
        .collect();
    let Some(first) = unlabelled.first() else {
        return Ok(());
    };
    let split = store.studies[studies[0]].split;
    bail!(
        "{} of the store's {split} studies have no label, e.g. {first}: training needs every \
         one labelled: give it a row in {split}_labeled_studies.csv (or name its folder \
         studyN_positive or studyN_negative) and re-run `mura prep`",
        unlabelled.len()
    )
}

/// Validates the epoch just trained (`totals`: its training totals), steps the scheduler and
/// saves the epoch (see [`save_epoch`]); the epoch's metrics and whether the model improved.
fn finish_epoch(
    cfg: &TrainConfig,
    store: &Store,
    val_loader: &Loader,
    model: &mut dyn Net,
    adam: &mut Adam,
    state: &mut RunState,
    totals: PartialEpoch,
) -> Result<(EpochMetrics, bool)> {
    let t0 = Instant::now();
    let preds = predict_split(model, store, val_loader, cfg.loss)?;
    let table = preds.table();
    let lr = adam.lr;
    adam.lr = state.scheduler.step(preds.loss, adam.lr);
    let improved = state.best_val_loss.is_none_or(|b| preds.loss < b);
    let m = EpochMetrics {
        epoch: state.epochs_done + 1,
        train_loss: totals.loss_sum / totals.batches.max(1) as f64,
        val_loss: preds.loss,
        lr,
        kappa: table.overall.kappa,
        kappa_by_type: table.by_type.iter().map(|(&t, r)| (t, r.kappa)).collect(),
        accuracy: table.overall.accuracy,
        auroc: table.overall.auroc,
        images_per_s: totals.images as f64 / totals.seconds,
        seconds: totals.seconds + t0.elapsed().as_secs_f64(),
    };
    let best = improved.then_some(preds.studies.as_slice());
    save_epoch(cfg, store, model, adam, state, &m, best).map_err(|e| stopped(e, &cfg.out))?;
    Ok((m, improved))
}

/// Saves a finished epoch: the best model and its validation predictions when `best` holds
/// them, then the last checkpoint with the run state and `m` (the commit), then `m`'s line of
/// `metrics.jsonl`. A kill before the commit makes a resume redo the epoch, and write these
/// files again; one after it, restore the metrics line from the checkpoint.
fn save_epoch(
    cfg: &TrainConfig,
    store: &Store,
    model: &mut dyn Net,
    adam: &mut Adam,
    state: &mut RunState,
    m: &EpochMetrics,
    best: Option<&[StudyPrediction]>,
) -> Result<()> {
    if let Some(studies) = best {
        state.best_val_loss = Some(m.val_loss);
        let path = cfg.out.join("best.safetensors");
        checkpoint::save_model(&path, model, &store.id(), input(cfg, store))?;
        write_val_predictions(&cfg.out.join("val_predictions.csv"), studies)?;
    }
    state.epochs_done += 1;
    state.batches_done = 0;
    state.adam_step = adam.step;
    state.lr = adam.lr;
    state.epoch_metrics = Some(serde_json::to_value(m)?);
    model.export_adam(adam)?;
    checkpoint::save_last(&cfg.out, model, adam, state, input(cfg, store))?;
    append_metrics(&cfg.out.join("metrics.jsonl"), m)
}

/// How the run feeds its model, which its checkpoints record: the store's preprocessing and the
/// run's input side.
fn input(cfg: &TrainConfig, store: &Store) -> checkpoint::Input {
    checkpoint::Input {
        preprocess: crate::data::image::Preprocess::prep(store.size),
        image_size: cfg.image_size,
    }
}

/// A write of the run's files failed (a full disk, say): training stops, and the line says
/// what a resume does.
fn stopped(e: anyhow::Error, dir: &Path) -> anyhow::Error {
    let resume = match dir.join(checkpoint::LAST_MODEL).exists() {
        true => "continues from the last checkpoint",
        false => "starts the run again",
    };
    anyhow::anyhow!(
        "{e:#}; training stopped: `mura train --resume {}` {resume}",
        dir.display()
    )
}

/// An epoch's bar of `len` batches, headed `prefix`.
fn epoch_bar(progress: Progress, len: u64, prefix: &str) -> indicatif::ProgressBar {
    let style =
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}")
            .expect("static template")
            .progress_chars("=> ");
    let bar = progress.bar(len, style);
    bar.set_prefix(prefix.to_string());
    bar
}

fn append_metrics(path: &Path, m: &EpochMetrics) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(m)?)
        .and_then(|_| f.sync_data())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn write_val_predictions(path: &Path, studies: &[StudyPrediction]) -> Result<()> {
    let mut s = String::from("study,type,label,probability\n");
    for p in studies {
        s += &format!(
            "{},{},{},{}\n",
            p.path,
            p.study_type.name(),
            p.label.map_or(String::new(), |l| l.to_string()),
            p.probability
        );
    }
    crate::disk::write_atomic(path, s.as_bytes())
}
