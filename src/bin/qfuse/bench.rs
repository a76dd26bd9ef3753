//! `qfuse bench [--json FILE] [--quick] [--plot FILE.svg]`: the roofline and the kernel suite
//! of [`qfuse::bench`], printed as a table (with a progress bar while it runs), optionally
//! written as JSON and drawn as a roofline picture (`--plot`; with `--from-json` it draws a
//! saved report without running anything).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use qfuse::bench::{run_suite, BenchConfig};
use serde_json::Value;

use crate::plot;

/// Arguments of `qfuse bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Also write the results as JSON (keys adapter, copy_gbps, fma_gflops, kernels,
    /// fused_speedup_eval, fused_speedup_qat; int8 kernels rate in `gops`).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Smaller tensors, batch-1 convs at fewer shapes, fewer runs: well under a minute on a
    /// CPU adapter (lavapipe).
    #[arg(long)]
    quick: bool,
    /// Run only the benchmarks whose name contains TEXT, or one of its comma-separated parts
    /// (e.g. `bn_train`, `conv2d,conv_bn_relu`); the roofline always runs.
    #[arg(long, value_name = "TEXT")]
    filter: Option<String>,
    /// Batch of the conv benchmarks (full suite: 8, --quick: 1), 1 to 64: `--conv-batch 1`
    /// times the full suite's five conv shapes at batch 1.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    conv_batch: Option<u16>,
    /// Also draw the roofline as SVG: the copy and FMA roofs (log-log GFLOP/s against FLOP
    /// per byte), each kernel with a flop count a point at its arithmetic intensity, fused and
    /// unfused forms of the same work joined by a line.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// With --plot: draw a report saved earlier with --json instead of running the suite.
    #[arg(
        long,
        value_name = "FILE.json",
        requires = "plot",
        conflicts_with_all = ["quick", "json", "filter", "conv_batch"]
    )]
    from_json: Option<PathBuf>,
    /// Keep the GPU caches (conv2d tuning, compiled pipelines) in memory only, instead of the
    /// platform cache directory (`QFUSE_CACHE_DIR` overrides it): every conv class is tuned
    /// again.
    #[arg(long)]
    no_cache: bool,
}

/// A number of a report's JSON object, if present and finite.
fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64).filter(|x| x.is_finite())
}

/// The roofline picture's data from a report's JSON (what `--json` writes): every kernel with
/// a flop (or int8 op) count as a point, and the fused / unfused rows of the same group and
/// shape as pairs.
///
/// Errors: a report without finite `copy_gbps` / `fma_gflops` or without a `kernels` list.
fn roofline_plot(report: &Value, mode: &str) -> qfuse::Result<plot::RooflinePlot> {
    let bad = |what: &str| qfuse::Error::invalid(format!("bench report JSON: {what}"));
    let copy_gbps = num(report, "copy_gbps").ok_or_else(|| bad("no `copy_gbps` number"))?;
    let fma_gflops = num(report, "fma_gflops").ok_or_else(|| bad("no `fma_gflops` number"))?;
    let kernels = report["kernels"]
        .as_array()
        .ok_or_else(|| bad("no `kernels` list"))?;
    let text = |k: &Value, key: &str| k[key].as_str().unwrap_or("").to_string();
    let mut points = Vec::new();
    let mut memory_bound = 0;
    for k in kernels {
        let name = text(k, "name");
        if name.starts_with("roofline/") {
            continue;
        }
        let flops = num(k, "flops").zip(num(k, "gflops"));
        let ops = num(k, "ops").zip(num(k, "gops"));
        let (work, rate, int8) = match (flops, ops) {
            (Some((f, r)), _) => (f, r, false),
            (None, Some((o, r))) => (o, r, true),
            (None, None) => {
                memory_bound += 1;
                continue;
            }
        };
        let Some(bytes) = num(k, "bytes").filter(|b| *b > 0.0) else {
            continue;
        };
        let (group, variant) = name.rsplit_once('/').unwrap_or((name.as_str(), ""));
        let series = match variant {
            "fused_prefolded" => format!("prefolded ({group})"),
            "fused" => format!("fused ({group})"),
            "unfused" => format!("unfused ({group})"),
            _ if int8 => "int8 (GOP/s)".to_string(),
            _ => group.to_string(),
        };
        points.push(plot::RooflinePoint {
            label: format!("{name} {}", text(k, "shape")),
            series,
            intensity: work / bytes,
            rate,
        });
    }
    let mut pairs = Vec::new();
    for k in kernels {
        let name = text(k, "name");
        let Some(group) = name.strip_suffix("/fused") else {
            continue;
        };
        let shape = text(k, "shape");
        let find = |n: &str| {
            points
                .iter()
                .position(|p| p.label == format!("{n} {shape}"))
        };
        if let (Some(f), Some(u)) = (find(&name), find(&format!("{group}/unfused"))) {
            let speedup = num(k, "speedup")
                .map(|s| format!(" x{s:.2}"))
                .unwrap_or_default();
            let short = group.trim_start_matches("conv_bn_relu_");
            // The input shape names the conv here (the weight follows from the suite's shapes).
            let input = shape.split_whitespace().next().unwrap_or("");
            pairs.push((f, u, format!("{short} {input}{speedup}")));
        }
    }
    Ok(plot::RooflinePlot {
        title: format!("qfuse roofline: {} ({mode})", text(report, "adapter")),
        copy_gbps,
        fma_gflops,
        points,
        pairs,
        note: format!(
            "Fused and unfused forms of the same work share an intensity (same flops, same \
             minimal bytes): each pair is joined and labelled with unfused/fused time.\n\
             {memory_bound} memory-bound kernels (fake quant, observers, folding: no flop count) \
             are in the table only."
        ),
    })
}

