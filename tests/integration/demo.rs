//! `qfuse demo`: the binary's table as JSON, with seeded weights and with the golden file's
//! PyTorch weights, on the CPU and (when there is an adapter) on the GPU; and its errors.

use crate::common;

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

const GOLDEN: &str = "model_mnist_ptq__ptq_conv1_bn1.safetensors";

fn golden_file() -> PathBuf {
    common::golden::repo_golden_dir().join(GOLDEN)
}

fn demo(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qfuse"));
    cmd.arg("demo").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("qfuse runs")
}

/// Runs the demo with `--json` and returns the stdout and the parsed JSON.
fn demo_json(name: &str, args: &[&str], env: &[(&str, &str)]) -> (String, Value) {
    let dir = std::env::temp_dir().join(format!("qfuse-demo-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join(format!("{name}.json"));
    let mut all: Vec<&str> = args.to_vec();
    let json_arg = json.display().to_string();
    all.extend(["--json", &json_arg]);
    let out = demo(&all, env);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "qfuse demo {all:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    (stdout, v)
}

/// Checks the table's JSON: keys, rows in order, fused ≈ float, int8 close.
fn check(v: &Value, backend: &str, batch: u64) {
    assert_eq!(v["backend"], backend, "{v:#}");
    assert_eq!(v["batch"], batch);
    for key in [
        "adapter", "fallback", "seed", "weights", "config", "qparams",
    ] {
        assert!(v.get(key).is_some(), "missing `{key}`: {v:#}");
    }
    let rows = v["rows"].as_array().expect("rows");
    let models: Vec<&str> = rows.iter().map(|r| r["model"].as_str().unwrap()).collect();
    assert_eq!(models, ["float", "fused", "simulated int8"]);
    for r in rows {
        for key in ["max_abs_diff", "argmax_agreement", "ms_per_batch"] {
            assert!(r[key].is_number(), "row {r}: `{key}`");
        }
        assert!(r["ms_per_batch"].as_f64().unwrap() > 0.0);
        assert_eq!(r["backend"], backend);
    }
    let diff = |i: usize| rows[i]["max_abs_diff"].as_f64().unwrap();
    let agree = |i: usize| rows[i]["argmax_agreement"].as_f64().unwrap();
    assert_eq!(diff(0), 0.0);
    assert_eq!(agree(0), 1.0);
    assert!(diff(1) < 1e-4, "fused vs float: {}", diff(1));
    assert_eq!(agree(1), 1.0);
    assert!(diff(2) > 0.0 && diff(2) < 0.5, "int8 vs float: {}", diff(2));
    assert!(agree(2) >= 0.9, "int8 argmax agreement {}", agree(2));
    // The deployed integer model against the fused and unfused simulations.
    let frac = |k: &str| {
        v[k].as_f64()
            .unwrap_or_else(|| panic!("`{k}` missing: {v:#}"))
    };
    let steps = |k: &str| {
        v[k].as_u64()
            .unwrap_or_else(|| panic!("`{k}` missing: {v:#}"))
    };
    assert!(frac("int8_identical_fraction_fused") >= 0.99, "{v:#}");
    assert!(steps("int8_max_step_diff_fused") <= 1, "{v:#}");
    assert!(
        frac("int8_identical_fraction_unfused") <= frac("int8_identical_fraction_fused"),
        "{v:#}"
    );
    assert!(steps("int8_max_step_diff_unfused") >= steps("int8_max_step_diff_fused"));
    assert_eq!(v["deployment"]["reload_identical"], true, "{v:#}");
    assert!(v["deployment"]["argmax_agreement"].as_f64().unwrap() >= 0.9);
    let qp = v["qparams"].as_object().unwrap();
    let keys: Vec<&str> = qp.keys().map(String::as_str).collect();
    assert_eq!(keys.len(), 3, "{keys:?}");
    for k in ["conv1._input_", "conv1.weight", "conv1._output_"] {
        let pair = qp[k].as_array().unwrap();
        assert!(pair[0].as_f64().unwrap() > 0.0);
        let zp = pair[1].as_i64().unwrap();
        assert!((-128..=127).contains(&zp));
    }
}

fn cpu_seeded_weights() {
    let (stdout, v) = demo_json(
        "cpu-seeded",
        &[
            "--backend",
            "cpu",
            "--batch",
            "16",
            "--runs",
            "2",
            "--seed",
            "3",
            "--epochs",
            "0",
            "--qat-epochs",
            "0",
            "--test-images",
            "32",
        ],
        &[],
    );
    check(&v, "cpu", 16);
    assert_eq!(v["weights"], Value::Null);
    // Not trained (--epochs 0), no QAT stage: the QAT accuracies are null.
    assert!(v["accuracy_float"].is_number() && v["accuracy_ptq_int8"].is_number());
    assert!(v["accuracy_qat_sim"].is_null() && v["accuracy_qat_int8"].is_null());
    assert!(v["transfers_per_forward"].is_null(), "no device on the CPU");
    assert_eq!(v["seed"], 3);
    for line in ["float", "fused", "simulated int8", "ms/batch", "argmax"] {
        assert!(stdout.contains(line), "{stdout}");
    }
}

fn cpu_golden_weights_with_prefix() {
    let file = golden_file();
    let file = file.to_str().unwrap();
    let (_, v) = demo_json(
        "cpu-golden",
        &[
            "--backend",
            "cpu",
            "--batch",
            "32",
            "--runs",
            "1",
            "--weights",
            file,
            "--prefix",
            "in.model.",
            "--epochs",
            "0",
            "--qat-epochs",
            "0",
            "--test-images",
            "32",
        ],
        &[],
    );
    check(&v, "cpu", 32);
    assert_eq!(v["weights"], file);
    assert_eq!(v["prefix"], "in.model.");
}

fn gpu_golden_weights() {
    if common::gpu().is_none() {
        return;
    }
    let file = golden_file();
    let file = file.to_str().unwrap();
    let (stdout, v) = demo_json(
        "gpu-golden",
        &[
            "--backend",
            "gpu",
            "--batch",
            "32",
            "--runs",
            "1",
            "--weights",
            file,
            "--prefix",
            "in.model.",
            "--epochs",
            "1",
            "--qat-epochs",
            "2",
            "--train-images",
            "96",
            "--test-images",
            "64",
        ],
        &[],
    );
    check(&v, "gpu", 32);
    // Every stage, trained on the GPU: float, PTQ (fused, unfused, int8), QAT (sim, int8).
    let stages: Vec<&str> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        [
            "float",
            "ptq_fused",
            "ptq_unfused",
            "ptq_int8",
            "qat_sim",
            "qat_int8"
        ]
    );
    for k in [
        "accuracy_float",
        "accuracy_ptq_fused",
        "accuracy_ptq_unfused",
        "accuracy_ptq_int8",
        "accuracy_qat_sim",
        "accuracy_qat_int8",
    ] {
        let a = v[k].as_f64().unwrap_or_else(|| panic!("`{k}`: {v:#}"));
        assert!((0.0..=1.0).contains(&a), "{k} = {a}");
    }
    assert_eq!(v["train_losses"].as_array().unwrap().len(), 1);
    assert_eq!(v["qat_losses"].as_array().unwrap().len(), 2);
    assert!(v["train_seconds"].as_f64().unwrap() > 0.0);
    // One upload and one download per device-resident forward: the float one, and the PTQ
    // simulations' (the module tree with its fake-quant targets on the device).
    assert_eq!(v["transfers_per_forward"], 2, "{v:#}");
    for s in v["stages"].as_array().unwrap() {
        if s["key"] == "ptq_fused" || s["key"] == "ptq_unfused" {
            assert_eq!(s["transfers_per_forward"], 2, "{s:#}");
            // Calibration and scoring download no activations (only observer ranges and
            // log-probabilities: well under a megabyte).
            assert!(s["download_bytes"].as_u64().unwrap() < 1_000_000, "{s:#}");
        }
        if s["key"] == "ptq_int8" {
            // Calibration on the device too (`deploy::convert_on`): no activations come back.
            assert!(s["download_bytes"].as_u64().unwrap() < 1_000_000, "{s:#}");
        }
    }
    assert_eq!(v["deployment"]["after_qat"], true);
    for line in ["QAT simulation", "QAT int8 deployed", "test accuracy"] {
        assert!(stdout.contains(line), "{stdout}");
    }
    assert!(v["adapter"].is_string());
    assert!(stdout.contains("backend:  gpu"), "{stdout}");
}

fn auto_without_adapter_falls_back_to_the_cpu_and_says_so() {
    // No Metal on Linux: no adapter for wgpu to find. (On macOS Metal exists; skip there.)
    if cfg!(target_os = "macos") {
        return;
    }
    let env = [("WGPU_BACKEND", "metal")];
    let out = demo(
        &[
            "--backend",
            "auto",
            "--batch",
            "4",
            "--runs",
            "1",
            "--json",
            "/dev/null",
            "--epochs",
            "0",
            "--qat-epochs",
            "0",
            "--test-images",
            "32",
        ],
        &env,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("running on the CPU reference"), "{stderr}");
    assert!(stdout.contains("cpu (no GPU adapter)"), "{stdout}");
    let quick = ["--epochs", "0", "--qat-epochs", "0", "--test-images", "8"];
    let mut args = vec!["--batch", "4", "--runs", "1"];
    args.extend(quick);
    let (_, v) = demo_json("auto-fallback", &args, &env);
    check(&v, "cpu", 4);
    assert!(v["fallback"].is_string());
    // --backend gpu without an adapter is an error.
    let out = demo(&["--backend", "gpu", "--batch", "2"], &env);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no GPU adapter"));
}

fn bad_weights_fail_with_a_useful_message() {
    let file = golden_file();
    let file = file.to_str().unwrap();
    // The golden file's tensors are under `in.model.`: without the prefix the message says so.
    let out = demo(&["--backend", "cpu", "--weights", file], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("conv1.weight") && stderr.contains("in.model."),
        "{stderr}"
    );
    let out = demo(
        &["--backend", "cpu", "--weights", "/nonexistent.safetensors"],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.safetensors"));
    let out = demo(&["--backend", "cpu", "--batch", "0"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--batch"));
}

/// `--quantize-all` and `--config FILE` choose what PTQ quantizes; they exclude each other;
/// bad learning rates and epoch counts are refused.
fn ptq_config_choices_and_training_settings() {
    let quick = [
        "--backend",
        "cpu",
        "--batch",
        "8",
        "--runs",
        "1",
        "--epochs",
        "0",
        "--qat-epochs",
        "0",
        "--test-images",
        "16",
        "--calibration-batches",
        "1",
    ];
    let mut args = quick.to_vec();
    args.push("--quantize-all");
    let (stdout, v) = demo_json("quantize-all", &args, &[]);
    assert!(stdout.contains("--quantize-all"), "{stdout}");
    let keys: Vec<String> = v["qparams"].as_object().unwrap().keys().cloned().collect();
    for k in [
        "conv1._output_",
        "conv2.weight",
        "fc1._input_",
        "fc2._output_",
    ] {
        assert!(keys.iter().any(|x| x == k), "{k} not in {keys:?}");
    }
    let dir = std::env::temp_dir().join(format!("qfuse-demo-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("config.json");
    std::fs::write(
        &cfg,
        r#"[{"op_names": ["fc2"], "target_names": ["weight", "_output_"],
             "quant_dtype": "int8", "quant_scheme": "symmetric"}]"#,
    )
    .unwrap();
    let cfg_arg = cfg.display().to_string();
    let mut args = quick.to_vec();
    args.extend(["--config", &cfg_arg]);
    let (stdout, v) = demo_json("config-file", &args, &[]);
    assert!(stdout.contains("config.json"), "{stdout}");
    let keys: Vec<&str> = v["qparams"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["fc2._output_", "fc2.weight"]);
    let mut args = quick.to_vec();
    args.extend(["--config", &cfg_arg, "--quantize-all"]);
    let out = demo(&args, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
    std::fs::write(&cfg, "[{\"op_names\": 3}]").unwrap();
    let mut args = quick.to_vec();
    args.extend(["--config", &cfg_arg]);
    let out = demo(&args, &[]);
    assert!(!out.status.success());
    let _ = std::fs::remove_dir_all(&dir);
    for (flag, value, want) in [
        ("--lr", "0", "--lr must be positive"),
        ("--qat-lr", "NaN", "--qat-lr must be positive"),
        ("--epochs", "100000", "exceeds the limit"),
        ("--train-images", "0", "--train-images"),
    ] {
        let out = demo(&["--backend", "cpu", flag, value], &[]);
        assert!(!out.status.success(), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{flag} {value}: {err}");
    }
}

/// On the CPU reference the demo trains too (`train::CpuTrainer`): every stage, seeded.
fn cpu_trains_quantizes_and_fine_tunes() {
    let args = [
        "--backend",
        "cpu",
        "--batch",
        "32",
        "--runs",
        "1",
        "--epochs",
        "2",
        "--qat-epochs",
        "2",
        "--train-images",
        "128",
        "--test-images",
        "64",
    ];
    let (stdout, v) = demo_json("cpu-train", &args, &[]);
    let keys: Vec<&str> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "float",
            "ptq_fused",
            "ptq_unfused",
            "ptq_int8",
            "qat_sim",
            "qat_int8"
        ]
    );
    // Two epochs on 128 images: well above chance (10%), and reproducible.
    let float = v["accuracy_float"].as_f64().unwrap();
    assert!(float > 0.3, "{float}");
    for k in ["accuracy_ptq_int8", "accuracy_qat_sim", "accuracy_qat_int8"] {
        let a = v[k].as_f64().unwrap();
        assert!(a > 0.25, "{k} = {a}");
    }
    let (_, again) = demo_json("cpu-train-again", &args, &[]);
    assert_eq!(again["accuracy_qat_int8"], v["accuracy_qat_int8"]);
    assert_eq!(again["train_losses"], v["train_losses"]);
    assert!(
        stdout.contains("backend:  cpu (the CPU reference)"),
        "{stdout}"
    );
}

crate::qfuse_tests! {
    cpu_trains_quantizes_and_fine_tunes,
    ptq_config_choices_and_training_settings,
    cpu_seeded_weights,
    cpu_golden_weights_with_prefix,
    gpu_golden_weights: gpu,
    auto_without_adapter_falls_back_to_the_cpu_and_says_so,
    bad_weights_fail_with_a_useful_message,
}
