//! `qfuse fold IN.safetensors --fuse LAYER,BN[,RELU][:eps=E][:transpose] [--fuse ...]
//! [--transpose] [--eps E]
//! [--backend cpu|gpu|auto] -o OUT.safetensors`: a thin layer over
//! [`qfuse::fold_state_dict::FoldJob`], which reads and checks the input before a GPU is
//! opened.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use qfuse::backend::{best_available, CpuBackend, GpuBackend, HostOps};
use qfuse::fold_state_dict::{FoldJob, FoldSpec, DEFAULT_EPS};
use qfuse::io::text::{escape, escape_path};

/// Names from the input, escaped, comma-separated.
fn joined(names: &[String]) -> String {
    names
        .iter()
        .map(|n| escape(n))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where the folds run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FoldBackend {
    /// The CPU reference.
    Cpu,
    /// The WGSL kernels on the system's GPU adapter (an error when there is none).
    Gpu,
    /// The GPU when an adapter can be opened, else the CPU reference (said on stderr).
    Auto,
}

/// Arguments of `qfuse fold`.
#[derive(Args, Debug)]
pub struct FoldArgs {
    /// The PyTorch state dict to fold (safetensors). It is never modified.
    input: PathBuf,
    /// A fusion: LAYER,BN folds the BatchNorm BN into the conv or linear LAYER (rank-2
    /// weight = linear, rank >= 3 = conv); LAYER,BN,RELU writes PyTorch's ConvReLU names
    /// LAYER.0.weight / LAYER.0.bias. Options for this fusion only, after a colon:
    /// `:eps=E` (this BatchNorm's eps) and `:transpose` (a ConvTranspose weight), combinable
    /// (`up,bn2:transpose:eps=1e-3`). Repeat for more fusions.
    #[arg(
        long = "fuse",
        value_name = "LAYER,BN[,RELU][:eps=E][:transpose]",
        required = true
    )]
    fuse: Vec<String>,
    /// The conv weights are ConvTranspose weights [Cin, Cout/groups, k...]: the default for
    /// every fusion without its own `:transpose` / `:transpose=false`.
    #[arg(long)]
    transpose: bool,
    /// The BatchNorms' eps (state dicts do not store it): the default for every fusion without
    /// its own `:eps=E`.
    #[arg(long, default_value_t = DEFAULT_EPS, allow_negative_numbers = true)]
    eps: f32,
    /// Where the folds run.
    #[arg(long, value_enum, default_value_t = FoldBackend::Auto)]
    backend: FoldBackend,
    /// The folded state dict to write (safetensors); must not be the input file.
    #[arg(short = 'o', long = "output", value_name = "OUT.safetensors")]
    output: PathBuf,
}

/// Runs `qfuse fold`.
pub fn run(args: &FoldArgs) -> qfuse::Result<ExitCode> {
    let specs = args
        .fuse
        .iter()
        .map(|f| FoldSpec::parse_with_defaults(f, args.eps, args.transpose))
        .collect::<qfuse::Result<Vec<_>>>()?;
    let job = FoldJob::prepare(&args.input, &args.output, &specs)?;
    let backend: Box<dyn HostOps> = match args.backend {
        FoldBackend::Cpu => Box::new(CpuBackend),
        FoldBackend::Gpu => Box::new(GpuBackend::from_system()?),
        FoldBackend::Auto => {
            let (b, fallback) = best_available();
            if let Some(why) = fallback {
                eprintln!("no GPU adapter ({why}); the CPU reference folds");
            }
            b
        }
    };
    let report = job.run(backend.as_ref())?;
    for f in &report.folded {
        println!(
            "folded `{}` into {} `{}` (weight {:?}) -> {}; dropped {}",
            escape(&f.spec.bn),
            f.kind,
            escape(&f.spec.layer),
            f.weight_shape,
            joined(&f.written),
            if f.dropped.is_empty() {
                "nothing".to_string()
            } else {
                joined(&f.dropped)
            }
        );
    }
    println!(
        "wrote {} ({} tensors: {} folded, {} copied unchanged) on {}",
        escape_path(&args.output),
        report.total,
        report.total - report.copied,
        report.copied,
        backend.name()
    );
    Ok(ExitCode::SUCCESS)
}
