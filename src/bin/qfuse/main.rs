//! The `qfuse` command line: conformance against PyTorch's golden cases (and, as later
//! issues land, the demo, folding and benchmarks).

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod bench;
mod cache_dir;
mod conformance;
mod demo;
mod fold;
mod info;
mod plot;
mod quantize;
mod runtime_dir;

#[derive(Parser)]
#[command(
    name = "qfuse",
    version,
    about = "GPU kernels for quantization with module fusion"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which backend(s) to run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// The CPU reference.
    Cpu,
    /// The WGSL kernels on the system's GPU adapter.
    Gpu,
    /// Both, one after the other.
    All,
    /// The GPU when an adapter can be opened, else the CPU reference (said on stderr).
    Auto,
}

#[derive(Subcommand)]
enum Command {
    /// The main job: NNI's Mnist example quantized (fuse conv1+batchnorm1, int8 on conv1) and
    /// run in float, fused and simulated int8 on the GPU (or the CPU), compared in a table.
    Demo(demo::DemoArgs),
    /// Run conformance cases (case files, or folders: every *.safetensors in them) and compare
    /// with PyTorch's outputs.
    Conformance(conformance::ConformanceArgs),
    /// Show the backend qfuse would use (the GPU adapter, its limits, or why the CPU serves)
    /// and what decides which kernels run: subgroups, timestamp queries, the packed int8 dot
    /// product, the cache directory, and the conv2d forward kernel `Auto` has chosen per shape
    /// class.
    Info,
    /// Fold BatchNorms into the conv/linear layers of a PyTorch state dict (safetensors), by
    /// module name, writing the state dict of the fused model.
    Fold(fold::FoldArgs),
    /// Quantize an ONNX model: fold its BatchNorms, calibrate the activations and write the QDQ
    /// model (QuantizeLinear / DequantizeLinear around each conv and linear layer).
    Quantize(quantize::QuantizeArgs),
    /// Benchmark the kernels against the device's roofline (copy bandwidth, fma throughput),
    /// and fused against unfused conv+bn+relu (eval and QAT forward).
    Bench(bench::BenchArgs),
}

/// Rust starts programs with SIGPIPE ignored, so a write to a closed pipe (`qfuse conformance …
/// | head`) makes `println!` panic. Restoring the default action ends the process quietly on a
/// closed pipe with a non-zero status, as Unix tools do.
#[cfg(unix)]
fn default_sigpipe() {
    // SAFETY: the first thing `main` does, before any thread exists; `SIG_DFL` is a valid
    // disposition for SIGPIPE and no handler of ours is replaced.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    #[cfg(unix)]
    default_sigpipe();
    let cli = Cli::parse();
    // Before any thread or GPU instance exists: a private XDG_RUNTIME_DIR when none is set, so
    // that Vulkan drivers built with Wayland support do not print an error on every run.
    let _runtime_dir = runtime_dir::ensure();
    let result = match cli.command {
        Command::Conformance(args) => conformance::run(&args),
        Command::Info => info::run(),
        Command::Demo(args) => demo::run(&args),
        Command::Fold(args) => fold::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Quantize(args) => quantize::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // Names inside are escaped where the message is built; this is the backstop that
            // keeps the error one `error:` line whatever reached it.
            eprintln!("error: {}", qfuse::io::text::escape_message(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}