/// Draws a saved report (`--from-json`) to `out`.
fn plot_saved(src: &std::path::Path, out: &std::path::Path) -> qfuse::Result<ExitCode> {
    let text = std::fs::read_to_string(src).map_err(|e| qfuse::Error::Io {
        path: src.display().to_string(),
        source: e,
    })?;
    let report: Value = serde_json::from_str(&text).map_err(|e| {
        qfuse::Error::invalid(format!(
            "{} is not a bench report (JSON): {e}",
            src.display()
        ))
    })?;
    let svg = plot::roofline_svg(&roofline_plot(&report, "saved report")?)?;
    plot::write_svg(out, &svg, &[src])?;
    eprintln!("wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}

/// Runs the suite on the system's GPU adapter (an error when there is none); with
/// `--from-json` only draws a saved report.
pub fn run(args: &BenchArgs) -> qfuse::Result<ExitCode> {
    if let (Some(src), Some(out)) = (&args.from_json, &args.plot) {
        return plot_saved(src, out);
    }
    let ctx = Arc::new(crate::cache_dir::open(args.no_cache)?);
    let mut cfg = if args.quick {
        BenchConfig::quick()
    } else {
        BenchConfig::full()
    };
    cfg.filter.clone_from(&args.filter);
    if let Some(n) = args.conv_batch {
        cfg.conv_batch = usize::from(n);
    }
    eprintln!("adapter: {}", ctx.name());
    eprintln!("{}", cfg.describe());
    if args.quick {
        eprintln!("(--quick: smaller tensors, batch 1, fewer shapes and runs than the full suite)");
    }
    let bar = ProgressBar::new(cfg.steps(&ctx) as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let result = run_suite(&ctx, &cfg, &mut |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
        bar.set_message(p.label.clone());
    });
    bar.finish_and_clear();
    let report = result?;
    println!("{}", report.table());
    if args.quick {
        println!("(quick mode: not the full suite; run `qfuse bench` for the figures to quote)");
    }
    if let Err(e) = ctx.persist_caches() {
        eprintln!("note: {e}");
    }
    if let Some(path) = &args.json {
        report.write_json(path)?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &args.plot {
        let mode = if args.quick { "--quick" } else { "full suite" };
        let json: Value = serde_json::from_str(&report.to_json()?)
            .map_err(|e| qfuse::Error::invalid(format!("bench report JSON: {e}")))?;
        let svg = plot::roofline_svg(&roofline_plot(&json, mode)?)?;
        let inputs: Vec<&std::path::Path> = args.json.as_deref().into_iter().collect();
        plot::write_svg(path, &svg, &inputs)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
