//! `qfuse demo [--weights FILE.safetensors [--prefix P]] [--batch N] [--seed S]
//! [--backend cpu|gpu|auto] [--json FILE]`: the Mnist network of NNI's module-fusion example,
//! quantized with NNI's example config (fuse conv1 with batchnorm1; int8 affine on conv1's
//! input, weight and output), run in float, fused float and simulated int8 on one backend,
//! and compared; then the whole network deployed in integer form (`qfuse::deploy`), and the
//! measured gap between its outputs and the fused and unfused fake-quant simulations.
//!
//! The input is a seeded batch of synthetic MNIST-like images
//! ([`qfuse::model::mnist::synthetic_batch`]): no dataset can be downloaded here, so the
//! comparison is numerical (each model against float), not an accuracy.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, ValueEnum};
use ndarray::{ArrayD, Axis};
use qfuse::backend::{Backend, CpuBackend, GpuBackend, HostOps};
use qfuse::config::{self, QuantMode};
use qfuse::deploy;
use qfuse::gpu::GpuContext;
use qfuse::io::file::Outputs;
use qfuse::io::state_dict::load_state_dict;
use qfuse::io::text::{escape, escape_path};
use qfuse::limits::{MAX_DEMO_BATCH, MAX_DEMO_CALIBRATION_BATCHES, MAX_DEMO_RUNS};
use qfuse::model::mnist;
use qfuse::nn::Module;
use qfuse::quant::RequantMode;
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
    /// Mnist weights: a PyTorch state dict (`safetensors.torch.save_file(Mnist().state_dict(),
    /// FILE)`). Without it the network gets PyTorch's default initialisation, seeded by --seed.
    #[arg(long, value_name = "FILE.safetensors")]
    weights: Option<PathBuf>,
    /// The prefix of the Mnist tensors in --weights (`in.model.` for the golden
    /// model_mnist_ptq case file).
    #[arg(long, default_value = "", requires = "weights")]
    prefix: String,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Seed of the synthetic input batches (and of the weights without --weights).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the models run.
    #[arg(long, value_enum, default_value_t = DemoBackend::Auto)]
    backend: DemoBackend,
    /// Also write the table as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Timed runs per model (the table shows their median).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Calibration batches (synthetic, seeds S+1, S+2, ...; the compared batch is not one of
    /// them).
    #[arg(long, default_value_t = 2)]
    calibration_batches: usize,
    /// Requantization arithmetic of the deployed integer model.
    #[arg(long, value_enum, default_value_t = DemoRequant::Float)]
    requant: DemoRequant,
    /// Also save the deployed integer model (int8 weights, i32 biases, scales) to this
    /// safetensors file.
    #[arg(long, value_name = "FILE.safetensors")]
    export: Option<PathBuf>,
    /// Also draw the results as SVG: each stage's agreement with the float model, and the
    /// per-layer fraction of identical integer codes, fused against unfused simulation.
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

/// One row of the table.
struct Row {
    model: &'static str,
    max_abs_diff: f32,
    agree: usize,
    ms: f64,
}

fn argmax(y: &ArrayD<f32>) -> Vec<usize> {
    y.axis_iter(Axis(0))
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                    if v > bv {
                        (i, v)
                    } else {
                        (bi, bv)
                    }
                })
                .0
        })
        .collect()
}

/// One untimed forward (its output, and a warm-up for the GPU's pipelines), then `runs`
/// timed ones: the output and the median time in ms.
fn measure(
    model: &mut Module,
    b: &dyn HostOps,
    x: &ArrayD<f32>,
    runs: usize,
) -> qfuse::Result<(ArrayD<f32>, f64)> {
    let y = model.forward(b, x)?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        model.forward(b, x)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let mid = times.len() / 2;
    let median = if times.len() % 2 == 1 {
        times[mid]
    } else {
        (times[mid - 1] + times[mid]) / 2.0
    };
    Ok((y, median))
}

