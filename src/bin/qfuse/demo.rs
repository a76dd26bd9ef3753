//! `qfuse demo`: NNI's module-fusion example end to end on real handwritten digits (the
//! UCI digits shipped with qfuse, `qfuse::data::digits`): train the float Mnist network,
//! quantize it after training (PTQ) with NNI's example config — fuse conv1 with batchnorm1,
//! int8 affine on conv1's input, weight and output; `--config FILE` takes any config_list,
//! `--quantize-all` quantizes every conv and linear — and report the test accuracy of the
//! fused and unfused simulations and of the deployed integer model (`qfuse::deploy`: every
//! conv and linear in int8); then fine-tune with quantization-aware training
//! (`qfuse::train::GpuTrainer::enable_qat`, PyTorch's `prepare_qat` of the fused model,
//! BatchNorm statistics and observers frozen for the last half of the QAT epochs), convert,
//! and report the QAT simulation's and the deployed integer model's accuracy. One table
//! gives each stage's test accuracy, time and host↔device transfers; a second one the
//! integer model's code gap to the fused and unfused simulations on the test images.
//!
//! Runs on the GPU (training included) or, when no adapter opens, on the CPU reference
//! (said on stderr and in the table). Seeded and reproducible.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ndarray::{s, Array4, ArrayD, Axis};
use qfuse::backend::{Backend, CpuBackend, GpuBackend, HostOps};
use qfuse::config::{self, ConfigList, QuantConfig, QuantMode};
use qfuse::data::digits::{Digits, Split, MNIST_MEAN, MNIST_STD};
use qfuse::deploy::{self, DeployConfig, DeviceIntModel, IntModel, Net};
use qfuse::gpu::{GpuContext, GpuTensor, TransferStats};
use qfuse::io::file::{read_input, Outputs};
use qfuse::io::state_dict::load_state_dict;
use qfuse::io::text::{escape, escape_path};
use qfuse::limits::{MAX_DEMO_BATCH, MAX_DEMO_CALIBRATION_BATCHES, MAX_DEMO_EPOCHS, MAX_DEMO_RUNS};
use qfuse::model::mnist;
use qfuse::nn::{DeviceChain, Module};
use qfuse::optim::Sgd;
use qfuse::quant::RequantMode;
use qfuse::train::{
    evaluate, fit, CpuTrainer, FitOptions, GpuTrainer, Progress, QatOptions, Trainer,
};
use serde_json::{json, Value};

use crate::plot;

/// Where the models run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DemoBackend {
    /// The CPU reference.
    Cpu,
    /// The WGSL kernels on the system's GPU adapter (an error when there is none).
    Gpu,
    /// The GPU when an adapter can be opened, else the CPU reference (said on stderr and in
    /// the table).
    Auto,
}

/// Arguments of `qfuse demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Keep the GPU caches (conv2d tuning, compiled pipelines) in memory only, instead of the
    /// platform cache directory (`QFUSE_CACHE_DIR` overrides it).
    #[arg(long)]
    no_cache: bool,
    /// Start from these Mnist weights: a PyTorch state dict
    /// (`safetensors.torch.save_file(Mnist().state_dict(), FILE)`). Without it the network
    /// starts from PyTorch's default initialisation, seeded by --seed.
    #[arg(long, value_name = "FILE.safetensors")]
    weights: Option<PathBuf>,
    /// The prefix of the Mnist tensors in --weights (`in.model.` for the golden
    /// model_mnist_ptq case file).
    #[arg(long, default_value = "", requires = "weights")]
    prefix: String,
    /// Epochs of float training on the training digits (0: use the weights as they are).
    #[arg(long, default_value_t = 4)]
    epochs: usize,
    /// Epochs of quantization-aware fine-tuning after PTQ (0: no QAT stage).
    #[arg(long, default_value_t = 2)]
    qat_epochs: usize,
    /// Learning rate of float training (SGD, momentum 0.9).
    #[arg(long, default_value_t = 0.05)]
    lr: f32,
    /// Learning rate of QAT fine-tuning (SGD, momentum 0.9).
    #[arg(long, default_value_t = 0.01)]
    qat_lr: f32,
    /// Use only the first N training images (default: all 1,437), for quick runs.
    #[arg(long, value_name = "N")]
    train_images: Option<usize>,
    /// Use only the first N test images (default: all 360), for quick runs.
    #[arg(long, value_name = "N")]
    test_images: Option<usize>,
    /// Images per batch (training, calibration, evaluation, and the timed batch).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Seed of the initial weights (without --weights) and of the training shuffles.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the models run.
    #[arg(long, value_enum, default_value_t = DemoBackend::Auto)]
    backend: DemoBackend,
    /// The PTQ config_list (NNI's JSON: op_names / op_types, target_names, quant_dtype,
    /// quant_scheme, granularity, fuse_names). Default: NNI's example config.
    #[arg(long, value_name = "FILE.json", conflicts_with = "quantize_all")]
    config: Option<PathBuf>,
    /// PTQ quantizes every conv and linear (input, weight, output; int8 affine), with conv1
    /// and batchnorm1 fused, instead of NNI's example config (conv1 only).
    #[arg(long)]
    quantize_all: bool,
    /// Also write the tables as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Timed runs per model on the timed batch (the first --batch test images; the table
    /// shows their median).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// PTQ calibration batches (the first ones of the training split, in file order).
    #[arg(long, default_value_t = 4)]
    calibration_batches: usize,
    /// Requantization arithmetic of the deployed integer models.
    #[arg(long, value_enum, default_value_t = DemoRequant::Float)]
    requant: DemoRequant,
    /// Also save the deployed integer model (after QAT when there is a QAT stage; int8
    /// weights, i32 biases, scales) to this safetensors file.
    #[arg(long, value_name = "FILE.safetensors")]
    export: Option<PathBuf>,
    /// Also draw the results as SVG: each stage's test accuracy, and the per-layer fraction
    /// of identical integer codes, fused against unfused simulation.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

