//! `fold_state_dict::FoldSpec::parse` and `fold_state_dict` on the CPU reference: the input's
//! first line holds the fusions (`LAYER,BN[,RELU]`, separated by `;`), the rest is the
//! safetensors state dict.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qfuse::fold_state_dict::{fold_state_dict, FoldSpec};

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let (head, rest) = data.split_at(split);
    let Ok(head) = std::str::from_utf8(head) else {
        return;
    };
    let specs: Result<Vec<FoldSpec>, _> = head.split(';').map(FoldSpec::parse).collect();
    let Ok(specs) = specs else { return };
    let bytes = rest.get(1..).unwrap_or_default();
    if let Ok(sd) = qfuse::io::state_dict::parse_state_dict(bytes, "fuzz") {
        if let Ok(out) = fold_state_dict(&qfuse::CpuBackend, &sd, &specs) {
            out.to_bytes().expect("a folded state dict serializes");
        }
    }
});
