//! `onnx::OnnxModel::from_bytes` on arbitrary bytes; for what it accepts, `find_fusable`,
//! `fold_model`, `to_net` (the deployment graph) and one evaluation on the CPU backend (each graph input fed with a small
//! tensor of its declared shape, unknown or large dims made small), so that a model the
//! loader accepts but the fold or the evaluator cannot handle is refused with an error, never
//! a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qfuse::onnx::{find_fusable, fold_model, run, to_net, OnnxModel};

fuzz_target!(|data: &[u8]| {
    let Ok(model) = OnnxModel::from_bytes(data, "fuzz") else {
        return;
    };
    let _ = find_fusable(&model.graph);
    if let Ok(folded) = fold_model(&qfuse::CpuBackend, &model) {
        let _ = to_net(&folded.model.graph);
    }
    let _ = to_net(&model.graph);
    let inputs: Vec<(String, ndarray::ArrayD<f32>)> = model
        .graph
        .inputs
        .iter()
        .map(|v| {
            let shape: Vec<usize> = if v.shape.is_empty() {
                vec![1, 2, 4, 4]
            } else {
                v.shape.iter().map(|d| d.unwrap_or(1).clamp(1, 8)).collect()
            };
            let shape = if shape.len() > 6 { vec![1] } else { shape };
            let x = ndarray::ArrayD::<f32>::from_elem(ndarray::IxDyn(&shape), 0.5);
            (v.name.clone(), x)
        })
        .collect();
    let _ = run(&qfuse::CpuBackend, &model.graph, &inputs);
});