/// Requantization arithmetic (see `qfuse::quant::RequantMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DemoRequant {
    /// fp32, as fbgemm and XNNPACK (one rounding, ties to even).
    Float,
    /// gemmlowp / TFLite fixed point (two roundings: ties up, then away from zero).
    FixedPoint,
}

impl DemoRequant {
    /// The value as the command line spells it (`fixed-point`), for echoing it back.
    fn as_typed(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_else(|| format!("{self:?}"))
    }
}

/// One row of the numerical comparison on the timed batch.
struct Row {
    model: &'static str,
    max_abs_diff: f32,
    agree: usize,
    ms: f64,
}

/// One row of the stage table.
struct Stage {
    name: &'static str,
    key: &'static str,
    accuracy: f64,
    seconds: f64,
    transfers: Option<TransferStats>,
    /// Uploads + downloads of one forward of the stage's model (where it has one and a GPU
    /// counts them).
    per_forward: Option<u64>,
    note: String,
}

/// Each row's argmax (`torch.argmax` on the CPU: [`qfuse::reference::train::argmax`]).
fn argmax(y: &ArrayD<f32>) -> Vec<usize> {
    y.axis_iter(Axis(0))
        .map(|row| qfuse::reference::train::argmax(row.iter().copied()).unwrap_or(0))
        .collect()
}

/// [`argmax`] of integer codes (exact in f32).
fn argmax_i8(y: &ArrayD<i8>) -> Vec<usize> {
    argmax(&y.mapv(f32::from))
}

/// The first `n` images of a split (all with `None`).
fn take(split: &Split, n: Option<usize>) -> Split {
    match n {
        Some(n) if n < split.len() => Split {
            images: split.images.slice(s![0..n, .., .., ..]).to_owned(),
            labels: split.labels[..n].to_vec(),
        },
        _ => split.clone(),
    }
}

/// Test accuracy of a classifier given as a per-batch predictor.
fn accuracy(
    split: &Split,
    batch: usize,
    predict: &mut dyn FnMut(&Array4<f32>) -> qfuse::Result<Vec<usize>>,
) -> qfuse::Result<f64> {
    let mut correct = 0usize;
    for b in split.batches(batch, None)? {
        let pred = predict(&b.images)?;
        correct += pred
            .iter()
            .zip(&b.labels)
            .filter(|(p, &l)| **p == l as usize)
            .count();
    }
    Ok(correct as f64 / split.len().max(1) as f64)
}

/// One forward of a model prepared on the device: upload the batch, run, download the
/// output.
fn chain_forward<B: Backend>(
    chain: &DeviceChain<B>,
    x: &ArrayD<f32>,
) -> qfuse::Result<ArrayD<f32>> {
    let b = chain.backend();
    b.download(&chain.forward(&b.upload(x)?)?)
}

/// One untimed forward (its output, and a warm-up for the GPU's pipelines), then `runs`
/// timed ones (each with its upload and download): the output and the median time in ms.
fn measure<B: Backend>(
    chain: &DeviceChain<B>,
    x: &ArrayD<f32>,
    runs: usize,
) -> qfuse::Result<(ArrayD<f32>, f64)> {
    let y = chain_forward(chain, x)?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        chain_forward(chain, x)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok((y, median(times)))
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    let mid = times.len() / 2;
    if times.is_empty() {
        0.0
    } else if times.len() % 2 == 1 {
        times[mid]
    } else {
        (times[mid - 1] + times[mid]) / 2.0
    }
}

/// The PTQ config_list: `--config FILE`, `--quantize-all`, or NNI's example config.
fn ptq_config(args: &DemoArgs) -> qfuse::Result<(ConfigList, String)> {
    if let Some(path) = &args.config {
        let bytes = read_input(path, Some(1 << 20))?;
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            qfuse::Error::invalid(format!("{}: not UTF-8 text: {e}", escape_path(path)))
        })?;
        let cfg = ConfigList::from_json(text)?;
        return Ok((cfg, format!("config_list from {}", escape_path(path))));
    }
    if args.quantize_all {
        let cfg = ConfigList(vec![QuantConfig {
            op_names: Vec::new(),
            op_types: vec!["Conv2d".into(), "Linear".into()],
            exclude_op_names: Vec::new(),
            exclude_op_types: Vec::new(),
            target_names: vec!["_input_".into(), "weight".into(), "_output_".into()],
            quant_dtype: "int8".into(),
            quant_scheme: "affine".into(),
            granularity: "default".into(),
            fuse_names: vec![vec!["conv1".into(), "batchnorm1".into()]],
        }]);
        return Ok((
            cfg,
            "fuse conv1+batchnorm1; int8 affine per tensor on every conv and linear's _input_, \
             weight, _output_ (--quantize-all)"
                .into(),
        ));
    }
    Ok((
        mnist::nni_example_config(),
        "NNI's example: fuse conv1+batchnorm1; int8 affine per tensor on conv1 _input_, \
         weight, _output_"
            .into(),
    ))
}

