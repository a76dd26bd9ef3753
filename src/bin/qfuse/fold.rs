//! `qfuse fold IN.safetensors --fuse LAYER,BN[,RELU][:eps=E][:transpose] [--fuse ...]
//! [--transpose] [--eps E]
//! [--backend cpu|gpu|auto] -o OUT.safetensors`: a thin layer over
//! [`qfuse::fold_state_dict::FoldJob`], which reads and checks the input before a GPU is
//! opened. `--graph MODEL.onnx` takes the fusions from the ONNX export of the same model
//! instead of `--fuse`; `qfuse fold MODEL.onnx -o OUT.onnx` folds an ONNX model
//! ([`qfuse::onnx::fold_file`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use qfuse::backend::{best_available, CpuBackend, GpuBackend, HostOps};
use qfuse::fold_state_dict::{FoldJob, FoldSpec, DEFAULT_EPS};
use qfuse::io::file::Outputs;
use qfuse::io::text::{escape, escape_path};
use qfuse::onnx::{fold_model, state_dict_specs, OnnxModel};

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
    /// The PyTorch state dict to fold (safetensors), or an ONNX model (a name ending in
    /// `.onnx`: every Conv/ConvTranspose/Gemm + BatchNormalization chain is found and folded,
    /// no flags needed). It is never modified.
    input: PathBuf,
    /// A fusion: LAYER,BN folds the BatchNorm BN into the conv or linear LAYER (rank-2
    /// weight = linear, rank >= 3 = conv); LAYER,BN,RELU writes PyTorch's ConvReLU names
    /// LAYER.0.weight / LAYER.0.bias. Options for this fusion only, after a colon:
    /// `:eps=E` (this BatchNorm's eps) and `:transpose` (a ConvTranspose weight), combinable
    /// (`up,bn2:transpose:eps=1e-3`). Repeat for more fusions.
    #[arg(
        long = "fuse",
        value_name = "LAYER,BN[,RELU][:eps=E][:transpose]",
        conflicts_with = "graph"
    )]
    fuse: Vec<String>,
    /// Instead of --fuse: the ONNX export of the same model (torch.onnx.export in eval mode,
    /// BatchNorm kept); every Conv/ConvTranspose/Gemm + BatchNormalization chain in it names a
    /// fusion by its initializers (MODULE.weight), with the BatchNorm's own epsilon.
    #[arg(long, value_name = "MODEL.onnx")]
    graph: Option<PathBuf>,
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

fn is_onnx(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
}

pub(crate) fn backend_for(choice: FoldBackend) -> qfuse::Result<Box<dyn HostOps>> {
    Ok(match choice {
        FoldBackend::Cpu => Box::new(CpuBackend),
        FoldBackend::Gpu => Box::new(GpuBackend::from_system()?),
        FoldBackend::Auto => {
            let (b, fallback) = best_available();
            if let Some(why) = fallback {
                eprintln!("no GPU adapter ({why}); the CPU reference folds");
            }
            b
        }
    })
}

/// `qfuse fold MODEL.onnx -o OUT.onnx`.
fn run_onnx(args: &FoldArgs) -> qfuse::Result<ExitCode> {
    if !args.fuse.is_empty() || args.graph.is_some() || args.transpose {
        return Err(qfuse::Error::invalid(
            "an ONNX model is folded from its own graph: --fuse, --graph and --transpose do \
             not apply (each BatchNormalization's epsilon is its own)",
        ));
    }
    // The output is checked and the model read before a GPU is opened.
    Outputs::new(&[&args.input]).check(&args.output)?;
    let model = OnnxModel::load(&args.input)?;
    let backend = backend_for(args.backend)?;
    let folded = fold_model(backend.as_ref(), &model)?;
    folded.model.write(&args.output, &[&args.input])?;
    for f in &folded.folds {
        println!(
            "folded `{}` into `{}` ({}, eps {}, weight {:?}){}",
            escape(&f.bn),
            escape(&f.head),
            f.types.join(" + "),
            f.epsilon,
            f.weight_shape,
            f.act
                .as_ref()
                .map(|a| format!("; activation `{}` kept", escape(a)))
                .unwrap_or_default()
        );
    }
    println!(
        "wrote {} ({} BatchNorms folded, {} nodes left) on {}",
        escape_path(&args.output),
        folded.folds.len(),
        folded.model.graph.nodes.len(),
        backend.name()
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `qfuse fold`.
pub fn run(args: &FoldArgs) -> qfuse::Result<ExitCode> {
    if is_onnx(&args.input) {
        return run_onnx(args);
    }
    let specs = match &args.graph {
        Some(graph) => {
            let model = OnnxModel::load(graph)?;
            let specs = state_dict_specs(&model.graph)?;
            if specs.is_empty() {
                return Err(qfuse::Error::invalid(format!(
                    "{} has no Conv/ConvTranspose/Gemm + BatchNormalization chain to fold",
                    escape_path(graph)
                )));
            }
            specs
        }
        None => {
            if args.fuse.is_empty() {
                return Err(qfuse::Error::invalid(
                    "give the fusions: --fuse LAYER,BN (repeatable) or --graph MODEL.onnx",
                ));
            }
            args.fuse
                .iter()
                .map(|f| FoldSpec::parse_with_defaults(f, args.eps, args.transpose))
                .collect::<qfuse::Result<Vec<_>>>()?
        }
    };
    let job = FoldJob::prepare(&args.input, &args.output, &specs)?;
    let backend = backend_for(args.backend)?;
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
