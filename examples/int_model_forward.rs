//! Runs a saved integer model (`qfuse quantize MODEL.onnx --int-model M.safetensors`) on an
//! input batch and writes its output codes, so that a script compares them with another
//! runtime's (`tools/torchvision_targets.py` compares them with onnxruntime's QDQ run):
//!
//! ```sh
//! cargo run --release --example int_model_forward -- M.safetensors INPUT.safetensors \
//!     OUT.safetensors [cpu|gpu] [--onnx-input]
//! ```
//!
//! `--onnx-input` quantizes the input as ONNX's `QuantizeLinear` does (`x / scale`) instead of
//! qfuse's (PyTorch's) `x · (1/scale)`, so that both runtimes start from the same codes.
//!
//! INPUT holds the float batch (a tensor named `input`, or the only tensor); OUT gets `codes`
//! (the output codes as float32), `scale` and `zero_point` (the output's qparams) and
//! `seconds` (the forward's wall time, preparation excluded); with `QFUSE_DUMP_VALUES` set,
//! also every value's codes (`value.V`, value 0 the input, computed on the CPU reference).

use std::time::Instant;

use ndarray::{arr1, ArrayD};
use qfuse::backend::{Backend, CpuBackend, GpuBackend};
use qfuse::deploy::{DeviceIntModel, IntModel};
use qfuse::io::state_dict::{load_state_dict, HostTensor};
use qfuse::io::StateDict;

/// ONNX's `QuantizeLinear` of the input (`x / scale`, ties to even), which differs from
/// PyTorch's `x · (1/scale)` (qfuse's `quantize`) in the last bit for a few inputs.
fn onnx_quantize(model: &IntModel, x: &ArrayD<f32>) -> ArrayD<i8> {
    let (s, z) = (
        model.values[0].scale[0],
        model.values[0].zero_point[0] as f32,
    );
    let r = model.activation_range;
    x.mapv(|v| ((v / s).round_ties_even() + z).clamp(r.quant_min as f32, r.quant_max as f32) as i8)
}

fn run<B: Backend>(
    model: &IntModel,
    b: B,
    x: &ArrayD<f32>,
    onnx_input: bool,
) -> qfuse::Result<(ArrayD<i8>, f64)> {
    let m = DeviceIntModel::prepare(model, b.clone())?;
    let forward = || -> qfuse::Result<ArrayD<i8>> {
        if onnx_input {
            let codes = b.upload_codes(&onnx_quantize(model, x))?;
            b.download_codes(&m.forward_codes(&codes)?)
        } else {
            m.forward(x)
        }
    };
    forward()?; // warm-up: pipelines compiled, buffers pooled
    let t = Instant::now();
    let codes = forward()?;
    Ok((codes, t.elapsed().as_secs_f64()))
}

fn main() -> qfuse::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, input, out, rest @ ..] = args.as_slice() else {
        eprintln!("usage: int_model_forward MODEL.safetensors INPUT.safetensors OUT.safetensors [cpu|gpu]");
        std::process::exit(2);
    };
    let model = IntModel::load(model)?;
    let sd = load_state_dict(input)?;
    let x = match sd.f32("input") {
        Ok(x) => x.clone(),
        Err(_) => {
            let names: Vec<&String> = sd.tensors.keys().collect();
            match names.as_slice() {
                [only] => sd.f32(only)?.clone(),
                _ => return Err(qfuse::Error::invalid("INPUT needs a tensor named `input`")),
            }
        }
    };
    let onnx_input = rest.iter().any(|a| a == "--onnx-input");
    let (codes, secs) = match rest.first().map(String::as_str) {
        Some("gpu") => run(&model, GpuBackend::from_system()?, &x, onnx_input)?,
        _ => run(&model, CpuBackend, &x, onnx_input)?,
    };
    let qp = model.output_qparams();
    let mut o = StateDict::default();
    o.tensors
        .insert("codes".into(), HostTensor::F32(codes.mapv(f32::from)));
    o.tensors.insert(
        "scale".into(),
        HostTensor::F32(arr1(&[qp.scale[0]]).into_dyn()),
    );
    o.tensors.insert(
        "zero_point".into(),
        HostTensor::F32(arr1(&[qp.zero_point[0] as f32]).into_dyn()),
    );
    o.tensors.insert(
        "seconds".into(),
        HostTensor::F32(arr1(&[secs as f32]).into_dyn()),
    );
    if std::env::var_os("QFUSE_DUMP_VALUES").is_some() {
        // Every value's codes (value 0 the input), for locating a first disagreement.
        let all = model.forward_values(&CpuBackend, &x)?;
        for (v, c) in all.iter().enumerate() {
            o.tensors
                .insert(format!("value.{v}"), HostTensor::F32(c.mapv(f32::from)));
        }
    }
    o.save(out)?;
    println!("{} output codes in {secs:.3} s", codes.len());
    Ok(())
}