/// `cfg` without its fusions (the unfused simulation of the same quantization).
fn unfused(cfg: &ConfigList) -> ConfigList {
    ConfigList(
        cfg.0
            .iter()
            .map(|c| QuantConfig {
                fuse_names: Vec::new(),
                ..c.clone()
            })
            .collect(),
    )
}

fn check_args(args: &DemoArgs) -> qfuse::Result<()> {
    if args.batch == 0 || args.runs == 0 || args.calibration_batches == 0 {
        return Err(qfuse::Error::invalid(
            "--batch, --runs and --calibration-batches must be at least 1",
        ));
    }
    if args.train_images == Some(0) || args.test_images == Some(0) {
        return Err(qfuse::Error::invalid(
            "--train-images and --test-images must be at least 1",
        ));
    }
    for (what, value, limit, unit) in [
        ("--batch", args.batch, MAX_DEMO_BATCH, "images"),
        (
            "--calibration-batches",
            args.calibration_batches,
            MAX_DEMO_CALIBRATION_BATCHES,
            "batches",
        ),
        ("--runs", args.runs, MAX_DEMO_RUNS, "runs"),
        ("--epochs", args.epochs, MAX_DEMO_EPOCHS, "epochs"),
        ("--qat-epochs", args.qat_epochs, MAX_DEMO_EPOCHS, "epochs"),
    ] {
        if value > limit {
            return Err(qfuse::Error::TooLarge {
                what: what.into(),
                size: value as u64,
                limit: limit as u64,
                unit,
            });
        }
    }
    for (what, lr) in [("--lr", args.lr), ("--qat-lr", args.qat_lr)] {
        if !(lr.is_finite() && lr > 0.0) {
            return Err(qfuse::Error::invalid(format!(
                "{what} must be positive and finite, got {lr}"
            )));
        }
    }
    Ok(())
}