/// Runs `qfuse demo`.
pub fn run(args: &DemoArgs) -> qfuse::Result<ExitCode> {
    if args.batch == 0 || args.runs == 0 || args.calibration_batches == 0 {
        return Err(qfuse::Error::invalid(
            "--batch, --runs and --calibration-batches must be at least 1",
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
    // The outputs are checked before any work (never an input, through links too; regular
    // files), written to temporaries at the end and renamed only when all are written.
    let inputs: Vec<&std::path::Path> = args.weights.iter().map(PathBuf::as_path).collect();
    let mut outputs = Outputs::new(&inputs);
    for path in args.export.iter().chain(&args.json).chain(&args.plot) {
        outputs.check(path)?;
    }
    // The model first: a bad weights file fails before a GPU is opened.
    let (mut model, weights_desc) = match &args.weights {
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
    model.eval();

    let mut gpu_ctx: Option<Arc<GpuContext>> = None;
    let (backend, kind, adapter, fallback): (
        Box<dyn HostOps>,
        &str,
        Option<String>,
        Option<String>,
    ) = match args.backend {
        DemoBackend::Cpu => (Box::new(CpuBackend), "cpu", None, None),
        DemoBackend::Gpu => {
            let g = GpuBackend::from_system()?;
            let name = g.context().name();
            gpu_ctx = Some(Arc::clone(g.context()));
            (Box::new(g), "gpu", Some(name), None)
        }
        DemoBackend::Auto => match GpuBackend::from_system() {
            Ok(g) => {
                let name = g.context().name();
                gpu_ctx = Some(Arc::clone(g.context()));
                (Box::new(g), "gpu", Some(name), None)
            }
            Err(e) => {
                eprintln!("no GPU adapter ({e}): running on the CPU reference");
                (Box::new(CpuBackend), "cpu", None, Some(e.to_string()))
            }
        },
    };
    let b = backend.as_ref();

    let x = mnist::synthetic_batch(args.batch, args.seed).into_dyn();
    let calibration: Vec<ArrayD<f32>> = (1..=args.calibration_batches as u64)
        .map(|k| mnist::synthetic_batch(args.batch, args.seed.wrapping_add(k)).into_dyn())
        .collect();
    let cfg = mnist::nni_example_config();

    let (y_float, ms_float) = measure(&mut model, b, &x, args.runs)?;
    let mut quant = model.clone();
    config::apply(&mut quant, &cfg, QuantMode::Ptq)?;
    config::calibrate(&mut quant, b, calibration.iter())?;
    config::set_fake_quant_enabled(&mut quant, false);
    let (y_fused, ms_fused) = measure(&mut quant, b, &x, args.runs)?;
    config::set_fake_quant_enabled(&mut quant, true);
    let (y_int8, ms_int8) = measure(&mut quant, b, &x, args.runs)?;

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
    let rows = [
        row("float", &y_float, ms_float),
        row("fused", &y_fused, ms_fused),
        row("simulated int8", &y_int8, ms_int8),
    ];
    let qparams = config::qparams(&quant);
    let deployed = match &gpu_ctx {
        Some(ctx) => deploy_section(
            args,
            &model,
            &GpuBackend::new(Arc::clone(ctx)),
            gpu_ctx.clone(),
            &x,
            &calibration,
            &y_float,
        )?,
        None => deploy_section(args, &model, &CpuBackend, None, &x, &calibration, &y_float)?,
    };

    let backend_cell = match (&adapter, &fallback) {
        (Some(_), _) => "gpu".to_string(),
        (None, Some(_)) => "cpu (no GPU adapter)".to_string(),
        (None, None) => "cpu".to_string(),
    };
    // ---- the outputs, written before the table says where they went
    if let (Some(path), Some(bytes)) = (&args.export, &deployed.export_bytes) {
        outputs.stage(path, bytes)?;
    }
    if let Some(path) = &args.json {
        let doc = json!({
            "backend": kind,
            "adapter": adapter,
            "fallback": fallback,
            "batch": args.batch,
            "seed": args.seed,
            "weights": args.weights.as_ref().map(|p| p.display().to_string()),
            "prefix": args.prefix,
            "calibration_batches": args.calibration_batches,
            "runs": args.runs,
            "config": cfg.to_value(),
            "rows": rows.iter().map(|r| json!({
                "model": r.model,
                "max_abs_diff": r.max_abs_diff,
                "argmax_agreement": r.agree as f64 / args.batch as f64,
                "ms_per_batch": r.ms,
                "backend": kind,
            })).collect::<Vec<Value>>(),
            "qparams": qparams.iter().map(|(p, t, qp)| {
                (format!("{p}.{t}"), json!([qp.scale[0], qp.zero_point[0]]))
            }).collect::<serde_json::Map<String, Value>>(),
            "int8_identical_fraction_fused": deployed.gap.fused.identical_fraction(),
            "int8_max_step_diff_fused": deployed.gap.fused.max_step_diff,
            "int8_identical_fraction_unfused": deployed.gap.unfused.identical_fraction(),
            "int8_max_step_diff_unfused": deployed.gap.unfused.max_step_diff,
            "deployment": deployed.json(args.batch),
        });
        let text = serde_json::to_string_pretty(&doc)
            .map_err(|e| qfuse::Error::invalid(format!("JSON: {e}")))?;
        outputs.stage(path, (text + "\n").as_bytes())?;
    }
    if let Some(path) = &args.plot {
        // Synthetic images have no labels, so each stage is scored by its argmax agreement
        // with the float model (said in the picture); the float stage is 100% by definition.
        let stages: Vec<(String, f64)> = rows
            .iter()
            .map(|r| (r.model.to_string(), r.agree as f64 / args.batch as f64))
            .chain([(
                "int8 deployed".to_string(),
                deployed.agree as f64 / args.batch as f64,
            )])
            .collect();
        let layers: Vec<(String, f64, f64)> = deployed
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
            "qfuse demo: NNI's Mnist, {} synthetic images (seed {}), {}",
            args.batch, args.seed, backend_cell
        );
        let svg = plot::demo_svg(&title, "argmax agreement with float", &stages, &layers)?;
        outputs.stage(path, svg.as_bytes())?;
    }
    // The outputs appear together, or (on an error above) none of them.
    outputs.commit()?;
    if let Some(path) = &args.plot {
        eprintln!("wrote {}", escape_path(path));
    }

    // ---- the table
    println!("qfuse demo: the Mnist network of NNI's module-fusion example");
    println!("weights:  {weights_desc}");
    println!(
        "input:    {} synthetic MNIST-like images (seed {}; no dataset download here), \
         calibrated on {} more",
        args.batch, args.seed, args.calibration_batches
    );
    println!(
        "config:   fuse conv1+batchnorm1; int8 affine per tensor on conv1 _input_, weight, \
         _output_"
    );
    match (&adapter, &fallback) {
        (Some(a), _) => println!("backend:  gpu: {a}"),
        (None, Some(why)) => println!("backend:  cpu (the CPU reference: no GPU adapter: {why})"),
        (None, None) => println!("backend:  cpu (the CPU reference)"),
    }
    println!();
    println!(
        "{:<16} {:>20} {:>20} {:>10}   backend",
        "model", "max |diff| vs float", "argmax = float", "ms/batch"
    );
    for r in &rows {
        let agree = format!(
            "{}/{} ({:.1}%)",
            r.agree,
            args.batch,
            100.0 * r.agree as f64 / args.batch as f64
        );
        println!(
            "{:<16} {:>20.3e} {:>20} {:>10.2}   {backend_cell}",
            r.model, r.max_abs_diff, agree, r.ms
        );
    }
    println!();
    println!(
        "ms/batch: median of {} forwards through the Backend interface (host arrays in and \
         out of every op)",
        args.runs
    );
    for (path, target, qp) in &qparams {
        println!(
            "qparams {path}.{target}: scale {:.6e}, zero point {}",
            qp.scale[0], qp.zero_point[0]
        );
    }
    deployed.print(args.batch, &backend_cell);

    Ok(ExitCode::SUCCESS)
}

/// The deployed integer model's section of the demo.
struct Deployed {
    gap: deploy::GapReport,
    requant: DemoRequant,
    trained_bn: bool,
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
            "deployment: every conv and linear in int8 (per-channel symmetric weights, int8 \
             affine activations, i32 bias at s_in*s_w), BN folded, ReLU6 as the clamp, {} \
             requantization{}",
            self.requant.as_typed(),
            if self.trained_bn {
                "; batchnorm1 given trained-like statistics (the seeded init's BN is an \
                 identity)"
            } else {
                ""
            }
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

/// Converts the float Mnist to integer form (calibrated on `calibration`), measures the gap
/// against the fused and unfused simulations on `x`, times the integer forward, and checks a
/// safetensors round trip.
#[allow(clippy::too_many_arguments)]
fn deploy_section<B: Backend>(
    args: &DemoArgs,
    model: &Module,
    backend: &B,
    gpu_ctx: Option<Arc<GpuContext>>,
    x: &ArrayD<f32>,
    calibration: &[ArrayD<f32>],
    y_float: &ArrayD<f32>,
) -> qfuse::Result<Deployed> {
    let b: &dyn HostOps = backend;
    let mut m = model.clone();
    // A freshly initialised BN (mean 0, var 1, gamma 1, beta 0) folds into nothing; give it
    // the statistics of the calibration data so that folding matters, as after training.
    let trained_bn = args.weights.is_none();
    if trained_bn {
        let first = calibration[0]
            .clone()
            .into_dimensionality::<ndarray::Ix4>()
            .map_err(|e| qfuse::Error::invalid(e.to_string()))?;
        mnist::set_trained_bn_stats(&mut m, &first, args.seed)?;
    }
    let requant = match args.requant {
        DemoRequant::Float => RequantMode::Float,
        DemoRequant::FixedPoint => RequantMode::FixedPoint,
    };
    let cfg = deploy::DeployConfig {
        requant,
        ..Default::default()
    };
    let net = mnist::deploy_net(&m)?;
    let int = deploy::convert(&net, b, calibration.iter(), &cfg)?;
    let gap = deploy::measure_gap(&net, &int, &cfg, backend, x)?;
    // The deployed model's log-probabilities against the float model's (the float model with
    // the same BN statistics, so the comparison is the quantization's alone).
    let float_ref = if trained_bn {
        let mut fm = m.clone();
        fm.forward(b, x)?
    } else {
        y_float.clone()
    };
    let logits = int.forward_dequantized(backend, x)?;
    let logits2 = logits
        .into_dimensionality::<ndarray::Ix2>()
        .map_err(|e| qfuse::Error::invalid(e.to_string()))?;
    let y = b.log_softmax(&logits2)?.into_dyn();
    let labels = argmax(&float_ref);
    let agree = argmax(&y)
        .iter()
        .zip(&labels)
        .filter(|(a, b)| a == b)
        .count();
    let max_abs_diff = y
        .iter()
        .zip(&float_ref)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    let median_ms = |f: &dyn Fn() -> qfuse::Result<ArrayD<i8>>| -> qfuse::Result<f64> {
        let mut times = Vec::new();
        for _ in 0..args.runs {
            let t = Instant::now();
            f()?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    };
    let q = int.forward(backend, x)?;
    let ms = median_ms(&|| int.forward(backend, x))?;
    // On the GPU, also the device-resident model: weights uploaded once, intermediates kept
    // on the device.
    let device_ms = match gpu_ctx {
        Some(ctx) => {
            let dev = deploy::GpuIntModel::new(&int, ctx)?;
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
    let back = deploy::IntModel::from_bytes(&bytes, "the exported model")?;
    let reload_identical = back.forward(backend, x)? == q;
    Ok(Deployed {
        gap,
        requant: args.requant,
        trained_bn,
        max_abs_diff,
        agree,
        ms,
        device_ms,
        reload_identical,
        exported: args.export.clone(),
        export_bytes: args.export.as_ref().map(|_| bytes),
    })
}
