//! The `qfuse` binary as a user meets it: `conformance` on files and folders with
//! `--backend auto`, lines under 120 columns with the adapter named once; a mistyped
//! `WGPU_BACKEND` named in the error; failed writes naming the user's output path; `demo
//! --requant fixed-point` echoed as typed; no `XDG_RUNTIME_DIR` error from the Vulkan driver
//! when the variable is unset.

use crate::common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use qfuse::io::state_dict::{HostTensor, StateDict};

fn qfuse(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qfuse"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("qfuse runs")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qfuse-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn golden(name: &str) -> PathBuf {
    common::golden::repo_golden_dir().join(format!("{name}.safetensors"))
}

/// Every line of `out` has fewer than 120 columns.
fn assert_narrow(out: &str) {
    for line in out.lines() {
        assert!(
            line.chars().count() < 120,
            "{} columns: {line}\n{out}",
            line.chars().count()
        );
    }
}

fn conformance_takes_files_and_folders() {
    let dir = tmp_dir("conf-paths");
    for name in ["conv2d__stride2", "fold_linear_bn__bias"] {
        std::fs::copy(golden(name), dir.join(format!("{name}.safetensors"))).unwrap();
    }
    let single = golden("batch_norm2d__eval");
    let out = qfuse(
        &["conformance", s(&dir), s(&single), "--backend", "cpu"],
        &[],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("cases:    3 on cpu"), "{stdout}");
    assert_eq!(stdout.matches("  PASS cpu ").count(), 3, "{stdout}");
    assert!(
        stdout.contains("  PASS cpu batch_norm2d__eval "),
        "{stdout}"
    );
    assert!(stdout.ends_with("3 passed, 0 failed\n"), "{stdout}");
    // Each folder once, before its cases.
    assert_eq!(stdout.matches(&format!("{}:\n", dir.display())).count(), 1);
    assert_narrow(&stdout);

    // A path that does not exist, an empty folder, no path at all: errors before running.
    let missing = dir.join("missing.safetensors");
    let out = qfuse(&["conformance", s(&dir), s(&missing)], &[]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains(s(&missing)), "{stderr}");
    let empty = tmp_dir("conf-empty");
    let out = qfuse(&["conformance", s(&empty)], &[]);
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("no conformance case"),
        "{:?}",
        text(&out)
    );
    let out = qfuse(&["conformance"], &[]);
    assert!(!out.status.success());
    assert!(text(&out).1.contains("<PATH>"), "{:?}", text(&out));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&empty);
}

fn conformance_failure_details_wrap_under_120_columns() {
    let dir = tmp_dir("conf-fail");
    let mut sd = StateDict::default();
    // An unknown op with a long name: the error quotes it, and must wrap.
    let op = format!("frobnicate_{}", "very_long_op_name_".repeat(12));
    sd.metadata.insert("op".into(), op.clone());
    sd.metadata.insert("params".into(), "{}".into());
    sd.metadata.insert("atol".into(), "0.0".into());
    sd.metadata.insert("rtol".into(), "0.0".into());
    sd.tensors.insert(
        "out.y".into(),
        HostTensor::F32(ndarray::Array1::from(vec![1.0f32]).into_dyn()),
    );
    let case = dir.join(format!("{op}__x.safetensors"));
    sd.save(&case).unwrap();
    let out = qfuse(&["conformance", s(&case)], &[]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("FAIL cpu"), "{stdout}");
    assert!(stdout.contains("error: "), "{stdout}");
    assert!(stdout.ends_with("0 passed, 1 failed\n"), "{stdout}");
    assert_narrow(&stdout);
    let _ = std::fs::remove_dir_all(&dir);
}

fn conformance_auto_without_adapter_runs_on_the_cpu() {
    // No Metal on Linux: no adapter for wgpu to find. (On macOS Metal exists.)
    if cfg!(target_os = "macos") {
        return;
    }
    let case = golden("conv2d__stride2");
    let out = qfuse(
        &["conformance", s(&case), "--backend", "auto"],
        &[("WGPU_BACKEND", "metal")],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("running on the CPU reference"), "{stderr}");
    assert!(stdout.contains("  PASS cpu conv2d__stride2"), "{stdout}");
    assert!(!stdout.contains("gpu"), "{stdout}");
}