/// A progress bar on stderr (drawn only on a terminal) for `fit`'s steps.
fn progress_bar(what: &str, epochs: usize, steps_per_epoch: usize) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some((epochs * steps_per_epoch) as u64),
        ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} {elapsed_precise} [{bar:30}] {pos}/{len} {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// Trains `trainer` for `epochs` epochs over `train` with a progress bar; `freeze_from`:
/// the epoch from which BatchNorm statistics and observers are frozen (QAT).
fn train(
    trainer: &mut dyn Trainer,
    what: &str,
    train: &Split,
    epochs: usize,
    batch: usize,
    seed: u64,
    freeze_from: Option<usize>,
) -> qfuse::Result<Vec<f32>> {
    let steps = train.len().div_ceil(batch);
    let bar = progress_bar(what, epochs, steps);
    let mut losses = Vec::with_capacity(epochs);
    for epoch in 0..epochs {
        if freeze_from.is_some_and(|f| epoch >= f) {
            trainer.freeze_bn_stats(true)?;
            trainer.freeze_observers(true)?;
        }
        let report = fit(
            trainer,
            train,
            None,
            &FitOptions {
                epochs: 1,
                batch_size: batch,
                seed: seed.wrapping_add(epoch as u64),
            },
            &mut |p| {
                if let Progress::Step { loss, .. } = p {
                    bar.inc(1);
                    bar.set_message(format!("epoch {}/{epochs}, loss {loss:.4}", epoch + 1));
                }
            },
        )?;
        losses.extend(report.epoch_losses);
    }
    bar.finish_and_clear();
    Ok(losses)
}

/// What `qfuse demo` found, for the table, the JSON and the plot.
struct Results {
    stages: Vec<Stage>,
    rows: Vec<Row>,
    qparams: Vec<(String, qfuse::nn::QuantTarget, qfuse::quant::QParams)>,
    deployed: Deployed,
    train_losses: Vec<f32>,
    qat_losses: Vec<f32>,
    train_seconds: f64,
    transfers_per_forward: Option<u64>,
}

/// Runs `qfuse demo`.
pub fn run(args: &DemoArgs) -> qfuse::Result<ExitCode> {
    check_args(args)?;
    // The outputs are checked before any work (never an input, through links too; regular
    // files), written to temporaries at the end and renamed only when all are written.
    let inputs: Vec<&std::path::Path> = args
        .weights
        .iter()
        .chain(&args.config)
        .map(PathBuf::as_path)
        .collect();
    let mut outputs = Outputs::new(&inputs);
    let dests: Vec<&std::path::Path> = args
        .export
        .iter()
        .chain(&args.json)
        .chain(&args.plot)
        .map(PathBuf::as_path)
        .collect();
    outputs.check_all(&dests)?;
    // The model and the config first: a bad file fails before a GPU is opened.
    let (model, weights_desc) = match &args.weights {
        Some(path) => {
            let sd = load_state_dict(path)?;
            let prefix = if args.prefix.is_empty() {
                String::new()
            } else {
                format!(" (prefix `{}`)", escape(&args.prefix))
            };
            (
                mnist::mnist_from_state_dict(&sd, &args.prefix)?,
                format!("{}{prefix}", escape_path(path)),
            )
        }
        None => (
            mnist::mnist(args.seed)?,
            format!("PyTorch-style default init, seed {}", args.seed),
        ),
    };
    let (cfg, cfg_desc) = ptq_config(args)?;
    let mut digits = Digits::bundled()?;
    digits.normalize(MNIST_MEAN, MNIST_STD)?;
    let train_split = take(&digits.train, args.train_images);
    let test_split = take(&digits.test, args.test_images);

    let (kind, adapter, fallback, gpu_ctx): (&str, Option<String>, Option<String>, _) =
        match args.backend {
            DemoBackend::Cpu => ("cpu", None, None, None),
            DemoBackend::Gpu => {
                let ctx = Arc::new(crate::cache_dir::open(args.no_cache)?);
                ("gpu", Some(ctx.name()), None, Some(ctx))
            }
            DemoBackend::Auto => match crate::cache_dir::open(args.no_cache) {
                Ok(ctx) => ("gpu", Some(ctx.name()), None, Some(Arc::new(ctx))),
                Err(e) => {
                    eprintln!("no GPU adapter ({e}): running on the CPU reference");
                    ("cpu", None, Some(e.to_string()), None)
                }
            },
        };
    let backend_cell = match (&adapter, &fallback) {
        (Some(_), _) => "gpu".to_string(),
        (None, Some(_)) => "cpu (no GPU adapter)".to_string(),
        (None, None) => "cpu".to_string(),
    };
    let results = match &gpu_ctx {
        Some(ctx) => stages(
            args,
            &model,
            &cfg,
            &train_split,
            &test_split,
            GpuBackend::new(Arc::clone(ctx)),
            Some(Arc::clone(ctx)),
        )?,
        None => stages(
            args,
            &model,
            &cfg,
            &train_split,
            &test_split,
            CpuBackend,
            None,
        )?,
    };
    let r = &results;
    let timed = args.batch.min(test_split.len());

    // ---- the outputs, written before the table says where they went
    if let (Some(path), Some(bytes)) = (&args.export, &r.deployed.export_bytes) {
        outputs.stage(path, bytes)?;
    }
    if let Some(path) = &args.json {
        let acc = |key: &str| r.stages.iter().find(|s| s.key == key).map(|s| s.accuracy);
        let doc = json!({
            "backend": kind,
            "adapter": adapter,
            "fallback": fallback,
            "batch": args.batch,
            "seed": args.seed,
            "weights": args.weights.as_ref().map(|p| p.display().to_string()),
            "prefix": args.prefix,
            "epochs": args.epochs,
            "qat_epochs": args.qat_epochs,
            "train_images": train_split.len(),
            "test_images": test_split.len(),
            "calibration_batches": args.calibration_batches,
            "runs": args.runs,
            "config": cfg.to_value(),
            "rows": r.rows.iter().map(|row| json!({
                "model": row.model,
                "max_abs_diff": row.max_abs_diff,
                "argmax_agreement": row.agree as f64 / timed as f64,
                "ms_per_batch": row.ms,
                "backend": kind,
            })).collect::<Vec<Value>>(),
            "stages": r.stages.iter().map(|s| json!({
                "stage": s.name,
                "key": s.key,
                "test_accuracy": s.accuracy,
                "seconds": s.seconds,
                "uploads": s.transfers.map(|t| t.uploads),
                "downloads": s.transfers.map(|t| t.downloads),
                "upload_bytes": s.transfers.map(|t| t.upload_bytes),
                "download_bytes": s.transfers.map(|t| t.download_bytes),
                "transfers_per_forward": s.per_forward,
            })).collect::<Vec<Value>>(),
            "accuracy_float": acc("float"),
            "accuracy_ptq_fused": acc("ptq_fused"),
            "accuracy_ptq_unfused": acc("ptq_unfused"),
            "accuracy_ptq_int8": acc("ptq_int8"),
            "accuracy_qat_sim": acc("qat_sim"),
            "accuracy_qat_int8": acc("qat_int8"),
            "train_seconds": r.train_seconds,
            "train_losses": r.train_losses,
            "qat_losses": r.qat_losses,
            "transfers_per_forward": r.transfers_per_forward,
            "qparams": r.qparams.iter().map(|(p, t, qp)| {
                (format!("{p}.{t}"), json!([qp.scale[0], qp.zero_point[0]]))
            }).collect::<serde_json::Map<String, Value>>(),
            "int8_identical_fraction_fused": r.deployed.gap.fused.identical_fraction(),
            "int8_max_step_diff_fused": r.deployed.gap.fused.max_step_diff,
            "int8_identical_fraction_unfused": r.deployed.gap.unfused.identical_fraction(),
            "int8_max_step_diff_unfused": r.deployed.gap.unfused.max_step_diff,
            "deployment": r.deployed.json(timed),
        });
        let text = serde_json::to_string_pretty(&doc)
            .map_err(|e| qfuse::Error::invalid(format!("JSON: {e}")))?;
        outputs.stage(path, (text + "\n").as_bytes())?;
    }
    if let Some(path) = &args.plot {
        let stages: Vec<(String, f64)> = r
            .stages
            .iter()
            .map(|s| (s.name.to_string(), s.accuracy))
            .collect();
        let layers: Vec<(String, f64, f64)> = r
            .deployed
            .gap
            .layers
            .iter()
            .map(|l| {
                (
                    l.name.clone(),
                    l.fused.identical_fraction(),
                    l.unfused.identical_fraction(),
                )
            })
            .collect();
        let title = format!(
            "qfuse demo: NNI's Mnist on {} UCI test digits (seed {}), {}",
            test_split.len(),
            args.seed,
            backend_cell
        );
        let svg = plot::demo_svg(&title, "test accuracy", &stages, &layers)?;
        outputs.stage(path, svg.as_bytes())?;
    }
    // The outputs appear together, or (on an error above) none of them.
    outputs.commit()?;
    if let Some(path) = &args.plot {
        eprintln!("wrote {}", escape_path(path));
    }

    // ---- the tables
    println!("qfuse demo: the Mnist network of NNI's module-fusion example, on real digits");
    println!("weights:  {weights_desc}");
    println!(
        "data:     UCI handwritten digits (CC BY 4.0), {} training / {} test images, 8×8 \
         resized to 28×28",
        train_split.len(),
        test_split.len()
    );
    println!("config:   {cfg_desc}");
    match (&adapter, &fallback) {
        (Some(a), _) => println!("backend:  gpu: {a}"),
        (None, Some(why)) => println!("backend:  cpu (the CPU reference: no GPU adapter: {why})"),
        (None, None) => println!("backend:  cpu (the CPU reference)"),
    }
    println!();
    println!(
        "{:<34} {:>14} {:>9} {:>26}",
        "stage", "test accuracy", "seconds", "transfers up/down (MB)"
    );
    for s in &r.stages {
        let tr = match s.transfers {
            Some(t) => format!(
                "{}/{} ({:.1}/{:.1})",
                t.uploads,
                t.downloads,
                t.upload_bytes as f64 / 1e6,
                t.download_bytes as f64 / 1e6
            ),
            None => "-".into(),
        };
        println!(
            "{:<34} {:>13.2}% {:>9.2} {:>26}{}",
            s.name,
            100.0 * s.accuracy,
            s.seconds,
            tr,
            if s.note.is_empty() {
                String::new()
            } else {
                format!("   {}", s.note)
            }
        );
    }
    if let Some(n) = r.transfers_per_forward {
        println!(
            "device-resident float forward (batch {}): {n} transfers (uploads + downloads)",
            args.batch
        );
    }
    println!();
    println!(
        "timed batch: the first {timed} test images, {} runs each ({backend_cell})",
        args.runs
    );
    println!(
        "{:<16} {:>20} {:>20} {:>10}",
        "model", "max |diff| vs float", "argmax = float", "ms/batch"
    );
    for row in &r.rows {
        let agree = format!(
            "{}/{} ({:.1}%)",
            row.agree,
            timed,
            100.0 * row.agree as f64 / timed as f64
        );
        println!(
            "{:<16} {:>20.3e} {:>20} {:>10.2}",
            row.model, row.max_abs_diff, agree, row.ms
        );
    }
    println!(
        "ms/batch: median of {} forwards of the module tree prepared on the backend \
         (DeviceChain), each with its upload and download",
        args.runs
    );
    for (path, target, qp) in &r.qparams {
        println!(
            "qparams {path}.{target}: scale {:.6e}, zero point {}",
            qp.scale[0], qp.zero_point[0]
        );
    }
    r.deployed.print(timed, &backend_cell);

    Ok(ExitCode::SUCCESS)
}

fn transfers_since(
    ctx: &Option<Arc<GpuContext>>,
    before: Option<TransferStats>,
) -> Option<TransferStats> {
    match (ctx, before) {
        (Some(c), Some(b)) => Some(c.transfer_stats().since(&b)),
        _ => None,
    }
}

/// Every stage of the demo on one backend.
fn stages<B: Backend + Clone>(
    args: &DemoArgs,
    model: &Module,
    cfg: &ConfigList,
    train_split: &Split,
    test_split: &Split,
    backend: B,
    gpu_ctx: Option<Arc<GpuContext>>,
) -> qfuse::Result<Results> {
    let b: &dyn HostOps = &backend;
    let snap = || gpu_ctx.as_ref().map(|c| c.transfer_stats());
    let mut stages = Vec::new();
    let sgd = |lr: f32| Sgd {
        lr,
        momentum: 0.9,
        ..Sgd::new(lr)
    };
    let timed = args.batch.min(test_split.len());
    let x_timed: ArrayD<f32> = test_split
        .images
        .slice(s![0..timed, .., .., ..])
        .to_owned()
        .into_dyn();
    // The GPU trainer, or the CPU reference's when no adapter opened.
    let new_trainer = |net: &Net, lr: f32| -> qfuse::Result<Box<dyn Trainer>> {
        Ok(match &gpu_ctx {
            Some(ctx) => Box::new(GpuTrainer::new(Arc::clone(ctx), net, sgd(lr))?),
            None => Box::new(CpuTrainer::new(net, sgd(lr))?),
        })
    };

    // ---- 1. float training (kept concrete on the GPU: its forward's transfers are counted)
    let t0 = Instant::now();
    let before = snap();
    let net0 = mnist::deploy_net(model)?;
    let mut gpu_trainer: Option<GpuTrainer> = None;
    let mut cpu_trainer: Option<CpuTrainer> = None;
    let trainer: &mut dyn Trainer = match &gpu_ctx {
        Some(ctx) => gpu_trainer.insert(GpuTrainer::new(Arc::clone(ctx), &net0, sgd(args.lr))?),
        None => cpu_trainer.insert(CpuTrainer::new(&net0, sgd(args.lr))?),
    };
    let train_losses = if args.epochs > 0 {
        train(
            trainer,
            "float",
            train_split,
            args.epochs,
            args.batch,
            args.seed,
            None,
        )?
    } else {
        Vec::new()
    };
    let float_acc = f64::from(evaluate(trainer, test_split, args.batch)?);
    let net = trainer.to_net()?;
    // One device-resident forward of the trained net: its transfers.
    let transfers_per_forward = match (&gpu_ctx, gpu_trainer.as_mut()) {
        (Some(ctx), Some(t)) => {
            let before = ctx.transfer_stats();
            let xd = GpuTensor::upload_f32(ctx, &x_timed)?;
            t.forward_eval(&xd)?.download_f32(ctx)?;
            let d = ctx.transfer_stats().since(&before);
            Some(d.uploads + d.downloads)
        }
        _ => None,
    };
    drop((gpu_trainer, cpu_trainer));
    let train_seconds = t0.elapsed().as_secs_f64();
    stages.push(Stage {
        name: if args.epochs > 0 {
            "float (trained)"
        } else {
            "float"
        },
        key: "float",
        accuracy: float_acc,
        seconds: train_seconds,
        transfers: transfers_since(&gpu_ctx, before),
        per_forward: None,
        note: if args.epochs > 0 {
            format!(
                "{} epochs, lr {}, batch {}",
                args.epochs, args.lr, args.batch
            )
        } else {
            "not trained (--epochs 0)".into()
        },
    });
    let mut float_model = mnist::mnist_from_net(&net)?;
    float_model.eval();

    // ---- 2. PTQ: NNI's config on the module tree (fused and unfused simulations), and the
    // whole network deployed in integer form.
    let calibration: Vec<ArrayD<f32>> = train_split
        .batches(args.batch, None)?
        .take(args.calibration_batches)
        .map(|bt| bt.images.into_dyn())
        .collect();
    let (y_float, ms_float) = measure(
        &mnist::device_forward(&float_model, backend.clone())?,
        &x_timed,
        args.runs,
    )?;
    // The simulations run on the device: the module tree with its fake-quant targets
    // prepared once (DeviceChain), calibrated there (observers on the device), then one
    // upload and one download per forward.
    let mut sim_stage = |name: &'static str, key: &'static str, cfg: &ConfigList| {
        let t = Instant::now();
        let before = snap();
        let mut quant = float_model.clone();
        config::apply(&mut quant, cfg, QuantMode::Ptq)?;
        config::calibrate(&mut quant, &backend, calibration.iter())?;
        let chain = mnist::device_forward(&quant, backend.clone())?;
        let one = snap();
        chain_forward(&chain, &x_timed)?;
        let per_forward = transfers_since(&gpu_ctx, one).map(|d| d.uploads + d.downloads);
        let acc = accuracy(test_split, args.batch, &mut |x| {
            Ok(argmax(&chain_forward(&chain, &x.clone().into_dyn())?))
        })?;
        stages.push(Stage {
            name,
            key,
            accuracy: acc,
            seconds: t.elapsed().as_secs_f64(),
            transfers: transfers_since(&gpu_ctx, before),
            per_forward,
            note: match per_forward {
                Some(n) => format!("module tree on the device, {n} transfers per forward"),
                None => "module tree on the backend".into(),
            },
        });
        Ok::<Module, qfuse::Error>(quant)
    };
    let mut quant = sim_stage("PTQ fused simulation", "ptq_fused", cfg)?;
    sim_stage("PTQ unfused simulation", "ptq_unfused", &unfused(cfg))?;
    config::set_fake_quant_enabled(&mut quant, false);
    let fused_chain = mnist::device_forward(&quant, backend.clone())?;
    let (y_fused, ms_fused) = measure(&fused_chain, &x_timed, args.runs)?;
    config::set_fake_quant_enabled(&mut quant, true);
    let sim_chain = mnist::device_forward(&quant, backend.clone())?;
    let (y_int8, ms_int8) = measure(&sim_chain, &x_timed, args.runs)?;
    let qparams = config::qparams(&quant);
    let labels = argmax(&y_float);
    let row = |model: &'static str, y: &ArrayD<f32>, ms: f64| Row {
        model,
        max_abs_diff: y
            .iter()
            .zip(&y_float)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max),
        agree: argmax(y)
            .iter()
            .zip(&labels)
            .filter(|(a, b)| a == b)
            .count(),
        ms,
    };
    let rows = vec![
        row("float", &y_float, ms_float),
        row("fused", &y_fused, ms_fused),
        row("simulated int8", &y_int8, ms_int8),
    ];

    let requant = match args.requant {
        DemoRequant::Float => RequantMode::Float,
        DemoRequant::FixedPoint => RequantMode::FixedPoint,
    };
    let dcfg = DeployConfig {
        requant,
        ..Default::default()
    };
    let t = Instant::now();
    let before = snap();
    let ptq_int = deploy::convert_on(&net, &backend, calibration.iter(), &dcfg)?;
    let ptq_acc = int_accuracy(&ptq_int, &backend, test_split, args.batch)?;
    stages.push(Stage {
        name: "PTQ int8 deployed",
        key: "ptq_int8",
        accuracy: ptq_acc,
        seconds: t.elapsed().as_secs_f64(),
        transfers: transfers_since(&gpu_ctx, before),
        per_forward: None,
        note: "every conv and linear int8".into(),
    });

    // ---- 3. QAT: fine-tune with fake quantization of what is deployed, then convert.
    let mut qat_losses = Vec::new();
    let final_model = if args.qat_epochs > 0 {
        let t = Instant::now();
        let before = snap();
        let mut q = new_trainer(&net, args.qat_lr)?;
        q.enable_qat(QatOptions::for_deployment(&dcfg))?;
        // PyTorch's QAT recipes freeze BatchNorm statistics and observers late in
        // fine-tuning: here for the last half of the epochs (none with one epoch).
        let freeze_from = args.qat_epochs - args.qat_epochs / 2;
        qat_losses = train(
            q.as_mut(),
            "QAT",
            train_split,
            args.qat_epochs,
            args.batch,
            args.seed.wrapping_add(1000),
            Some(freeze_from),
        )?;
        let sim_acc = f64::from(evaluate(q.as_mut(), test_split, args.batch)?);
        stages.push(Stage {
            name: "QAT simulation",
            key: "qat_sim",
            accuracy: sim_acc,
            seconds: t.elapsed().as_secs_f64(),
            transfers: transfers_since(&gpu_ctx, before),
            per_forward: None,
            note: format!(
                "{} epochs, lr {}, frozen from epoch {}",
                args.qat_epochs,
                args.qat_lr,
                freeze_from + 1
            ),
        });
        let t = Instant::now();
        let before = snap();
        let qnet = q.to_net()?;
        let ranges = q.activation_ranges()?;
        let qat_int = deploy::convert_with_ranges(&qnet, b, &ranges, &dcfg)?;
        let acc = int_accuracy(&qat_int, &backend, test_split, args.batch)?;
        stages.push(Stage {
            name: "QAT int8 deployed",
            key: "qat_int8",
            accuracy: acc,
            seconds: t.elapsed().as_secs_f64(),
            transfers: transfers_since(&gpu_ctx, before),
            per_forward: None,
            note: "QAT observers' ranges".into(),
        });
        (qnet, qat_int)
    } else {
        (net.clone(), ptq_int)
    };

    // ---- 4. the integer model against the simulations, on the test images.
    let deployed = deploy_section(
        args,
        &final_model.0,
        &final_model.1,
        &dcfg,
        &backend,
        gpu_ctx,
        &test_split.images.clone().into_dyn(),
        &x_timed,
    )?;
    Ok(Results {
        stages,
        rows,
        qparams,
        deployed,
        train_losses,
        qat_losses,
        train_seconds,
        transfers_per_forward,
    })
}

