//! Runs an ONNX file in tract (`tract-onnx`, the pure-Rust engine qfuse's tests check its
//! exports with) on a batch of inputs, one image at a time, and writes the outputs, so that a
//! script compares a real Rust engine's run of a `qfuse quantize` QDQ export with qfuse's own
//! integer model (`tools/torchvision_targets.py` does, for torchvision's resnet18 and
//! mobilenet_v2):
//!
//! ```sh
//! cargo run --release --example tract_run -- MODEL.onnx INPUT.safetensors OUT.safetensors
//! ```
//!
//! INPUT holds the float batch `[N, ...]` (a tensor named `input`, or the only tensor); OUT
//! gets `output` (the model's one output for each image, run as a batch of one, concatenated
//! along the first axis) and `seconds` (tract's load and optimization, then the runs' wall
//! time).

use std::time::Instant;

use ndarray::{arr1, ArrayD, Axis, IxDyn};
use qfuse::io::state_dict::{load_state_dict, HostTensor};
use qfuse::io::StateDict;
use tract_onnx::prelude::{tvec, Framework, InferenceModelExt, IntoRunnable, Tensor};

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model_path, input_path, out_path] = args.as_slice() else {
        fail("usage: tract_run MODEL.onnx INPUT.safetensors OUT.safetensors")
    };
    let inputs = load_state_dict(input_path).unwrap_or_else(|e| fail(e));
    let x = match inputs.f32("input") {
        Ok(x) => x.clone(),
        Err(_) => {
            let names: Vec<&String> = inputs.tensors.keys().collect();
            match names.as_slice() {
                [only] => inputs.f32(only).unwrap_or_else(|e| fail(e)).clone(),
                _ => fail(format!(
                    "{input_path:?}: no tensor named `input` and not exactly one tensor"
                )),
            }
        }
    };
    if x.ndim() < 1 || x.shape()[0] == 0 {
        fail(format!("{input_path:?}: an empty batch"));
    }
    let bytes = std::fs::read(model_path).unwrap_or_else(|e| fail(format!("{model_path:?}: {e}")));
    let t0 = Instant::now();
    let model = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .unwrap_or_else(|e| fail(format!("tract refuses {model_path:?}: {e:?}")));
    let load_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut outs: Vec<ArrayD<f32>> = Vec::new();
    for image in x.axis_iter(Axis(0)) {
        let image = image.insert_axis(Axis(0));
        let image = image.as_standard_layout();
        let slice = image.as_slice().expect("standard layout");
        let t = Tensor::from_shape(image.shape(), slice).unwrap_or_else(|e| fail(e));
        let out = model
            .run(tvec!(t.into()))
            .unwrap_or_else(|e| fail(format!("tract run: {e:?}")));
        if out.len() != 1 {
            fail(format!("the model has {} outputs, not one", out.len()));
        }
        let y = out[0]
            .to_plain_array_view::<f32>()
            .unwrap_or_else(|e| fail(format!("output is not f32: {e:?}")));
        outs.push(
            ArrayD::from_shape_vec(IxDyn(y.shape()), y.iter().copied().collect())
                .unwrap_or_else(|e| fail(e)),
        );
    }
    let run_s = t1.elapsed().as_secs_f64();
    let views: Vec<_> = outs.iter().map(|a| a.view()).collect();
    let y = ndarray::concatenate(Axis(0), &views).unwrap_or_else(|e| fail(e));
    let mut sd = StateDict::default();
    sd.tensors.insert("output".into(), HostTensor::F32(y));
    sd.tensors.insert(
        "seconds".into(),
        HostTensor::F32(arr1(&[load_s as f32, run_s as f32]).into_dyn()),
    );
    sd.save(out_path).unwrap_or_else(|e| fail(e));
    println!(
        "{model_path}: {} images, load + optimize {load_s:.2} s, runs {run_s:.2} s",
        outs.len()
    );
}