fn conformance_all_names_the_adapter_once_in_narrow_lines() {
    let ctx = common::gpu().expect("the harness checked the adapter");
    let dir = common::golden::repo_golden_dir();
    let cases = qfuse::conformance::case_paths(&[&dir]).unwrap().len();
    let out = qfuse(&["conformance", s(&dir), "--backend", "all"], &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout.matches(ctx.name().as_str()).count(), 1, "{stdout}");
    assert_eq!(stdout.matches("  PASS cpu ").count(), cases, "{stdout}");
    assert_eq!(stdout.matches("  PASS gpu ").count(), cases, "{stdout}");
    assert!(
        stdout.ends_with(&format!("{} passed, 0 failed\n", 2 * cases)),
        "{stdout}"
    );
    assert_narrow(&stdout);
    // auto with an adapter: the GPU only.
    let case = golden("conv2d__stride2");
    let out = qfuse(&["conformance", s(&case), "--backend", "auto"], &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("  PASS gpu conv2d__stride2"), "{stdout}");
    assert!(!stdout.contains("PASS cpu"), "{stdout}");
}

fn mistyped_wgpu_backend_is_named() {
    // The library's parser.
    use qfuse::gpu::parse_backends;
    assert_eq!(parse_backends("Vulkan").unwrap(), wgpu::Backends::VULKAN);
    assert_eq!(
        parse_backends(" vk, gl ").unwrap(),
        wgpu::Backends::VULKAN | wgpu::Backends::GL
    );
    assert_eq!(parse_backends("").unwrap(), wgpu::Backends::PRIMARY);
    let e = parse_backends("vulkn").unwrap_err();
    assert!(
        e.to_string()
            .contains("WGPU_BACKEND=\"vulkn\" is not a backend (expected vulkan, metal, dx12, gl"),
        "{e}"
    );
    let e = parse_backends("vulkan,metl").unwrap_err();
    assert!(e.to_string().contains("\"metl\" is not a backend"), "{e}");

    // Through the binary: the GPU commands say it, `auto` says why it fell back.
    let want = "WGPU_BACKEND=\"vulkn\" is not a backend";
    let env = [("WGPU_BACKEND", "vulkn")];
    let case = golden("conv2d__stride2");
    let out = qfuse(&["conformance", s(&case), "--backend", "gpu"], &env);
    assert!(!out.status.success());
    assert!(text(&out).1.contains(want), "{:?}", text(&out));
    let out = qfuse(&["conformance", s(&case), "--backend", "auto"], &env);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(text(&out).1.contains(want), "{:?}", text(&out));
    let out = qfuse(&["info"], &env);
    assert!(text(&out).0.contains(want), "{:?}", text(&out));
}

fn failed_writes_name_the_output_path() {
    let dir = tmp_dir("write");
    // A state dict to fold.
    let mut sd = StateDict::default();
    let t = |v: Vec<f32>, shape: &[usize]| {
        HostTensor::F32(ndarray::ArrayD::from_shape_vec(shape, v).unwrap())
    };
    sd.tensors
        .insert("c.weight".into(), t(vec![1.0, 2.0], &[2, 1, 1, 1]));
    sd.tensors
        .insert("b.running_mean".into(), t(vec![0.0, 1.0], &[2]));
    sd.tensors
        .insert("b.running_var".into(), t(vec![1.0, 4.0], &[2]));
    let input = dir.join("in.safetensors");
    sd.save(&input).unwrap();
    let nowhere = dir.join("no-such-folder");
    let check = |out: Output, path: &Path| {
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{stdout}\n{stderr}");
        assert!(stderr.contains(s(path)), "{stderr}");
        assert!(!stderr.contains("qfuse-tmp"), "{stderr}");
        assert!(!stderr.contains("no-such-folder/."), "{stderr}");
    };
    let target = nowhere.join("out.safetensors");
    check(
        qfuse(
            &[
                "fold",
                s(&input),
                "--fuse",
                "c,b",
                "--backend",
                "cpu",
                "-o",
                s(&target),
            ],
            &[],
        ),
        &target,
    );
    let json = nowhere.join("demo.json");
    let demo = [
        "demo",
        "--backend",
        "cpu",
        "--batch",
        "2",
        "--runs",
        "1",
        "--epochs",
        "0",
        "--qat-epochs",
        "0",
        "--test-images",
        "16",
    ];
    let mut args = demo.to_vec();
    args.extend(["--json", s(&json)]);
    check(qfuse(&args, &[]), &json);
    let export = nowhere.join("int8.safetensors");
    let mut args = demo.to_vec();
    args.extend(["--export", s(&export)]);
    check(qfuse(&args, &[]), &export);
    let _ = std::fs::remove_dir_all(&dir);
}