/// Test accuracy of an integer model, prepared once on `backend` (device-resident on the
/// GPU).
fn int_accuracy<B: Backend + Clone>(
    int: &IntModel,
    backend: &B,
    split: &Split,
    batch: usize,
) -> qfuse::Result<f64> {
    let dev = DeviceIntModel::prepare(int, backend.clone())?;
    accuracy(split, batch, &mut |x| {
        Ok(argmax_i8(&dev.forward(&x.clone().into_dyn())?))
    })
}
/// The deployed integer model's section of the demo.
struct Deployed {
    gap: deploy::GapReport,
    requant: DemoRequant,
    trained_bn: bool,
    qat: bool,
    max_abs_diff: f32,
    agree: usize,
    ms: f64,
    device_ms: Option<f64>,
    reload_identical: bool,
    exported: Option<PathBuf>,
    /// The integer model's safetensors bytes, when `--export` asks for them.
    export_bytes: Option<Vec<u8>>,
}

impl Deployed {
    fn print(&self, batch: usize, backend_cell: &str) {
        let g = &self.gap;
        println!();
        println!(
            "deployment ({}): every conv and linear in int8 (per-channel symmetric weights, \
             int8 affine activations, i32 bias at s_in*s_w), BN folded, ReLU6 as the clamp, {} \
             requantization; code gap on the test images",
            if self.qat { "after QAT" } else { "after PTQ" },
            self.requant.as_typed(),
        );
        println!(
            "{:<28} {:>24} {:>14}",
            "integer outputs vs", "identical codes", "max step diff"
        );
        for (name, gap) in [
            ("fused simulation", &g.fused),
            ("unfused simulation", &g.unfused),
        ] {
            println!(
                "{:<28} {:>24} {:>14}",
                name,
                format!(
                    "{}/{} ({:.3}%)",
                    gap.identical,
                    gap.outputs,
                    100.0 * gap.identical_fraction()
                ),
                gap.max_step_diff
            );
        }
        println!(
            "{:<10} {:>26} {:>26}",
            "layer", "end to end: fused/unfused", "isolated: fused/unfused"
        );
        let pct = |g: &deploy::Gap| format!("{:.3}%", 100.0 * g.identical_fraction());
        for l in &g.layers {
            println!(
                "{:<10} {:>26} {:>26}",
                l.name,
                format!("{} / {}", pct(&l.fused), pct(&l.unfused)),
                format!("{} / {}", pct(&l.fused_isolated), pct(&l.unfused_isolated)),
            );
        }
        println!(
            "(identical codes; isolated: the layer alone, fed the integer model's own inputs)"
        );
        println!(
            "deployed int8: max |diff| vs float {:.3e}, argmax = float {}/{batch}, {:.2} ms/batch \
             ({backend_cell}, IntModel::forward: prepared per call){}; safetensors round trip gives \
             identical outputs: {}{}",
            self.max_abs_diff,
            self.agree,
            self.ms,
            self.device_ms
                .map(|d| format!(", {d:.2} ms/batch prepared once (GpuIntModel)"))
                .unwrap_or_default(),
            if self.reload_identical { "yes" } else { "NO" },
            self.exported
                .as_ref()
                .map(|p| format!("; saved to {}", escape_path(p)))
                .unwrap_or_default()
        );
    }

