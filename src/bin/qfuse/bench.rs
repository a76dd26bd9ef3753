//! `qfuse bench [--json FILE] [--quick]`: the roofline and the kernel suite of
//! [`qfuse::bench`], printed as a table (with a progress bar while it runs) and optionally
//! written as JSON.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use qfuse::bench::{run_suite, BenchConfig};
use qfuse::gpu::GpuContext;

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
}

/// Runs the suite on the system's GPU adapter (an error when there is none).
pub fn run(args: &BenchArgs) -> qfuse::Result<ExitCode> {
    let ctx = Arc::new(GpuContext::new()?);
    let cfg = if args.quick {
        BenchConfig::quick()
    } else {
        BenchConfig::full()
    };
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
    if let Some(path) = &args.json {
        report.write_json(path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
