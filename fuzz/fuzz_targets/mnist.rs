//! `model::mnist::mnist_from_state_dict` on a state dict built from the input, then one
//! forward of what it accepts on the CPU reference. The input's first line is the prefix; the
//! rest is safetensors bytes whose tensors are laid over a valid Mnist state dict under that
//! prefix (a whole network is 1.7 MB, too large to reach by mutation), so that a mutated
//! tensor (shape, dtype, NaN values, an extra or renamed tensor) meets every later check
//! and the forward. A tensor named `-NAME` removes `NAME`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use qfuse::io::state_dict::StateDict;

fn base() -> &'static StateDict {
    static BASE: OnceLock<StateDict> = OnceLock::new();
    BASE.get_or_init(|| {
        qfuse::model::mnist::mnist(0)
            .expect("the Mnist network builds")
            .state_dict()
            .expect("its state dict")
    })
}

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(0);
    let (head, rest) = data.split_at(split);
    let Ok(prefix) = std::str::from_utf8(head) else {
        return;
    };
    let bytes = rest.get(1..).unwrap_or_default();
    let Ok(over) = qfuse::io::state_dict::parse_state_dict(bytes, "fuzz") else {
        return;
    };
    let mut sd = StateDict::default();
    for (name, t) in &base().tensors {
        sd.tensors.insert(format!("{prefix}{name}"), t.clone());
    }
    for (name, t) in &base().raw {
        sd.raw.insert(format!("{prefix}{name}"), t.clone());
    }
    for name in over.names() {
        if let Some(gone) = name.strip_prefix('-') {
            sd.remove(gone);
        } else {
            sd.remove(name);
        }
    }
    sd.tensors.extend(
        over.tensors
            .into_iter()
            .filter(|(n, _)| !n.starts_with('-')),
    );
    sd.raw
        .extend(over.raw.into_iter().filter(|(n, _)| !n.starts_with('-')));
    if let Ok(mut model) = qfuse::model::mnist::mnist_from_state_dict(&sd, prefix) {
        model.eval();
        let x = qfuse::model::mnist::synthetic_batch(1, 0).into_dyn();
        let _ = model.forward(&qfuse::CpuBackend, &x);
    }
});
