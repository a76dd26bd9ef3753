//! Hostile input (issue 11): every input that once made qfuse panic, abort, hang, forge its
//! output or lose a file, fed to the library or the binary, with the one clean line it must
//! get now, and a check that nothing was left behind or changed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use qfuse::io::state_dict::{parse_state_dict, Dtype};
use qfuse::Error;
use safetensors::tensor::TensorView;

fn tmp_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qfuse_hostile_{}_{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs the binary with a deadline (a hang is a failure, not a stuck test).
fn qfuse_in(dir: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qfuse"));
    cmd.args(args)
        .env("WGPU_BACKEND", "noop-none")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > Duration::from_secs(40) {
            let _ = child.kill();
            panic!("qfuse {args:?} hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn qfuse(args: &[&str]) -> Output {
    qfuse_in(None, args)
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The binary failed with exactly one `error:` line containing `want`, and no panic.
fn fails_with(o: &Output, want: &str) {
    let (out, err) = text(o);
    assert!(!o.status.success(), "succeeded:\n{out}\n{err}");
    assert_eq!(o.status.code(), Some(1), "killed or crashed:\n{out}\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("no GPU")).collect();
    assert_eq!(lines.len(), 1, "not one line:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(want), "`{want}` not in:\n{err}");
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A safetensors file of f32 tensors.
fn safetensors(tensors: &[(&str, Vec<usize>, Vec<f32>)], meta: &[(&str, &str)]) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| f32_bytes(v)).collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (
                n.to_string(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let meta: Option<HashMap<String, String>> = (!meta.is_empty()).then(|| {
        meta.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    });
    safetensors::serialize(views, &meta).unwrap()
}

/// A small foldable state dict (conv1 + bn1) with an extra tensor of `extra` floats.
fn foldable(extra: usize) -> Vec<u8> {
    safetensors(
        &[
            ("conv1.weight", vec![2, 1, 1, 1], vec![1.0, 2.0]),
            ("bn1.running_mean", vec![2], vec![0.0, 1.0]),
            ("bn1.running_var", vec![2], vec![1.0, 4.0]),
            ("other", vec![extra], vec![0.5; extra]),
        ],
        &[],
    )
}

/// The report of case `stem` in `qfuse conformance` output: its `FAIL`/`PASS` line and the
/// indented lines under it.
fn case_block(out: &str, stem: &str) -> String {
    let lines: Vec<&str> = out.lines().collect();
    let i = lines
        .iter()
        .position(|l| {
            let t = l.trim_start();
            (t.starts_with("FAIL") || t.starts_with("PASS"))
                && t.split_whitespace().nth(2) == Some(stem)
        })
        .unwrap_or_else(|| panic!("{stem} missing:\n{out}"));
    // The indented lines (wrapped to the terminal width) joined into one.
    let mut block = vec![lines[i].trim()];
    block.extend(
        lines[i + 1..]
            .iter()
            .take_while(|l| l.starts_with("        "))
            .map(|l| l.trim()),
    );
    block.join(" ")
}

fn listing(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo").arg(path).status().unwrap().success();
    assert!(ok, "mkfifo {}", path.display());
}

fn non_regular_inputs_are_refused_not_read() {
    let d = tmp_dir("nonregular");
    let fifo = d.join("in.safetensors");
    mkfifo(&fifo);
    let out = d.join("out.safetensors");
    let fold = |input: &str| qfuse(&["fold", input, "--fuse", "conv1,bn1", "-o", p(&out)]);
    fails_with(
        &fold(p(&fifo)),
        &format!("{} is not a regular file but a FIFO", fifo.display()),
    );
    fails_with(
        &fold("/dev/zero"),
        "/dev/zero is not a regular file but a character device",
    );
    fails_with(&fold(p(&d)), "is not a regular file but a directory");
    for weights in [p(&fifo), "/dev/zero"] {
        fails_with(
            &qfuse(&["demo", "--backend", "cpu", "--weights", weights]),
            "is not a regular file",
        );
    }
    assert_eq!(listing(&d), ["in.safetensors"]);
    std::fs::remove_dir_all(&d).unwrap();
}

fn odd_entries_in_a_case_folder_fail_as_cases() {
    let d = tmp_dir("casefolder");
    std::os::unix::fs::symlink(d.join("nowhere"), d.join("dangling.safetensors")).unwrap();
    std::os::unix::fs::symlink(d.join("loop.safetensors"), d.join("loop.safetensors")).unwrap();
    mkfifo(&d.join("fifo.safetensors"));
    std::fs::create_dir(d.join("dir.safetensors")).unwrap();
    let o = qfuse(&["conformance", p(&d), "--backend", "cpu"]);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}{err}");
    for (stem, why) in [
        ("dangling", "No such file"),
        ("loop", "symbolic links"),
        ("fifo", "not a regular file but a FIFO"),
        ("dir", "not a regular file but a directory"),
    ] {
        let block = case_block(&out, stem);
        assert!(block.trim_start().starts_with("FAIL"), "{block}");
        assert!(block.contains(why), "{block}");
    }
    assert!(out.contains("0 passed, 4 failed"), "{out}");
    std::fs::remove_dir_all(&d).unwrap();
}

fn demo_never_writes_over_its_input() {
    let d = tmp_dir("demo_input");
    let weights = d.join("w.safetensors");
    let content = b"not even safetensors".to_vec();
    std::fs::write(&weights, &content).unwrap();
    std::os::unix::fs::symlink(&weights, d.join("link.safetensors")).unwrap();
    std::fs::hard_link(&weights, d.join("hard.safetensors")).unwrap();
    for flag in ["--export", "--json"] {
        for target in ["w.safetensors", "link.safetensors", "hard.safetensors"] {
            let o = qfuse_in(
                Some(&d),
                &[
                    "demo",
                    "--backend",
                    "cpu",
                    "--weights",
                    "w.safetensors",
                    flag,
                    target,
                ],
            );
            fails_with(
                &o,
                "is the input file w.safetensors; qfuse never modifies its inputs",
            );
            assert_eq!(std::fs::read(&weights).unwrap(), content);
        }
    }
    let o = qfuse_in(
        Some(&d),
        &["demo", "--backend", "cpu", "--export", "a", "--json", "a"],
    );
    fails_with(&o, "output a is given twice");
    assert_eq!(
        listing(&d),
        ["hard.safetensors", "link.safetensors", "w.safetensors"]
    );
    std::fs::remove_dir_all(&d).unwrap();
}

fn demo_outputs_appear_together_or_not_at_all() {
    let d = tmp_dir("demo_outputs");
    let export = d.join("int.safetensors");
    let small = [
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
    // --json fails (its folder does not exist) after --export was computed: neither appears.
    let missing = d.join("no_such_dir").join("t.json");
    let mut args = vec!["demo", "--export", p(&export), "--json", p(&missing)];
    args.extend(small);
    fails_with(
        &qfuse(&args),
        &format!("I/O error on {}", missing.display()),
    );
    assert_eq!(listing(&d), Vec::<String>::new());
    // Both succeed: both appear, and nothing else.
    let json = d.join("t.json");
    let mut args = vec!["demo", "--export", p(&export), "--json", p(&json)];
    args.extend(small);
    let o = qfuse(&args);
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(listing(&d), ["int.safetensors", "t.json"]);
    assert!(qfuse::deploy::IntModel::load(&export).is_ok());
    std::fs::remove_dir_all(&d).unwrap();
}

fn demo_counts_are_capped() {
    for (flag, value) in [
        ("--batch", "4611686018427387904"),
        ("--batch", "100000000"),
        ("--calibration-batches", "1099511627776"),
        ("--runs", "18446744073709551615"),
    ] {
        let o = qfuse(&["demo", "--backend", "cpu", flag, value]);
        fails_with(&o, &format!("{flag}: {value} "));
        fails_with(&o, "exceeds the limit of");
    }
}

fn a_fold_killed_mid_write_leaves_nothing_after_the_next_run() {
    let d = tmp_dir("killed");
    let input = d.join("in.safetensors");
    std::fs::write(&input, foldable(4096)).unwrap();
    let out = d.join("out.safetensors");
    // A file size limit of 1 KiB: the 16 KiB output cannot be written (SIGXFSZ or EFBIG).
    let script = format!(
        "ulimit -f 1; exec '{}' fold '{}' --fuse conv1,bn1 --backend cpu -o '{}'",
        env!("CARGO_BIN_EXE_qfuse"),
        input.display(),
        out.display()
    );
    let o = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    assert!(!o.status.success(), "{:?}", text(&o));
    assert!(!out.exists());
    let after_kill = listing(&d);
    // Killed by the signal: its temporary stays; failed with EFBIG: removed at once.
    assert!(after_kill.len() <= 2, "{after_kill:?}");
    assert!(
        after_kill
            .iter()
            .all(|n| n == "in.safetensors" || n.starts_with(".out.safetensors.qfuse-tmp-")),
        "{after_kill:?}"
    );
    let o = qfuse(&[
        "fold",
        p(&input),
        "--fuse",
        "conv1,bn1",
        "--backend",
        "cpu",
        "-o",
        p(&out),
    ]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(listing(&d), ["in.safetensors", "out.safetensors"]);
    std::fs::remove_dir_all(&d).unwrap();
}

fn names_from_input_cannot_forge_lines() {
    let d = tmp_dir("names");
    let forged = "x\nPASS forged.safetensors [cpu]\u{1b}[2J";
    let long = "n".repeat(100_000);
    // An unknown op holding a newline and an ANSI escape.
    let case = safetensors(
        &[("in.x", vec![1], vec![1.0]), ("out.y", vec![1], vec![1.0])],
        &[
            ("op", forged),
            ("params", "{}"),
            ("atol", "0"),
            ("rtol", "0"),
        ],
    );
    std::fs::write(d.join("a.safetensors"), case).unwrap();
    // A tensor name with a newline and one of 100,000 characters (an output never produced).
    let name = format!("out.{forged}");
    let case = safetensors(
        &[
            ("in.x", vec![1], vec![1.0]),
            (&name, vec![1], vec![1.0]),
            (&format!("out.{long}"), vec![1], vec![1.0]),
        ],
        &[
            ("op", "calc_qparams"),
            ("params", "{}"),
            ("atol", "0"),
            ("rtol", "0"),
        ],
    );
    std::fs::write(d.join("b.safetensors"), case).unwrap();
    let o = qfuse(&["conformance", p(&d), "--backend", "cpu"]);
    let (out, err) = text(&o);
    assert!(!o.status.success());
    // No forged line: every line is the runner's own.
    for line in out.lines() {
        let t = line.trim_start();
        assert!(!t.starts_with("PASS"), "forged: {line}\n{out}");
        assert!(!t.starts_with("forged"), "forged: {line}\n{out}");
    }
    assert!(
        case_block(&out, "a").contains("unknown op `x\\nPASS forged.safetensors [cpu]\\u{1b}[2J`"),
        "{out}"
    );
    assert!(
        case_block(&out, "b").trim_start().starts_with("FAIL"),
        "{out}"
    );
    assert!(out.contains("0 passed, 2 failed"), "{out}");
    assert!(!out.contains('\u{1b}') && !err.contains('\u{1b}'));
    assert!(
        out.len() < 2000,
        "a long name is echoed whole: {} bytes",
        out.len()
    );

    // A module name on the command line and a tensor name in a state dict.
    let input = d.join("in.safetensors");
    std::fs::write(&input, foldable(1)).unwrap();
    let o = qfuse(&[
        "fold",
        p(&input),
        "--fuse",
        "conv1,bn1\u{1b}[2J",
        "-o",
        p(&d.join("o.safetensors")),
    ]);
    let (_, err) = text(&o);
    assert!(!err.contains('\u{1b}'), "{err}");
    fails_with(&o, "\\u{1b}[2J");
    std::fs::remove_dir_all(&d).unwrap();
}

fn config_names_are_escaped() {
    let e = qfuse::config::ConfigList::from_json(
        r#"[{"op_names": ["a"], "quant_dtype": "int8\nPASS\u001b[2J"}]"#,
    )
    .unwrap_err()
    .to_string();
    assert!(!e.contains('\n') && !e.contains('\u{1b}'), "{e}");
    assert!(
        e.contains("unknown quant_dtype `int8\\nPASS\\u{1b}[2J`"),
        "{e}"
    );
    let e = qfuse::config::ConfigList::from_json(&format!(
        r#"[{{"op_names": ["a"], "{}": 1}}]"#,
        "k".repeat(5000)
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("… (5000 characters)"), "{e}");
    // Names inside lists: each escaped and shortened, long lists cut.
    let long = "n".repeat(5000);
    let e = qfuse::config::ConfigList::from_json(&format!(
        r#"[{{"op_names": ["a"], "fuse_names": [["{long}\nPASS"]]}}]"#
    ))
    .unwrap_err()
    .to_string();
    assert!(!e.contains('\n') && e.len() < 400, "{e}");
    assert!(
        e.contains("group [\"nnnn") && e.contains("… (5005 characters)\"] must name"),
        "{e}"
    );
    let types: Vec<String> = (0..40).map(|i| format!("\"T{i}\\u001b[2J\"")).collect();
    let cfg = qfuse::config::ConfigList::from_json(&format!(
        r#"[{{"op_types": [{}], "exclude_op_names": ["conv1"]}}]"#,
        types.join(", ")
    ))
    .unwrap();
    let mut model = qfuse::model::mnist::mnist(0).unwrap();
    let e = qfuse::config::apply(&mut model, &cfg, qfuse::config::QuantMode::Ptq)
        .unwrap_err()
        .to_string();
    assert!(!e.contains('\u{1b}') && e.len() < 1200, "{e}");
    assert!(
        e.contains(r#"op_types ["T0\u{1b}[2J", "#) && e.contains("… (40 names)]"),
        "{e}"
    );
    assert!(e.contains(r#"excluding ["conv1"]"#), "{e}");
}

/// Header bytes + data, with a header given as JSON text.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

fn rejection(bytes: &[u8]) -> String {
    match parse_state_dict(bytes, "f.safetensors") {
        Err(e @ Error::MalformedStateDict { .. }) => e.to_string(),
        other => panic!("not a MalformedStateDict: {other:?}"),
    }
}

fn safetensors_rejections_say_what_is_wrong() {
    let t = r#""w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![1, 2, 3], "the file has 3 bytes, fewer than the 8 of the header length field"),
        (
            {
                let mut v = 1_000_000_000u64.to_le_bytes().to_vec();
                v.extend_from_slice(b"{}");
                v
            },
            "the header length field claims 1000000000 bytes, more than the 100000000 safetensors allows (file size 10 bytes)",
        ),
        (
            {
                let mut v = 500u64.to_le_bytes().to_vec();
                v.extend_from_slice(b"{}");
                v
            },
            "the header length field claims 500 bytes but only 2 follow it (file size 10 bytes)",
        ),
        (raw_file("{\"w\":", &[]), "the header (5 bytes) is not valid JSON: EOF while parsing"),
        (raw_file("[1]", &[]), "is not a JSON object"),
        (
            raw_file(&format!("{{{t}}}"), &[0; 4]),
            "tensor `w`: data_offsets [0, 8] reach past the data, which has 4 bytes (file size 66 = 8 + header 54 + data 4)",
        ),
        (
            raw_file(r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, &[0; 8]),
            "tensor `w`: F32 shape [3] needs 12 bytes but data_offsets [0, 8] hold 8",
        ),
        (
            raw_file(r#"{"w":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}}"#, &[0; 8]),
            "tensor `w`: unknown dtype `F33`",
        ),
        (
            raw_file(r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#, &[0; 8]),
            "tensor `w`: data_offsets [8, 0] end before they begin",
        ),
        (
            raw_file(&format!("{{{t}}}"), &[0; 12]),
            "the tensors cover 8 bytes of data but the file has 12 after its header (4 unaccounted bytes at the end",
        ),
        (
            raw_file(
                &format!(r#"{{{t},"v":{{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}}}"#),
                &[0; 8],
            ),
            "tensors `w` (data_offsets [0, 8]) and `v` ([4, 8]) overlap",
        ),
        (
            raw_file(
                r#"{"w":{"dtype":"F32","shape":[1073741824,1073741824],"data_offsets":[0,0]}}"#,
                &[],
            ),
            "tensor `w`: shape [1073741824, 1073741824] has more than 268435456 elements",
        ),
        (
            raw_file(&format!(r#"{{{t},"__metadata__":{{"a":1}}}}"#), &[0; 8]),
            "`__metadata__` entry `a` is not a string",
        ),
    ];
    for (bytes, want) in cases {
        let e = rejection(&bytes);
        assert!(
            e.starts_with("malformed state dict f.safetensors: not a safetensors file: "),
            "{e}"
        );
        assert!(e.contains(want), "`{want}` not in `{e}`");
    }
}

// ---- geometry and values: one check per op, the same refusal on both backends

use ndarray::{Array1, Array2, Array4, ArrayD, IxDyn};
use qfuse::backend::{CpuBackend, GpuBackend, HostOps};
use qfuse::ops::{Activation, BatchNorm, Conv2d, Conv2dParams, ConvTranspose2dParams, QatConfig};
use qfuse::quant::{ObserverSpec, QDtype, QScheme, QuantRange, Requant, RequantMode};

fn bn(c: usize, eps: f32) -> BatchNorm {
    BatchNorm {
        weight: Some(Array1::ones(c)),
        bias: Some(Array1::zeros(c)),
        running_mean: Array1::zeros(c),
        running_var: Array1::ones(c),
        eps,
        momentum: 0.1,
    }
}

/// Conv settings from the fuzzing campaign: each once panicked, aborted or wrapped.
fn hostile_convs() -> Vec<(Conv2dParams, &'static str)> {
    let p = |padding: usize, dilation: usize| Conv2dParams {
        stride: [1, 1],
        padding: [padding, padding],
        dilation: [dilation, dilation],
        groups: 1,
        ..Conv2dParams::default()
    };
    vec![
        (p(1 << 62, 1), "conv2d stride, padding and dilation must be at most 16777216, got 4611686018427387904"),
        (p(1 << 40, 1), "must be at most 16777216, got 1099511627776"),
        (p(1 << 63, 1), "got 9223372036854775808"),
        (p(0, 1 << 63), "got 9223372036854775808"),
        (p(usize::MAX, usize::MAX), "got 18446744073709551615"),
        (p(1 << 16, 1), "conv2d output [1, 2, 131074, 131074]: 34360786952 elements exceeds the limit of 268435456 elements"),
        (p(1 << 24, 1), "conv2d output [1, 2, 33554434, 33554434]: 2251800082120712 elements exceeds"),
    ]
}

fn conv_errors(b: &dyn HostOps, params: &Conv2dParams) -> Vec<String> {
    let x = Array4::<f32>::ones((1, 3, 4, 4));
    let conv = Conv2d {
        weight: Array4::ones((2, 3, 3, 3)),
        bias: Some(Array1::zeros(2)),
        params: *params,
    };
    let cfg = QatConfig {
        activation: Activation::Relu,
        freeze_bn: false,
        weight_observer: ObserverSpec::new(
            QDtype::QInt8,
            QScheme::PerChannelSymmetric,
            QuantRange::INT8,
            0,
        )
        .unwrap(),
    };
    let err = |r: qfuse::Result<()>| r.expect_err("accepted").to_string();
    vec![
        err(b.conv2d(&x, &conv.weight, None, params).map(drop)),
        err(b
            .conv_bn_act_eval(&x, &conv, &bn(2, 1e-5), Activation::Relu)
            .map(drop)),
        err(b
            .conv_bn_qat_forward(&x, &conv, &bn(2, 1e-5), &cfg)
            .map(drop)),
    ]
}

fn conv_geometry_refuses_hostile_settings() {
    for (params, want) in hostile_convs() {
        for e in conv_errors(&CpuBackend, &params) {
            assert!(e.contains(want), "{params:?}: `{want}` not in `{e}`");
        }
    }
    // conv_transpose2d: wrapping and huge outputs.
    let x = Array4::<f32>::ones((1, 1, 4, 4));
    let w = Array4::<f32>::ones((1, 1, 3, 3));
    for (p, want) in [
        (
            ConvTranspose2dParams {
                stride: [1 << 63, 1],
                ..Default::default()
            },
            "must be at most 16777216",
        ),
        (
            ConvTranspose2dParams {
                stride: [1 << 24, 1 << 24],
                ..Default::default()
            },
            "conv_transpose2d output [1, 1, 50331651, 50331651]",
        ),
    ] {
        let e = CpuBackend.conv_transpose2d(&x, &w, None, &p).unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
    }
}

fn conv_geometry_refusals_are_the_same_on_the_gpu() {
    let gpu = GpuBackend::new(crate::common::gpu().unwrap());
    for (params, _) in hostile_convs() {
        assert_eq!(
            conv_errors(&CpuBackend, &params),
            conv_errors(&gpu, &params)
        );
    }
}

/// Linear layers without in_features: empty inputs, an output of 2^29 elements.
fn huge_linear_errors(b: &dyn HostOps) -> Vec<String> {
    let (n, out) = (1usize << 15, 1usize << 14);
    let x = Array2::<f32>::zeros((n, 0));
    let w = Array2::<f32>::zeros((out, 0));
    let xq = Array2::<i8>::zeros((n, 0));
    let wq = Array2::<i8>::zeros((out, 0));
    let rq = Requant::new(&vec![0.01; out], RequantMode::Float, 0, (-128, 127)).unwrap();
    let err = |r: qfuse::Result<()>| r.expect_err("accepted").to_string();
    vec![
        err(b.linear(&x, &w, None).map(drop)),
        err(b.linear_int8(&xq, 0, &wq, None, &rq).map(drop)),
    ]
}

fn linear_outputs_are_capped() {
    let errs = huge_linear_errors(&CpuBackend);
    assert_eq!(
        errs,
        [
            "linear output [32768, 16384]: 536870912 elements exceeds the limit of 268435456 \
             elements",
            "quantized linear output [32768, 16384]: 536870912 elements exceeds the limit of \
             268435456 elements",
        ]
    );
}

fn linear_output_refusals_are_the_same_on_the_gpu() {
    let gpu = GpuBackend::new(crate::common::gpu().unwrap());
    assert_eq!(huge_linear_errors(&CpuBackend), huge_linear_errors(&gpu));
}

/// Observer ranges that exclude 0, refused by both backends with one message.
fn observer_errors(b: &dyn HostOps) -> Vec<String> {
    let spec = |lo, hi, scheme| ObserverSpec {
        dtype: QDtype::QInt8,
        qscheme: scheme,
        range: QuantRange {
            quant_min: lo,
            quant_max: hi,
        },
        axis: 0,
        eps: f32::EPSILON,
        customized_range: true,
    };
    let x = ArrayD::<f32>::from_elem(IxDyn(&[2, 3, 3, 3]), 0.5);
    let x4 = Array4::<f32>::ones((1, 3, 4, 4));
    let conv = Conv2d {
        weight: Array4::ones((2, 3, 3, 3)),
        bias: None,
        params: Conv2dParams::default(),
    };
    let mut out = Vec::new();
    for (lo, hi) in [(10, 20), (-128, -1)] {
        for scheme in [QScheme::PerTensorAffine, QScheme::PerChannelSymmetric] {
            out.push(
                b.calc_qparams(&x, &spec(lo, hi, scheme))
                    .unwrap_err()
                    .to_string(),
            );
            let cfg = QatConfig {
                activation: Activation::None,
                freeze_bn: false,
                weight_observer: spec(lo, hi, scheme),
            };
            out.push(
                b.conv_bn_qat_forward(&x4, &conv, &bn(2, 1e-5), &cfg)
                    .unwrap_err()
                    .to_string(),
            );
        }
    }
    out
}

fn observer_ranges_must_include_zero() {
    let errors = observer_errors(&CpuBackend);
    assert!(
        errors[0].contains("observer range must include 0, got [10, 20]"),
        "{errors:?}"
    );
    assert!(
        errors[7].contains("observer range must include 0, got [-128, -1]"),
        "{errors:?}"
    );
    assert!(ObserverSpec::new(
        QDtype::QUInt8,
        QScheme::PerTensorAffine,
        QuantRange {
            quant_min: 10,
            quant_max: 20
        },
        0
    )
    .is_err());
}

fn observer_range_refusals_are_the_same_on_the_gpu() {
    let gpu = GpuBackend::new(crate::common::gpu().unwrap());
    assert_eq!(observer_errors(&CpuBackend), observer_errors(&gpu));
}

/// A case file of `op` with `params`, tensors from a golden-like layout.
fn write_case(path: &Path, op: &str, params: &str, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let bytes = safetensors(
        tensors,
        &[("op", op), ("params", params), ("atol", "0"), ("rtol", "0")],
    );
    std::fs::write(path, bytes).unwrap();
}

fn hostile_case_values_fail_cleanly() {
    let d = tmp_dir("case_values");
    let conv_tensors = || {
        vec![
            ("in.x", vec![1, 1, 4, 4], vec![1.0; 16]),
            ("in.weight", vec![1, 1, 3, 3], vec![1.0; 9]),
            ("out.y", vec![1, 1, 2, 2], vec![9.0; 4]),
        ]
    };
    let conv = |padding: &str, dilation: &str| {
        format!(r#"{{"stride": 1, "padding": {padding}, "dilation": {dilation}, "groups": 1}}"#)
    };
    write_case(
        &d.join("pad62.safetensors"),
        "conv2d",
        &conv("4611686018427387904", "1"),
        &conv_tensors(),
    );
    write_case(
        &d.join("pad16.safetensors"),
        "conv2d",
        &conv("65536", "1"),
        &conv_tensors(),
    );
    write_case(
        &d.join("dil63.safetensors"),
        "conv2d",
        &conv("0", "9223372036854775808"),
        &conv_tensors(),
    );
    write_case(
        &d.join("same63.safetensors"),
        "conv2d",
        &conv("\"same\"", "9223372036854775808"),
        &conv_tensors(),
    );
    write_case(
        &d.join("eps39.safetensors"),
        "fold_linear_bn",
        r#"{"eps": 1e39}"#,
        &[
            ("in.weight", vec![1, 1], vec![1.0]),
            ("in.bn.running_mean", vec![1], vec![0.0]),
            ("in.bn.running_var", vec![1], vec![1.0]),
            ("out.weight", vec![1, 1], vec![1.0]),
        ],
    );
    write_case(
        &d.join("range.safetensors"),
        "calc_qparams",
        r#"{"dtype": "quint8", "qscheme": "per_tensor_affine", "quant_min": 10, "quant_max": 20}"#,
        &[
            ("in.x", vec![2], vec![1.0, 2.0]),
            ("out.scale", vec![1], vec![1.0]),
        ],
    );
    let o = qfuse(&["conformance", p(&d), "--backend", "cpu"]);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}{err}");
    for (file, want) in [
        ("pad62", "must be at most 16777216, got 4611686018427387904"),
        (
            "pad16",
            "conv2d output [1, 1, 131074, 131074]: 17180393476 elements exceeds the limit",
        ),
        ("dil63", "got 9223372036854775808"),
        ("same63", "9223372036854775808"),
        (
            "eps39",
            "params `eps` must be a number within float32's range",
        ),
        ("range", "observer range must include 0, got [10, 20]"),
    ] {
        let block = case_block(&out, file);
        assert!(
            block.trim_start().starts_with("FAIL") && block.contains(want),
            "{want}: {block}"
        );
    }
    assert!(out.contains("0 passed, 6 failed"), "{out}");
    assert!(!err.contains("panicked"), "{err}");
    std::fs::remove_dir_all(&d).unwrap();
}

crate::qfuse_tests! {
    non_regular_inputs_are_refused_not_read,
    odd_entries_in_a_case_folder_fail_as_cases,
    demo_never_writes_over_its_input,
    demo_outputs_appear_together_or_not_at_all,
    demo_counts_are_capped,
    a_fold_killed_mid_write_leaves_nothing_after_the_next_run,
    names_from_input_cannot_forge_lines,
    config_names_are_escaped,
    safetensors_rejections_say_what_is_wrong,
    conv_geometry_refuses_hostile_settings,
    conv_geometry_refusals_are_the_same_on_the_gpu: gpu,
    linear_outputs_are_capped,
    linear_output_refusals_are_the_same_on_the_gpu: gpu,
    observer_ranges_must_include_zero,
    observer_range_refusals_are_the_same_on_the_gpu: gpu,
    hostile_case_values_fail_cleanly,
}
