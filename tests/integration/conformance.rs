//! Runs every conformance case of the golden folders (`tests/golden`, plus those listed in
//! `QFUSE_GOLDEN_DIR`) on the CPU reference and on the GPU, so each new case file is a new
//! check. Also checks that unknown ops, empty folders and malformed files fail loudly.

use crate::common;

use std::path::PathBuf;

use qfuse::backend::{CpuBackend, GpuBackend, HostOps};
use qfuse::conformance::{run_case_file, run_dir, summary};
use qfuse::io::state_dict::{HostTensor, StateDict};

fn run_all(backend: &dyn HostOps) {
    let mut reports = Vec::new();
    for dir in common::golden::golden_dirs() {
        reports.extend(
            run_dir(&dir, &[backend])
                .unwrap_or_else(|e| panic!("golden folder {}: {e}", dir.display())),
        );
    }
    let (passed, failed) = summary(&reports);
    let failures: Vec<String> = reports
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.line())
        .collect();
    assert_eq!(
        failed,
        0,
        "{failed} conformance case(s) failed on {} ({passed} passed):\n{}",
        backend.name(),
        failures.join("\n")
    );
}

fn golden_cases_pass_on_cpu() {
    run_all(&CpuBackend);
}

fn golden_cases_pass_on_gpu() {
    let Some(ctx) = common::gpu() else { return };
    run_all(&GpuBackend::new(ctx));
}

