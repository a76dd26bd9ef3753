//! `deploy::IntModel::from_bytes` on arbitrary bytes, then one forward of what it accepts on
//! the CPU backend (a small input whose shape follows the first layer), so that a model the
//! loader accepts but the forward cannot run is refused with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qfuse::deploy::{IntLayer, IntModel};

fuzz_target!(|data: &[u8]| {
    let Ok(model) = IntModel::from_bytes(data, "fuzz") else {
        return;
    };
    let shape = match model.nodes.first().map(|n| &n.layer) {
        Some(IntLayer::Conv { weight, params, .. }) => {
            let c = weight.shape()[1].saturating_mul(params.groups);
            vec![1, c.min(64), 6, 6]
        }
        Some(IntLayer::Linear { weight, .. }) => vec![1, weight.shape()[1].min(4096)],
        _ => vec![1, 2, 6, 6],
    };
    let x = ndarray::ArrayD::<f32>::from_elem(ndarray::IxDyn(&shape), 0.5);
    let _ = model.forward(&qfuse::CpuBackend, &x);
});