fn demo_requant_is_echoed_as_typed() {
    let out = qfuse(
        &[
            "demo",
            "--backend",
            "cpu",
            "--batch",
            "2",
            "--runs",
            "1",
            "--requant",
            "fixed-point",
            "--epochs",
            "0",
            "--qat-epochs",
            "0",
            "--test-images",
            "16",
        ],
        &[],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("fixed-point requantization"), "{stdout}");
    assert!(!stdout.contains("fixed_point"), "{stdout}");
}

fn no_xdg_runtime_dir_error_from_the_driver() {
    for value in [
        None,
        Some("relative/dir"),
        Some("/no/such/qfuse/runtime/dir"),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qfuse"));
        cmd.arg("info");
        match value {
            None => cmd.env_remove("XDG_RUNTIME_DIR"),
            Some(v) => cmd.env("XDG_RUNTIME_DIR", v),
        };
        let child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        assert!(stdout.contains("backend: gpu"), "{stdout}");
        assert!(!stderr.contains("XDG_RUNTIME_DIR"), "{value:?}: {stderr}");
        // The private directory is gone once the process has ended.
        let prefix = format!("qfuse-runtime-{pid}-");
        let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}

/// A reader that goes away (`qfuse … | head`) ends the run quietly with a failing status: no
/// panic message about a broken pipe.
fn closed_stdout_ends_without_a_panic() {
    // More output than a pipe holds (64 KiB on Linux): with the read end
    // closed the writer meets the broken pipe deterministically, even when
    // another test's fork briefly inherited the read end and the first lines
    // fitted into the pipe's buffer.
    let case = golden("batch_norm2d__eval");
    let mut args = vec![OsStr::new("conformance")];
    args.extend(std::iter::repeat_n(case.as_os_str(), 2000));
    args.extend([OsStr::new("--backend"), OsStr::new("cpu")]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_qfuse"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qfuse runs");
    // The read end closes before the binary has printed anything.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("qfuse ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out.status.success(), "{stderr}");
}

/// `qfuse bench --conv-batch` takes 1 to 64 and refuses anything else in one line before any
/// adapter opens.
fn bench_conv_batch_is_bounded() {
    for bad in ["0", "65", "-1", "8x"] {
        let arg = format!("--conv-batch={bad}");
        let out = qfuse(&["bench", &arg], &[]);
        let (_, err) = text(&out);
        assert!(!out.status.success(), "--conv-batch {bad} ran");
        assert!(err.contains("--conv-batch"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            !err.contains("adapter:"),
            "an adapter opened for --conv-batch {bad}"
        );
    }
    let out = qfuse(&["bench", "--help"], &[]);
    assert!(text(&out).0.contains("--conv-batch <N>"));
}

crate::qfuse_tests! {
    bench_conv_batch_is_bounded,
    closed_stdout_ends_without_a_panic,
    conformance_takes_files_and_folders,
    conformance_failure_details_wrap_under_120_columns,
    conformance_auto_without_adapter_runs_on_the_cpu,
    conformance_all_names_the_adapter_once_in_narrow_lines: gpu,
    mistyped_wgpu_backend_is_named,
    failed_writes_name_the_output_path,
    demo_requant_is_echoed_as_typed,
    no_xdg_runtime_dir_error_from_the_driver: gpu,
}