    fn json(&self, batch: usize) -> Value {
        let gap = |g: &deploy::Gap| {
            json!({
                "outputs": g.outputs,
                "identical": g.identical,
                "identical_fraction": g.identical_fraction(),
                "max_step_diff": g.max_step_diff,
            })
        };
        json!({
            "requant": self.requant.as_typed(),
            "trained_bn_stats": self.trained_bn,
            "after_qat": self.qat,
            "fused": gap(&self.gap.fused),
            "unfused": gap(&self.gap.unfused),
            "layers": self.gap.layers.iter().map(|l| json!({
                "name": l.name,
                "fused": gap(&l.fused),
                "unfused": gap(&l.unfused),
                "fused_isolated": gap(&l.fused_isolated),
                "unfused_isolated": gap(&l.unfused_isolated),
            })).collect::<Vec<Value>>(),
            "max_abs_diff_vs_float": self.max_abs_diff,
            "argmax_agreement": self.agree as f64 / batch as f64,
            "ms_per_batch": self.ms,
            "ms_per_batch_device_resident": self.device_ms,
            "reload_identical": self.reload_identical,
            "exported": self.exported.as_ref().map(|p| p.display().to_string()),
        })
    }
}

/// The deployed integer model `int` (converted from `net`): its code gap to the fused and
/// unfused simulations on `x_test`, its outputs on the timed batch `x` against `net`'s float
/// log-probabilities, its timing, and a safetensors round trip.
#[allow(clippy::too_many_arguments)]
fn deploy_section<B: Backend + Clone>(
    args: &DemoArgs,
    net: &Net,
    int: &IntModel,
    cfg: &DeployConfig,
    backend: &B,
    gpu_ctx: Option<Arc<GpuContext>>,
    x_test: &ArrayD<f32>,
    x: &ArrayD<f32>,
) -> qfuse::Result<Deployed> {
    let b: &dyn HostOps = backend;
    let gap = deploy::measure_gap(net, int, cfg, backend, x_test)?;
    // The float model the integer one was converted from (after QAT: the fine-tuned one), so
    // the comparison is the quantization's alone.
    let values = net.forward_values(backend, x, false)?;
    let out = values
        .get(net.output())
        .ok_or_else(|| qfuse::Error::invalid("internal: the net's output"))?
        .clone()
        .into_dimensionality::<ndarray::Ix2>()
        .map_err(|e| qfuse::Error::invalid(e.to_string()))?;
    let y_float = &b.log_softmax(&out)?.into_dyn();
    let logits = int.forward_dequantized(backend, x)?;
    let logits2 = logits
        .into_dimensionality::<ndarray::Ix2>()
        .map_err(|e| qfuse::Error::invalid(e.to_string()))?;
    let y = b.log_softmax(&logits2)?.into_dyn();
    let labels = argmax(y_float);
    let agree = argmax(&y)
        .iter()
        .zip(&labels)
        .filter(|(a, b)| a == b)
        .count();
    let max_abs_diff = y
        .iter()
        .zip(y_float)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    let median_ms = |f: &dyn Fn() -> qfuse::Result<ArrayD<i8>>| -> qfuse::Result<f64> {
        let mut times = Vec::new();
        for _ in 0..args.runs {
            let t = Instant::now();
            f()?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(median(times))
    };
    let q = int.forward(backend, x)?;
    let ms = median_ms(&|| int.forward(backend, x))?;
    // On the GPU, also the device-resident model: weights uploaded once, intermediates kept
    // on the device.
    let device_ms = match gpu_ctx {
        Some(ctx) => {
            let dev = deploy::GpuIntModel::new(int, ctx)?;
            if dev.forward(x)? != q {
                return Err(qfuse::Error::Gpu(
                    "the device-resident integer model disagrees with the integer forward".into(),
                ));
            }
            Some(median_ms(&|| dev.forward(x))?)
        }
        None => None,
    };
    let bytes = int.to_state_dict()?.to_bytes()?;
    let back = IntModel::from_bytes(&bytes, "the exported model")?;
    let reload_identical = back.forward(backend, x)? == q;
    Ok(Deployed {
        gap,
        requant: args.requant,
        trained_bn: args.epochs > 0 || args.weights.is_some(),
        qat: args.qat_epochs > 0,
        max_abs_diff,
        agree,
        ms,
        device_ms,
        reload_identical,
        exported: args.export.clone(),
        export_bytes: args.export.as_ref().map(|_| bytes),
    })
}