fn write_case(dir: &std::path::Path, name: &str, sd: &StateDict) -> PathBuf {
    let p = dir.join(name);
    sd.save(&p).unwrap();
    p
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qfuse-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tiny_case(op: &str) -> StateDict {
    let mut sd = StateDict::default();
    sd.metadata.insert("op".into(), op.into());
    sd.metadata.insert(
        "params".into(),
        r#"{"scale": 0.5, "zero_point": 0, "quant_min": -128, "quant_max": 127}"#.into(),
    );
    sd.metadata.insert("atol".into(), "0.0".into());
    sd.metadata.insert("rtol".into(), "0.0".into());
    let t = |v: Vec<f32>| HostTensor::F32(ndarray::Array1::from(v).into_dyn());
    sd.tensors.insert("in.x".into(), t(vec![0.2, 0.3, 1.0]));
    sd.tensors.insert("in.dy".into(), t(vec![1.0, 1.0, 1.0]));
    sd.tensors.insert("out.y".into(), t(vec![0.0, 0.5, 1.0]));
    sd.tensors.insert("out.dx".into(), t(vec![1.0, 1.0, 1.0]));
    sd
}

fn a_written_case_passes_and_a_wrong_expectation_fails() {
    let dir = tmpdir("ok");
    let p = write_case(
        &dir,
        "fake_quant_per_tensor__tiny.safetensors",
        &tiny_case("fake_quant_per_tensor"),
    );
    let r = run_case_file(&p, &CpuBackend);
    assert!(r.passed(), "{}", r.line());
    let mut bad = tiny_case("fake_quant_per_tensor");
    bad.tensors.insert(
        "out.y".into(),
        HostTensor::F32(ndarray::Array1::from(vec![0.0f32, 0.0, 1.0]).into_dyn()),
    );
    let p = write_case(&dir, "fake_quant_per_tensor__bad.safetensors", &bad);
    let r = run_case_file(&p, &CpuBackend);
    assert!(!r.passed());
    assert!(
        r.line().contains("1 element(s) out of tolerance"),
        "{}",
        r.line()
    );
}

fn unknown_op_fails_the_case() {
    let dir = tmpdir("unknown");
    let p = write_case(&dir, "frobnicate__x.safetensors", &tiny_case("frobnicate"));
    let r = run_case_file(&p, &CpuBackend);
    assert!(!r.passed());
    assert!(r.line().contains("unknown op `frobnicate`"), "{}", r.line());
}

fn missing_expected_output_fails_the_case() {
    let dir = tmpdir("extra");
    let mut sd = tiny_case("fake_quant_per_tensor");
    sd.tensors.insert(
        "out.something_else".into(),
        HostTensor::F32(ndarray::Array1::from(vec![0.0f32]).into_dyn()),
    );
    let p = write_case(&dir, "fake_quant_per_tensor__extra.safetensors", &sd);
    let r = run_case_file(&p, &CpuBackend);
    assert!(!r.passed());
    assert!(
        r.line().contains("no value for out.something_else"),
        "{}",
        r.line()
    );
}

fn missing_input_tensor_is_named() {
    let dir = tmpdir("missing");
    let mut sd = tiny_case("fake_quant_per_tensor");
    sd.tensors.remove("in.dy");
    let p = write_case(&dir, "fake_quant_per_tensor__nody.safetensors", &sd);
    let r = run_case_file(&p, &CpuBackend);
    assert!(!r.passed());
    assert!(r.line().contains("missing tensor `in.dy`"), "{}", r.line());
}

fn empty_folder_is_an_error() {
    let dir = tmpdir("empty");
    let e = run_dir(&dir, &[&CpuBackend]).unwrap_err();
    assert!(e.to_string().contains("no conformance case"), "{e}");
}

fn malformed_files_fail() {
    let dir = tmpdir("malformed");
    std::fs::write(
        dir.join("garbage__a.safetensors"),
        b"this is not safetensors",
    )
    .unwrap();
    let mut no_op = tiny_case("x");
    no_op.metadata.remove("op");
    write_case(&dir, "noop__b.safetensors", &no_op);
    let mut bad_params = tiny_case("fake_quant_per_tensor");
    bad_params
        .metadata
        .insert("params".into(), "{not json".into());
    write_case(&dir, "badparams__c.safetensors", &bad_params);
    let mut bad_tol = tiny_case("fake_quant_per_tensor");
    bad_tol.metadata.insert("atol".into(), "lots".into());
    write_case(&dir, "badtol__d.safetensors", &bad_tol);
    let reports = run_dir(&dir, &[&CpuBackend]).unwrap();
    assert_eq!(reports.len(), 4);
    let lines: Vec<String> = reports.iter().map(|r| r.line()).collect();
    assert!(reports.iter().all(|r| !r.passed()), "{lines:#?}");
    let all = lines.join("\n");
    assert!(all.contains("not a safetensors file"), "{all}");
    assert!(all.contains("metadata has no `op`"), "{all}");
    assert!(all.contains("`params` is not JSON"), "{all}");
    assert!(all.contains("`atol` = `lots` is not a number"), "{all}");
}

fn conv_params_accept_pytorch_spellings() {
    use ndarray::Array4;
    use qfuse::ops::Conv2dParams;
    let x = Array4::from_shape_fn((1, 2, 5, 5), |(_, c, h, w)| {
        (c + 2 * h + 3 * w) as f32 * 0.1
    });
    let w = Array4::from_shape_fn((3, 2, 3, 3), |(o, i, h, w)| {
        (o + i + h * w) as f32 * 0.05 - 0.2
    });
    let p = Conv2dParams {
        padding: [1, 1],
        ..Default::default()
    };
    let y = CpuBackend.conv2d(&x, &w, None, &p).unwrap();
    let mut sd = StateDict::default();
    sd.metadata.insert("op".into(), "conv2d".into());
    // padding "same", stride and dilation as plain integers.
    sd.metadata.insert(
        "params".into(),
        r#"{"stride": 1, "padding": "same", "dilation": 1, "groups": 1}"#.into(),
    );
    sd.metadata.insert("atol".into(), "1e-6".into());
    sd.metadata.insert("rtol".into(), "1e-6".into());
    sd.tensors
        .insert("in.x".into(), HostTensor::F32(x.into_dyn()));
    sd.tensors
        .insert("in.weight".into(), HostTensor::F32(w.into_dyn()));
    sd.tensors
        .insert("out.y".into(), HostTensor::F32(y.into_dyn()));
    let dir = tmpdir("same");
    let p = write_case(&dir, "conv2d__same.safetensors", &sd);
    let r = run_case_file(&p, &CpuBackend);
    assert!(r.passed(), "{}", r.line());
    // "same" with stride 2 is refused, as PyTorch refuses it, with a clear message.
    sd.metadata.insert(
        "params".into(),
        r#"{"stride": 2, "padding": "same", "dilation": 1, "groups": 1}"#.into(),
    );
    let p = write_case(&dir, "conv2d__same_stride2.safetensors", &sd);
    let r = run_case_file(&p, &CpuBackend);
    assert!(
        r.line()
            .contains("padding='same' is not supported for strided convolutions"),
        "{}",
        r.line()
    );
}

crate::qfuse_tests! {
    golden_cases_pass_on_cpu,
    golden_cases_pass_on_gpu: gpu,
    a_written_case_passes_and_a_wrong_expectation_fails,
    unknown_op_fails_the_case,
    missing_expected_output_fails_the_case,
    missing_input_tensor_is_named,
    empty_folder_is_an_error,
    malformed_files_fail,
    conv_params_accept_pytorch_spellings,
}
