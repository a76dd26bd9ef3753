//! `qfuse quantize MODEL.onnx --calib DATA.safetensors -o OUT.onnx [--batch N]
//! [--max-batches N] [--backend cpu|gpu|auto] [--config FILE.json] [--observer
//! minmax|moving-average] [--averaging-constant C] [--activation-dtype int8|uint8]
//! [--int-model OUT.safetensors]`: BatchNorm
//! folding, calibration on the backend and QDQ export ([`qfuse::onnx::quantize_model_with`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use ndarray::{Axis, Slice};
use qfuse::config::ConfigList;
use qfuse::deploy::DeployConfig;
use qfuse::io::file::{read_input, Outputs};
use qfuse::io::state_dict::load_state_dict;
use qfuse::io::text::{escape, escape_path};
use qfuse::onnx::{
    deploy_config_of, quantize_model_with, to_int_model_from, ActivationObserver, OnnxModel,
    QuantizeOptions, MOVING_AVERAGE_CONSTANT,
};
use qfuse::quant::QDtype;

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
    /// Also write qfuse's integer model of the same graph (deploy::IntModel, safetensors),
    /// with the QDQ model's activation qparams (calibrated once): for graphs of convs
    /// (depthwise too), linears, ReLU/ReLU6, max pools (padded too), global average pools,
    /// HardSwish / LeakyRelu, flattens and residual adds.
    #[arg(long, value_name = "OUT.safetensors")]
    int_model: Option<PathBuf>,
    /// An NNI-style config_list (JSON) choosing the nodes and tensors to quantize: op_names
    /// (node names, or MODULE of a weight named MODULE.weight), op_types (Conv2d, Linear,
    /// ... or ONNX op types), exclude_op_names / exclude_op_types, target_names (_input_,
    /// weight, bias, _output_), quant_dtype, quant_scheme, granularity. Nodes it leaves out
    /// stay float. Default: every Conv, ConvTranspose, Gemm and MatMul, int8.
    #[arg(long, value_name = "FILE.json")]
    config: Option<PathBuf>,
    /// The activation observer during calibration: minmax (MinMaxObserver) or moving-average
    /// (MovingAverageMinMaxObserver, averaging constant --averaging-constant).
    #[arg(long, value_enum, default_value_t = ObserverArg::Minmax)]
    observer: ObserverArg,
    /// The moving-average observer's averaging constant (PyTorch's default 0.01).
    #[arg(long, default_value_t = MOVING_AVERAGE_CONSTANT)]
    averaging_constant: f32,
    /// The code type of the QDQ activations: int8, or uint8 (the same codes + 128,
    /// onnxruntime's own QDQ default, which its x86 CPU EP runs on its integer kernels).
    /// Weights stay int8. The integer model's residual adds round as onnxruntime's do on
    /// codes of this type.
    #[arg(long, value_enum, default_value_t = ActivationDtype::Int8)]
    activation_dtype: ActivationDtype,
    /// The QDQ model to write; must not be the input.
    #[arg(short = 'o', long = "output", value_name = "OUT.onnx")]
    output: PathBuf,
}

/// `--activation-dtype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ActivationDtype {
    /// Signed codes, zero points in [-128, 127].
    Int8,
    /// Unsigned codes, zero points in [0, 255].
    Uint8,
}

/// `--observer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ObserverArg {
    /// Running min / max over every batch.
    Minmax,
    /// Moving average of each batch's min / max.
    MovingAverage,
}

