//! `io::case::Case::from_bytes` on arbitrary bytes, then `conformance::run_case` on the CPU
//! reference (every op of the runner, with whatever settings and tensors the case holds).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(case) = qfuse::io::Case::from_bytes(data, "fuzz") {
        let report = qfuse::conformance::run_case(&case, &qfuse::CpuBackend);
        // The report line is one line, whatever the case holds.
        assert!(!report.line().contains('\n'));
    }
});
