//! `model::mnist::mnist_from_state_dict` on arbitrary safetensors bytes (the prefix is the
//! input's first line), then one forward of what it accepts on the CPU reference.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(0);
    let (head, rest) = data.split_at(split);
    let Ok(prefix) = std::str::from_utf8(head) else {
        return;
    };
    let bytes = rest.get(1..).unwrap_or_default();
    if let Ok(sd) = qfuse::io::state_dict::parse_state_dict(bytes, "fuzz") {
        if let Ok(mut model) = qfuse::model::mnist::mnist_from_state_dict(&sd, prefix) {
            model.eval();
            let x = qfuse::model::mnist::synthetic_batch(1, 0).into_dyn();
            let _ = model.forward(&qfuse::CpuBackend, &x);
        }
    }
});
