use clap::{Parser, Subcommand};
use mura::cli;

/// mura: train DenseNet on MURA radiographs to flag abnormal studies.
#[derive(Parser)]
#[command(name = "mura", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Synthesise, prep, train, evaluate and plot a small MURA-like run end to end
    Demo(cli::demo::Args),
    /// Write a synthetic MURA-v1.1-shaped dataset
    Synth(cli::synth::Args),
    /// Decode a MURA tree once into a memory-mapped uint8 store
    Prep(cli::prep::Args),
    /// Summarise and verify a prepped store
    Inspect(cli::inspect::Args),
    /// Train a DenseNet on a prepped store
    Train(cli::train::Args),
    /// Evaluate checkpoints (ensembled) on a split of a store
    Eval(cli::eval::Args),
    /// Score a predictions CSV against labelled studies, as MURA's official scorer does
    Score(cli::score::Args),
    /// Predict studies (folders of PNG views, or single PNGs), optionally with CAM heatmaps
    Predict(cli::predict::Args),
    /// Write a model checkpoint as an ONNX file (onnxruntime, TensorRT, Triton, OpenVINO)
    Export(cli::export::Args),
    /// Plot a training run's curves and ROC
    Report(cli::report::Args),
    /// Time forward and training steps
    Bench(cli::bench::Args),
    /// Devices, and how the GPU kernels were built
    Info(cli::info::Args),
}

fn main() {
    // A bug is one line too, never a trace: what panicked and where.
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        mura::note!("error: internal error (a bug in mura, please report it): {what}{at}");
    }));
    mura::disk::mapped::install_fault_handler();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || matches!(
                    e.kind(),
                    ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                )
            {
                e.exit();
            }
            // One line, not clap's usage block.
            let msg = e.render().to_string();
            let first = msg.lines().next().unwrap_or("error: bad arguments");
            mura::note!("{first} (try --help)");
            std::process::exit(2);
        }
    };
    let result = match cli.command {
        Command::Demo(a) => cli::demo::run(a),
        Command::Synth(a) => cli::synth::run(a),
        Command::Prep(a) => cli::prep::run(a),
        Command::Inspect(a) => cli::inspect::run(a),
        Command::Train(a) => cli::train::run(a),
        Command::Eval(a) => cli::eval::run(a),
        Command::Score(a) => cli::score::run(a),
        Command::Predict(a) => cli::predict::run(a),
        Command::Export(a) => cli::export::run(a),
        Command::Report(a) => cli::report::run(a),
        Command::Bench(a) => cli::bench::run(a),
        Command::Info(a) => cli::info::run(a),
    };
    if let Err(e) = result {
        if let Some(stop) = e.downcast_ref::<mura::out::Interrupted>() {
            mura::note!("{stop}");
            std::process::exit(mura::out::INTERRUPTED_STATUS);
        }
        // One clear line: the whole context chain, no backtrace.
        mura::out::error_line(&e);
        std::process::exit(1);
    }
}