/// Runs `qfuse quantize`.
pub fn run(args: &QuantizeArgs) -> qfuse::Result<ExitCode> {
    let mut inputs: Vec<&std::path::Path> = vec![&args.input, &args.calib];
    inputs.extend(args.config.as_deref());
    let outputs = Outputs::new(&inputs);
    let mut dests = vec![args.output.as_path()];
    dests.extend(args.int_model.as_deref());
    outputs.check_all(&dests)?;
    let model = OnnxModel::load(&args.input)?;
    let config = match &args.config {
        Some(path) => {
            let bytes = read_input(path, Some(1 << 20))?;
            let text = std::str::from_utf8(&bytes).map_err(|e| {
                qfuse::Error::invalid(format!("{}: not UTF-8 text: {e}", escape_path(path)))
            })?;
            Some(ConfigList::from_json(text).map_err(|e| match e {
                qfuse::Error::InvalidArgument(m) => {
                    qfuse::Error::invalid(format!("{}: {m}", escape_path(path)))
                }
                other => other,
            })?)
        }
        None => None,
    };
    let activation_codes = match args.activation_dtype {
        ActivationDtype::Int8 => QDtype::QInt8,
        ActivationDtype::Uint8 => QDtype::QUInt8,
    };
    let options = QuantizeOptions {
        activation_codes,
        config,
        observer: match args.observer {
            ObserverArg::Minmax => ActivationObserver::MinMax,
            ObserverArg::MovingAverage => {
                ActivationObserver::MovingAverage(args.averaging_constant)
            }
        },
    };
    // An integer model has one setting for every layer: refuse a config that cannot give one
    // before any work.
    let deploy_config = DeployConfig {
        activation_codes,
        ..match (&args.int_model, &options.config) {
            (Some(_), Some(c)) => deploy_config_of(c)?,
            _ => DeployConfig::default(),
        }
    };
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
    let plan = Plan {
        batch,
        options,
        deploy_config,
    };
    match args.backend {
        FoldBackend::Cpu => quantize_on(args, outputs, &model, &batches, &plan, &CpuBackend),
        FoldBackend::Gpu => {
            let gpu = GpuBackend::from_system()?;
            quantize_on(args, outputs, &model, &batches, &plan, &gpu)
        }
        FoldBackend::Auto => match GpuBackend::from_system() {
            Ok(gpu) => quantize_on(args, outputs, &model, &batches, &plan, &gpu),
            Err(why) => {
                eprintln!("no GPU adapter ({why}); the CPU reference calibrates");
                quantize_on(args, outputs, &model, &batches, &plan, &CpuBackend)
            }
        },
    }
}

/// What `qfuse quantize` does, settled before a backend opens.
struct Plan {
    batch: usize,
    options: QuantizeOptions,
    deploy_config: DeployConfig,
}

/// The calibration, the exports and the report, on `backend`.
fn quantize_on<B: Backend>(
    args: &QuantizeArgs,
    mut outputs: Outputs,
    model: &OnnxModel,
    batches: &[Vec<(String, ndarray::ArrayD<f32>)>],
    plan: &Plan,
    backend: &B,
) -> qfuse::Result<ExitCode> {
    let batch = plan.batch;
    let q = quantize_model_with(backend, model, batches, &plan.options)?;
    outputs.stage(&args.output, &q.model.to_bytes())?;
    let int_model = match &args.int_model {
        Some(path) => {
            if let Some(node) = q.left_float.first() {
                return Err(qfuse::Error::invalid(format!(
                    "--int-model: the config leaves `{}` float, and qfuse's integer model has no \
                     mixed precision (every conv and linear runs on int8 codes); the QDQ export \
                     can keep it float",
                    escape(node)
                )));
            }
            // Calibrated once: the integer model takes the QDQ export's activation qparams.
            let im = to_int_model_from(backend, &q, &batches[0], &plan.deploy_config)?;
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
    let qp = |v: &Option<(String, qfuse::quant::QParams)>| match v {
        Some((name, q)) => format!(
            "`{}` scale {} zp {}",
            escape(name),
            q.scale[0],
            q.zero_point[0]
        ),
        None => "float".to_string(),
    };
    for op in &q.ops {
        println!(
            "quantized `{}` ({}): input {}, output {}, weight {}, bias {}",
            escape(&op.node),
            op.op_type,
            qp(&op.input),
            qp(&op.output),
            match &op.weight {
                Some(w) => format!("{} scales", w.scale.len()),
                None => "float".to_string(),
            },
            if op.bias { "int32" } else { "float" }
        );
    }
    for node in &q.left_float {
        println!("left float: `{}`", escape(node));
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
