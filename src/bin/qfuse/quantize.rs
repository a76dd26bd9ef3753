//! `qfuse quantize MODEL.onnx --calib DATA.safetensors -o OUT.onnx [--batch N]
//! [--max-batches N] [--backend cpu|gpu|auto]`: BatchNorm folding, calibration and QDQ export
//! ([`qfuse::onnx::quantize_model`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use ndarray::{Axis, Slice};
use qfuse::io::file::Outputs;
use qfuse::io::state_dict::load_state_dict;
use qfuse::io::text::{escape, escape_path};
use qfuse::onnx::{fold_model, quantize_model, to_int_model, OnnxModel};

use qfuse::{Backend, CpuBackend, GpuBackend};

use crate::fold::FoldBackend;

/// Arguments of `qfuse quantize`.
#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// The float ONNX model (opset 13 or later). It is never modified.
    input: PathBuf,
    /// Calibration data (safetensors): a float tensor named as the model's input (or the only
    /// tensor of the file), batch along its first dim.
    #[arg(long, value_name = "DATA.safetensors")]
    calib: PathBuf,
    /// Calibration batch size (default: the model's static batch dim, else 32).
    #[arg(long)]
    batch: Option<usize>,
    /// Observe at most this many batches.
    #[arg(long, default_value_t = 64)]
    max_batches: usize,
    /// Where the float graph runs during calibration.
    #[arg(long, value_enum, default_value_t = FoldBackend::Auto)]
    backend: FoldBackend,
    /// Also write qfuse's integer model of the same graph (deploy::IntModel, safetensors): for
    /// graphs of convs, linears, ReLU/ReLU6, max pools, flattens and residual adds.
    #[arg(long, value_name = "OUT.safetensors")]
    int_model: Option<PathBuf>,
    /// The QDQ model to write; must not be the input.
    #[arg(short = 'o', long = "output", value_name = "OUT.onnx")]
    output: PathBuf,
}

/// Runs `qfuse quantize`.
pub fn run(args: &QuantizeArgs) -> qfuse::Result<ExitCode> {
    let outputs = Outputs::new(&[&args.input, &args.calib]);
    let mut dests = vec![args.output.as_path()];
    dests.extend(args.int_model.as_deref());
    outputs.check_all(&dests)?;
    let model = OnnxModel::load(&args.input)?;
    let [input] = model.graph.inputs.as_slice() else {
        return Err(qfuse::Error::invalid(format!(
            "qfuse quantize feeds models with one input; {} has {}",
            escape_path(&args.input),
            model.graph.inputs.len()
        )));
    };
    let data = load_state_dict(&args.calib)?;
    let names = data.names();
    let name = if data.contains(&input.name) {
        input.name.clone()
    } else if let [only] = names.as_slice() {
        only.to_string()
    } else {
        return Err(qfuse::Error::MissingTensor {
            name: input.name.clone(),
            context: format!(" in {}", escape_path(&args.calib)),
        });
    };
    let x = data.f32(&name)?;
    if x.ndim() == 0 || x.shape()[0] == 0 {
        return Err(qfuse::Error::invalid(format!(
            "calibration tensor `{}` has no batch dim or no samples: {:?}",
            escape(&name),
            x.shape()
        )));
    }
    let declared = input.shape.first().copied().flatten();
    let batch = args.batch.or(declared).unwrap_or(32).max(1);
    if declared.is_some_and(|d| d != batch) {
        return Err(qfuse::Error::invalid(format!(
            "the model's input has a static batch of {}, --batch {batch} differs",
            declared.unwrap_or(0)
        )));
    }
    let n = x.shape()[0];
    let full = n / batch;
    let count = if declared.is_some() {
        full
    } else {
        n.div_ceil(batch)
    }
    .min(args.max_batches);
    if count == 0 {
        return Err(qfuse::Error::invalid(format!(
            "{n} calibration samples do not fill one batch of {batch}"
        )));
    }
    let batches: Vec<Vec<(String, ndarray::ArrayD<f32>)>> = (0..count)
        .map(|b| {
            let end = ((b + 1) * batch).min(n);
            let slice = x
                .slice_axis(Axis(0), Slice::from(b * batch..end))
                .to_owned();
            vec![(input.name.clone(), slice)]
        })
        .collect();
    match args.backend {
        FoldBackend::Cpu => quantize_on(args, outputs, &model, &batches, batch, &CpuBackend),
        FoldBackend::Gpu => {
            let gpu = GpuBackend::from_system()?;
            quantize_on(args, outputs, &model, &batches, batch, &gpu)
        }
        FoldBackend::Auto => match GpuBackend::from_system() {
            Ok(gpu) => quantize_on(args, outputs, &model, &batches, batch, &gpu),
            Err(why) => {
                eprintln!("no GPU adapter ({why}); the CPU reference calibrates");
                quantize_on(args, outputs, &model, &batches, batch, &CpuBackend)
            }
        },
    }
}

/// The calibration, the exports and the report, on `backend`.
fn quantize_on<B: Backend>(
    args: &QuantizeArgs,
    mut outputs: Outputs,
    model: &OnnxModel,
    batches: &[Vec<(String, ndarray::ArrayD<f32>)>],
    batch: usize,
    backend: &B,
) -> qfuse::Result<ExitCode> {
    let q = quantize_model(backend, model, batches)?;
    outputs.stage(&args.output, &q.model.to_bytes())?;
    let int_model = match &args.int_model {
        Some(path) => {
            let folded = fold_model(backend, model)?;
            let im = to_int_model(backend, &folded.model.graph, batches)?;
            outputs.stage(path, &im.to_state_dict()?.to_bytes()?)?;
            Some((path, im.nodes.len()))
        }
        None => None,
    };
    outputs.commit()?;
    for f in &q.folds {
        println!(
            "folded `{}` into `{}` (eps {})",
            escape(&f.bn),
            escape(&f.head),
            f.epsilon
        );
    }
    for op in &q.ops {
        println!(
            "quantized `{}` ({}): input `{}` scale {} zp {}, output `{}` scale {} zp {}, weight {} scales",
            escape(&op.node),
            op.op_type,
            escape(&op.input.0),
            op.input.1.scale[0],
            op.input.1.zero_point[0],
            escape(&op.output.0),
            op.output.1.scale[0],
            op.output.1.zero_point[0],
            op.weight.scale.len()
        );
    }
    println!(
        "wrote {} ({} BatchNorms folded, {} ops quantized, {} calibration batches of {batch}) on {}",
        escape_path(&args.output),
        q.folds.len(),
        q.ops.len(),
        q.batches,
        backend.name()
    );
    if let Some((path, nodes)) = int_model {
        println!("wrote {} (integer model, {nodes} nodes)", escape_path(path));
    }
    Ok(ExitCode::SUCCESS)
}
