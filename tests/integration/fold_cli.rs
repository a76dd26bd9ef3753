//! `qfuse fold` and `qfuse::fold_state_dict`: BatchNorm folding in whole PyTorch state dicts.
//! State dicts are built here with the safetensors crate (f32 layers, int64
//! `num_batches_tracked`, unrelated float16/bfloat16/float64/int64/bool tensors), folded by the
//! library and by the binary, and checked against `qfuse::reference::fold`, byte for byte for
//! everything that is only copied, and against the PyTorch golden fold cases.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ndarray::{Array1, Array2, ArrayD, IxDyn};
use qfuse::backend::{CpuBackend, GpuBackend};
use qfuse::fold_state_dict::{fold_file, fold_state_dict, FoldSpec};
use qfuse::io::state_dict::{load_state_dict, parse_state_dict, Dtype, StateDict};
use qfuse::ops::BatchNorm;
use qfuse::reference::fold::{fuse_conv_bn_weights, fuse_linear_bn_weights};
use qfuse::Error;
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;

/// One tensor as the file stores it.
#[derive(Clone)]
struct T {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn f32s(shape: &[usize], seed: u32) -> (T, ArrayD<f32>) {
    let n: usize = shape.iter().product();
    // A small deterministic LCG, values in [-1, 1).
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect();
    let a = ArrayD::from_shape_vec(IxDyn(shape), v).unwrap();
    (
        T {
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            data: a.iter().flat_map(|x| x.to_le_bytes()).collect(),
        },
        a,
    )
}

fn positive(shape: &[usize], seed: u32) -> (T, ArrayD<f32>) {
    let (_, a) = f32s(shape, seed);
    let a = a.mapv(|x| 0.25 + x.abs());
    (
        T {
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            data: a.iter().flat_map(|x| x.to_le_bytes()).collect(),
        },
        a,
    )
}

fn raw(dtype: Dtype, shape: &[usize], fill: u8) -> T {
    let n: usize = shape.iter().product::<usize>() * dtype.size();
    T {
        dtype,
        shape: shape.to_vec(),
        data: (0..n).map(|i| fill.wrapping_add(i as u8 * 37)).collect(),
    }
}

fn i64s(v: &[i64]) -> T {
    T {
        dtype: Dtype::I64,
        shape: if v.len() == 1 { vec![] } else { vec![v.len()] },
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn serialize(tensors: &[(String, T)], meta: Option<HashMap<String, String>>) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, &meta).unwrap()
}

fn read(bytes: &[u8]) -> (HashMap<String, T>, Option<HashMap<String, String>>) {
    let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
    let st = SafeTensors::deserialize(bytes).unwrap();
    let map = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                T {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    data: v.data().to_vec(),
                },
            )
        })
        .collect();
    (map, header.metadata().clone())
}

fn as_f32(t: &T) -> ArrayD<f32> {
    assert_eq!(t.dtype, Dtype::F32);
    let v = t
        .data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    ArrayD::from_shape_vec(IxDyn(&t.shape), v).unwrap()
}

fn v1(a: &ArrayD<f32>) -> Array1<f32> {
    a.clone().into_dimensionality().unwrap()
}

/// A model's state dict: every layer kind of the brief plus tensors qfuse does not compute with.
struct Model {
    tensors: Vec<(String, T)>,
    f: HashMap<String, ArrayD<f32>>,
}

impl Model {
    fn add(&mut self, name: &str, (t, a): (T, ArrayD<f32>)) {
        self.tensors.push((name.to_string(), t));
        self.f.insert(name.to_string(), a);
    }

    fn add_raw(&mut self, name: &str, t: T) {
        self.tensors.push((name.to_string(), t));
    }

    fn bn(&mut self, name: &str, c: usize, affine: bool, seed: u32) {
        if affine {
            self.add(&format!("{name}.weight"), f32s(&[c], seed));
            self.add(&format!("{name}.bias"), f32s(&[c], seed + 1));
        }
        self.add(&format!("{name}.running_mean"), f32s(&[c], seed + 2));
        self.add(&format!("{name}.running_var"), positive(&[c], seed + 3));
        self.add_raw(&format!("{name}.num_batches_tracked"), i64s(&[1234]));
    }

    fn batch_norm(&self, name: &str, eps: f32) -> BatchNorm {
        BatchNorm {
            weight: self.f.get(&format!("{name}.weight")).map(v1),
            bias: self.f.get(&format!("{name}.bias")).map(v1),
            running_mean: v1(&self.f[&format!("{name}.running_mean")]),
            running_var: v1(&self.f[&format!("{name}.running_var")]),
            eps,
            momentum: 0.1,
        }
    }

    fn new() -> Self {
        let mut m = Model {
            tensors: Vec::new(),
            f: HashMap::new(),
        };
        // conv2d + bias + BatchNorm2d (a Sequential: features.0, features.1).
        m.add("features.0.weight", f32s(&[4, 3, 3, 3], 1));
        m.add("features.0.bias", f32s(&[4], 2));
        m.bn("features.1", 4, true, 10);
        // conv1d without bias + BatchNorm1d(affine=False).
        m.add("c1.weight", f32s(&[5, 2, 3], 3));
        m.bn("b1", 5, false, 20);
        // linear + BatchNorm1d.
        m.add("fc.weight", f32s(&[6, 8], 4));
        m.add("fc.bias", f32s(&[6], 5));
        m.bn("bnfc", 6, true, 30);
        // ConvTranspose2d (Cin 3, Cout 4) + BatchNorm2d.
        m.add("up.weight", f32s(&[3, 4, 2, 2], 6));
        m.add("up.bias", f32s(&[4], 7));
        m.bn("upbn", 4, true, 40);
        // conv2d for a conv+bn+relu fusion (ConvReLU2d names).
        m.add("block.conv.weight", f32s(&[2, 4, 1, 1], 8));
        m.bn("block.bn", 2, true, 50);
        // Tensors that are only copied.
        m.add("head.scale", f32s(&[3], 9));
        m.add_raw("emb.weight", raw(Dtype::F16, &[3, 2], 7));
        m.add_raw("emb.bf", raw(Dtype::BF16, &[4], 9));
        m.add_raw("stats.sum", raw(Dtype::F64, &[2, 2], 11));
        m.add_raw("step", i64s(&[1, -2, 3]));
        m.add_raw("mask", raw(Dtype::BOOL, &[5], 0));
        m.add_raw(
            "zp",
            T {
                dtype: Dtype::I32,
                shape: vec![2],
                data: [7i32, -9].iter().flat_map(|x| x.to_le_bytes()).collect(),
            },
        );
        m
    }

    fn metadata() -> HashMap<String, String> {
        HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("producer".to_string(), "fold_cli test".to_string()),
        ])
    }

    fn bytes(&self) -> Vec<u8> {
        serialize(&self.tensors, Some(Self::metadata()))
    }

    fn state_dict(&self) -> StateDict {
        parse_state_dict(&self.bytes(), "model").unwrap()
    }
}

/// What the folds of `Model` must give, from `qfuse::reference::fold`.
fn expected(m: &Model, eps: f32) -> Vec<(String, ArrayD<f32>)> {
    let mut out = Vec::new();
    let mut conv = |layer: &str, bn: &str, prefix: &str, transpose: bool| {
        let f = fuse_conv_bn_weights(
            &m.f[&format!("{layer}.weight")],
            m.f.get(&format!("{layer}.bias")).map(v1).as_ref(),
            &m.batch_norm(bn, eps),
            transpose,
        )
        .unwrap();
        out.push((format!("{prefix}.weight"), f.weight));
        out.push((format!("{prefix}.bias"), f.bias.into_dyn()));
    };
    conv("features.0", "features.1", "features.0", false);
    conv("c1", "b1", "c1", false);
    conv("up", "upbn", "up", true);
    conv("block.conv", "block.bn", "block.conv.0", false);
    let w: Array2<f32> = m.f["fc.weight"].clone().into_dimensionality().unwrap();
    let f =
        fuse_linear_bn_weights(&w, Some(&v1(&m.f["fc.bias"])), &m.batch_norm("bnfc", eps)).unwrap();
    out.push(("fc.weight".into(), f.weight));
    out.push(("fc.bias".into(), f.bias.into_dyn()));
    out
}

const COPIED: [&str; 7] = [
    "head.scale",
    "emb.weight",
    "emb.bf",
    "stats.sum",
    "step",
    "mask",
    "zp",
];

fn specs(eps: f32) -> Vec<FoldSpec> {
    vec![
        FoldSpec::new("features.0", "features.1").with_eps(eps),
        FoldSpec::new("c1", "b1").with_eps(eps),
        FoldSpec::new("fc", "bnfc").with_eps(eps),
        FoldSpec::new("up", "upbn").transposed(true).with_eps(eps),
        FoldSpec::parse("block.conv,block.bn,block.relu")
            .unwrap()
            .with_eps(eps),
    ]
}

/// Checks a folded output against the model: folded tensors equal the reference (bit for bit
/// with `exact`, else within 1e-6 relative), no BatchNorm tensor left, copies byte-identical,
/// metadata kept, nothing else.
fn check_output(m: &Model, out: &[u8], eps: f32, exact: bool) {
    let (got, meta) = read(out);
    assert_eq!(meta, Some(Model::metadata()));
    let want = expected(m, eps);
    let mut names: Vec<&str> = got.keys().map(String::as_str).collect();
    names.sort_unstable();
    let mut want_names: Vec<&str> = want.iter().map(|(n, _)| n.as_str()).chain(COPIED).collect();
    want_names.sort_unstable();
    assert_eq!(names, want_names);
    for (name, w) in &want {
        let g = as_f32(&got[name]);
        assert_eq!(g.shape(), w.shape(), "{name}");
        for (a, b) in g.iter().zip(w.iter()) {
            if exact {
                assert_eq!(a.to_bits(), b.to_bits(), "{name}: {a} vs {b}");
            } else {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                    "{name}: {a} vs {b}"
                );
            }
        }
    }
    let input: HashMap<&str, &T> = m.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    for name in COPIED {
        let (g, i) = (&got[name], input[name]);
        assert_eq!(g.dtype, i.dtype, "{name}");
        assert_eq!(g.shape, i.shape, "{name}");
        assert_eq!(g.data, i.data, "{name}");
    }
}

fn tmp_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qfuse_fold_cli_{}_{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn qfuse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qfuse"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn library_folds_every_kind_and_keeps_the_rest() {
    let m = Model::new();
    let sd = m.state_dict();
    assert_eq!(sd.dtype("features.1.num_batches_tracked"), Some(Dtype::I64));
    assert_eq!(sd.dtype("emb.weight"), Some(Dtype::F16));
    let before = sd.to_bytes().unwrap();
    let out = fold_state_dict(&CpuBackend, &sd, &specs(1e-5)).unwrap();
    // The input state dict is untouched.
    assert_eq!(sd.to_bytes().unwrap(), before);
    check_output(&m, &out.to_bytes().unwrap(), 1e-5, true);
    // Another eps gives other numbers, still the reference's.
    let out = fold_state_dict(&CpuBackend, &sd, &specs(1e-3)).unwrap();
    check_output(&m, &out.to_bytes().unwrap(), 1e-3, true);
    // A bias-free conv gains a bias; an affine=False BN works.
    assert_eq!(out.f32("c1.bias").unwrap().shape(), &[5]);
}

fn state_dict_round_trips_every_dtype() {
    let m = Model::new();
    let bytes = m.bytes();
    let sd = parse_state_dict(&bytes, "model").unwrap();
    let again = sd.to_bytes().unwrap();
    let (a, ma) = read(&bytes);
    let (b, mb) = read(&again);
    assert_eq!(ma, mb);
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert_eq!(t.dtype, b[name].dtype, "{name}");
        assert_eq!(t.shape, b[name].shape, "{name}");
        assert_eq!(t.data, b[name].data, "{name}");
    }
    // f32 / i32 accessors see raw tensors with their dtype.
    let e = sd.f32("emb.weight").unwrap_err();
    assert_eq!(
        e.to_string(),
        "tensor `emb.weight` is float16, expected float32"
    );
    assert!(matches!(e, Error::DtypeMismatch { .. }));
    assert!(sd.i32("step").is_err());
    assert_eq!(
        sd.i32("zp").unwrap().iter().copied().collect::<Vec<_>>(),
        vec![7, -9]
    );
    assert!(matches!(
        sd.f32("nope").unwrap_err(),
        Error::MissingTensor { .. }
    ));
}

fn gpu_backend_folds_the_same() {
    let Some(ctx) = common::gpu() else { return };
    let m = Model::new();
    let out = fold_state_dict(&GpuBackend::new(ctx), &m.state_dict(), &specs(1e-5)).unwrap();
    check_output(&m, &out.to_bytes().unwrap(), 1e-5, false);
}

fn binary_folds_and_leaves_the_input_alone() {
    let m = Model::new();
    let dir = tmp_dir("binary");
    let input = dir.join("model.safetensors");
    let mid = dir.join("mid.safetensors");
    let out = dir.join("out.safetensors");
    let bytes = m.bytes();
    std::fs::write(&input, &bytes).unwrap();
    // Conv, linear and conv+bn+relu in one run; ConvTranspose in a second, with --transpose.
    let o = qfuse(&[
        "fold",
        p(&input),
        "--fuse",
        "features.0,features.1",
        "--fuse",
        "c1, b1",
        "--fuse",
        "fc,bnfc",
        "--fuse",
        "block.conv,block.bn,block.relu",
        "--backend",
        "cpu",
        "-o",
        p(&mid),
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("folded `features.1` into conv `features.0` (weight [4, 3, 3, 3])"),
        "{stdout}"
    );
    assert!(
        stdout.contains("-> block.conv.0.weight, block.conv.0.bias"),
        "{stdout}"
    );
    assert!(stdout.contains("on cpu"), "{stdout}");
    let o = qfuse(&[
        "fold",
        p(&mid),
        "--fuse",
        "up,upbn",
        "--transpose",
        "--eps",
        "1e-5",
        "--backend",
        "cpu",
        "-o",
        p(&out),
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("into conv_transpose `up`"), "{stdout}");
    check_output(&m, &std::fs::read(&out).unwrap(), 1e-5, true);
    assert_eq!(std::fs::read(&input).unwrap(), bytes, "input file changed");
    // The output is a state dict qfuse reads back, with no temporary file left over.
    load_state_dict(&out).unwrap();
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["mid.safetensors", "model.safetensors", "out.safetensors"]
    );

    // --eps is honoured; auto picks a backend and says so when the CPU serves.
    let out2 = dir.join("out2.safetensors");
    let o = qfuse(&[
        "fold",
        p(&mid),
        "--fuse",
        "up,upbn",
        "--transpose",
        "--eps",
        "0.001",
        "-o",
        p(&out2),
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("on gpu") || stderr.contains("the CPU reference folds"),
        "{stdout}\n{stderr}"
    );
    let (got, _) = read(&std::fs::read(&out2).unwrap());
    let want = fuse_conv_bn_weights(
        &m.f["up.weight"],
        Some(&v1(&m.f["up.bias"])),
        &m.batch_norm("upbn", 1e-3),
        true,
    )
    .unwrap();
    let g = as_f32(&got["up.weight"]);
    for (a, b) in g.iter().zip(want.weight.iter()) {
        assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `qfuse fold` expecting failure: non-zero exit, `message` on stderr, no output file,
/// input unchanged.
fn fails(dir: &Path, input: &Path, args: &[&str], message: &str) {
    let out = dir.join("never.safetensors");
    let before = std::fs::read(input).ok();
    let mut all = vec!["fold", p(input)];
    all.extend_from_slice(args);
    if !args.contains(&"-o") {
        all.extend_from_slice(&["-o", p(&out)]);
    }
    let o = qfuse(&all);
    let (stdout, stderr) = text(&o);
    assert!(!o.status.success(), "{args:?} succeeded: {stdout}");
    assert!(
        stderr.contains(message),
        "{args:?}: stderr lacks `{message}`:\n{stderr}"
    );
    assert!(!out.exists(), "{args:?} wrote an output");
    assert_eq!(
        std::fs::read(input).ok(),
        before,
        "{args:?} changed the input"
    );
}

fn binary_errors() {
    let mut m = Model::new();
    // A BatchNorm whose channel count disagrees, a float16 layer, a module that is no BN.
    m.add("bad.weight", f32s(&[3, 2, 1, 1], 60));
    m.bn("bad_bn", 4, true, 61);
    m.add_raw("half.weight", raw(Dtype::F16, &[4, 2, 1, 1], 3));
    m.add("notbn.weight", f32s(&[4], 62));
    m.add("notbn.running_mean", f32s(&[4], 63));
    m.add("notbn.running_var", positive(&[4], 64));
    m.add("notbn.extra", f32s(&[4], 65));
    let dir = tmp_dir("errors");
    let input = dir.join("model.safetensors");
    std::fs::write(&input, m.bytes()).unwrap();
    fn with(fuse: &str) -> Vec<&str> {
        vec!["--fuse", fuse, "--backend", "cpu"]
    }

    fails(
        &dir,
        &input,
        &with("conv9,features.1"),
        "unknown module `conv9`",
    );
    fails(
        &dir,
        &input,
        &with("features.O,features.1"),
        "did you mean `features.0`?",
    );
    fails(&dir, &input, &with("c1,bn9"), "unknown module `bn9`");
    fails(
        &dir,
        &input,
        &with("c1,bn9"),
        "its BatchNorms (modules with a `.running_mean`): `b1`, `bad_bn`",
    );
    fails(
        &dir,
        &input,
        &with("c1.weight,b1"),
        "`c1.weight` is a tensor; give the module name, `c1`",
    );
    fails(
        &dir,
        &input,
        &with("bad,bad_bn"),
        "cannot fold `bad_bn` into `bad`: channel mismatch: conv `bad` has 3 output channels \
         but BatchNorm has 4",
    );
    fails(
        &dir,
        &input,
        &with("fc,features.1"),
        "channel mismatch: linear `fc` has 6 output channels but BatchNorm has 4",
    );
    fails(
        &dir,
        &input,
        &with("half,bad_bn"),
        "tensor `half.weight` is float16, expected float32",
    );
    fails(
        &dir,
        &input,
        &with("features.0,notbn"),
        "`notbn` is not a BatchNorm: it has the tensor `notbn.extra`",
    );
    fails(
        &dir,
        &input,
        &with("features,features.1"),
        "missing tensor `features.weight` (`features` is not a conv or linear layer",
    );
    fails(
        &dir,
        &input,
        &with("fc,bnfc,relu"),
        "PyTorch has no (Linear, BatchNorm1d, ReLU) fusion",
    );
    fails(
        &dir,
        &input,
        &[
            "--fuse",
            "features.0,features.1",
            "--fuse",
            "c1,features.1",
            "--backend",
            "cpu",
        ],
        "module `features.1` is fused twice: in `features.0,features.1` and in `c1,features.1`",
    );
    fails(&dir, &input, &with("c1,c1"), "names module `c1` twice");
    for bad in ["conv1", "a,,b", "a,b,c,d", "a,b.", ".a,b", "a b,c"] {
        fails(&dir, &input, &with(bad), &format!("--fuse `{bad}`"));
    }
    fails(&dir, &input, &with("a,b,c,d"), "4 module names given");
    fails(
        &dir,
        &input,
        &["--fuse", "c1,b1", "--eps", "-1", "--backend", "cpu"],
        "eps must be finite and >= 0",
    );
    // No --fuse at all is a usage error.
    fails(&dir, &input, &["--backend", "cpu"], "--fuse");

    // The input as output, directly, through another spelling and through a symlink.
    let same = [&with("c1,b1")[..], &["-o", p(&input)][..]].concat();
    fails(&dir, &input, &same, "is the input file");
    let dotted = dir.join(".").join("model.safetensors");
    let same = [&with("c1,b1")[..], &["-o", p(&dotted)][..]].concat();
    fails(&dir, &input, &same, "is the input file");
    #[cfg(unix)]
    {
        let link = dir.join("link.safetensors");
        std::os::unix::fs::symlink(&input, &link).unwrap();
        let same = [&with("c1,b1")[..], &["-o", p(&link)][..]].concat();
        fails(&dir, &input, &same, "is the input file");
        let hard = dir.join("hard.safetensors");
        std::fs::hard_link(&input, &hard).unwrap();
        let same = [&with("c1,b1")[..], &["-o", p(&hard)][..]].concat();
        fails(&dir, &input, &same, "is the input file");
    }

    // Unreadable and non-safetensors inputs.
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"this is not a safetensors file").unwrap();
    fails(&dir, &junk, &with("c1,b1"), "malformed state dict");
    let missing = dir.join("missing.safetensors");
    fails(&dir, &missing, &with("c1,b1"), "I/O error on");
    let _ = std::fs::remove_dir_all(&dir);
}

fn library_errors_are_typed() {
    let m = Model::new();
    let sd = m.state_dict();
    let fold = |spec: FoldSpec| fold_state_dict(&CpuBackend, &sd, &[spec]).unwrap_err();
    assert!(matches!(
        fold(FoldSpec::new("nope", "b1")),
        Error::UnknownModule { .. }
    ));
    match fold(FoldSpec::new("fc", "features.1")) {
        Error::Fold { layer, bn, source } => {
            assert_eq!((layer.as_str(), bn.as_str()), ("fc", "features.1"));
            assert!(matches!(*source, Error::ChannelMismatch { .. }), "{source}");
        }
        e => panic!("{e}"),
    }
    // A ConvTranspose folded as a plain conv: 3 out channels vs BN 4.
    assert!(matches!(
        fold(FoldSpec::new("up", "upbn")),
        Error::Fold { .. }
    ));
    // ConvTranspose + ReLU is not a PyTorch fusion.
    let e = fold(FoldSpec::new("up", "upbn").transposed(true).with_relu("r"));
    assert!(
        e.to_string().contains("(ConvTranspose, BatchNorm, ReLU)"),
        "{e}"
    );
    assert!(matches!(
        FoldSpec::parse("x").unwrap_err(),
        Error::InvalidArgument(_)
    ));
    let e = fold_state_dict(
        &CpuBackend,
        &sd,
        &[FoldSpec::new("c1", "b1"), FoldSpec::new("fc", "b1")],
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    // Output would collide: `block.conv.0.weight` exists already.
    let mut sd2 = sd.clone();
    sd2.tensors.insert(
        "block.conv.0.weight".into(),
        qfuse::io::state_dict::HostTensor::F32(ArrayD::zeros(IxDyn(&[1]))),
    );
    let e = fold_state_dict(
        &CpuBackend,
        &sd2,
        &[FoldSpec::new("block.conv", "block.bn").with_relu("relu")],
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("would replace another tensor"),
        "{e}"
    );
    // DataParallel prefixes: the suggestion finds the wrapped name.
    let mut dp = StateDict::default();
    for (n, t) in &sd.tensors {
        dp.tensors.insert(format!("module.{n}"), t.clone());
    }
    let e = fold_state_dict(&CpuBackend, &dp, &[FoldSpec::new("c1", "module.b1")]).unwrap_err();
    assert!(e.to_string().contains("did you mean `module.c1`?"), "{e}");
    // fold_file refuses to write over its input.
    let dir = tmp_dir("lib");
    let input = dir.join("m.safetensors");
    std::fs::write(&input, m.bytes()).unwrap();
    let e = fold_file(&CpuBackend, &input, &input, &[FoldSpec::new("c1", "b1")]).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    let e = fold_file(
        &CpuBackend,
        &dir.join("absent.safetensors"),
        &dir.join("o.safetensors"),
        &[FoldSpec::new("c1", "b1")],
    )
    .unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    std::fs::write(dir.join("junk"), b"junk").unwrap();
    let e = fold_file(
        &CpuBackend,
        &dir.join("junk"),
        &dir.join("o.safetensors"),
        &[FoldSpec::new("c1", "b1")],
    )
    .unwrap_err();
    assert!(matches!(e, Error::MalformedStateDict { .. }), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every golden fold case, rebuilt as a model state dict (`net.3` = the layer, `net.4` = its
/// BatchNorm, plus an int64 counter) and folded through the binary, matches PyTorch's
/// `out.weight` / `out.bias` within the case's tolerance.
fn golden_fold_cases_through_the_binary() {
    let mut files = common::golden::golden_files("fold_conv_bn");
    files.extend(common::golden::golden_files("fold_linear_bn"));
    let tmp = tmp_dir("golden");
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        let (case, meta) = read(&bytes);
        let meta = meta.unwrap();
        let params: serde_json::Value = serde_json::from_str(&meta["params"]).unwrap();
        let (atol, rtol): (f32, f32) =
            (meta["atol"].parse().unwrap(), meta["rtol"].parse().unwrap());
        let layer = if case.contains_key("in.conv.weight") {
            "conv"
        } else {
            "linear"
        };
        let mut tensors = vec![("net.9.weight".to_string(), raw(Dtype::F16, &[2], 1))];
        for (k, t) in &case {
            if let Some(rest) = k.strip_prefix(&format!("in.{layer}.")) {
                tensors.push((format!("net.3.{rest}"), t.clone()));
            } else if let Some(rest) = k.strip_prefix("in.bn.") {
                tensors.push((format!("net.4.{rest}"), t.clone()));
            }
        }
        tensors.push(("net.4.num_batches_tracked".into(), i64s(&[7])));
        let input = tmp.join("in.safetensors");
        let output = tmp.join("out.safetensors");
        std::fs::write(&input, serialize(&tensors, None)).unwrap();
        let eps = params["eps"].as_f64().unwrap().to_string();
        let mut args = vec![
            "fold",
            p(&input),
            "--fuse",
            "net.3,net.4",
            "--eps",
            &eps,
            "--backend",
            "cpu",
            "-o",
            p(&output),
        ];
        if params["transpose"].as_bool() == Some(true) {
            args.push("--transpose");
        }
        let o = qfuse(&args);
        let (stdout, stderr) = text(&o);
        assert!(o.status.success(), "{}: {stdout}\n{stderr}", file.display());
        let (got, _) = read(&std::fs::read(&output).unwrap());
        let mut names: Vec<&str> = got.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["net.3.bias", "net.3.weight", "net.9.weight"]);
        for what in ["weight", "bias"] {
            let g = as_f32(&got[&format!("net.3.{what}")]);
            let w = as_f32(&case[&format!("out.{what}")]);
            assert_eq!(g.shape(), w.shape(), "{}: {what}", file.display());
            for (a, b) in g.iter().zip(w.iter()) {
                assert!(
                    (a - b).abs() <= atol + rtol * b.abs(),
                    "{}: {what} {a} vs {b}",
                    file.display()
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Per-fusion options: mixed BatchNorm eps and Conv + ConvTranspose folded in one run, the
/// global `--eps` / `--transpose` being the defaults each fusion can override; the same
/// result whichever default the options override.
fn binary_folds_mixed_eps_and_transpose_in_one_run() {
    let m = Model::new();
    let dir = tmp_dir("per-fusion");
    let input = dir.join("model.safetensors");
    std::fs::write(&input, m.bytes()).unwrap();
    let run = |out: &Path, args: &[&str]| {
        let mut all = vec!["fold", p(&input), "--backend", "cpu", "-o", p(out)];
        all.extend_from_slice(args);
        let o = qfuse(&all);
        let (stdout, stderr) = text(&o);
        assert!(o.status.success(), "{args:?}: {stdout}\n{stderr}");
        std::fs::read(out).unwrap()
    };
    let a = run(
        &dir.join("a.safetensors"),
        &[
            "--eps",
            "1e-4",
            "--fuse",
            "features.0,features.1:eps=1e-3",
            "--fuse",
            "c1,b1",
            "--fuse",
            "fc,bnfc:eps=0.01",
            "--fuse",
            "up,upbn:transpose:eps=1e-3",
            "--fuse",
            "block.conv,block.bn,block.relu:eps=2e-5",
        ],
    );
    // The same folds with --transpose as the default, overridden for every conv.
    let b = run(
        &dir.join("b.safetensors"),
        &[
            "--transpose",
            "--eps",
            "1e-3",
            "--fuse",
            "features.0,features.1:transpose=false",
            "--fuse",
            "c1,b1:transpose=false:eps=1e-4",
            "--fuse",
            "fc,bnfc:eps=0.01",
            "--fuse",
            "up,upbn",
            "--fuse",
            "block.conv,block.bn,block.relu:eps=2e-5:transpose=false",
        ],
    );
    // Same tensors, bit for bit (the header's metadata order may differ between runs).
    let same = |x: &[u8], y: &[u8], what: &str| {
        let ((x, xm), (y, ym)) = (read(x), read(y));
        assert_eq!(xm, ym, "{what}: metadata");
        let mut names: Vec<&String> = x.keys().collect();
        names.sort();
        let mut y_names: Vec<&String> = y.keys().collect();
        y_names.sort();
        assert_eq!(names, y_names, "{what}");
        for n in names {
            let (t, u) = (&x[n], &y[n]);
            assert!(
                t.dtype == u.dtype && t.shape == u.shape && t.data == u.data,
                "{what}: `{n}` differs"
            );
        }
    };
    same(&a, &b, "--transpose default");
    // What the library folds with the same specs, and each fold against the reference with
    // its own eps.
    let specs = vec![
        FoldSpec::new("features.0", "features.1").with_eps(1e-3),
        FoldSpec::new("c1", "b1").with_eps(1e-4),
        FoldSpec::new("fc", "bnfc").with_eps(0.01),
        FoldSpec::new("up", "upbn").transposed(true).with_eps(1e-3),
        FoldSpec::new("block.conv", "block.bn")
            .with_relu("block.relu")
            .with_eps(2e-5),
    ];
    let lib = fold_state_dict(&CpuBackend, &m.state_dict(), &specs).unwrap();
    same(&a, &lib.to_bytes().unwrap(), "library");
    let (got, _) = read(&a);
    for (layer, bn, eps, transpose) in [
        ("features.0", "features.1", 1e-3, false),
        ("c1", "b1", 1e-4, false),
        ("up", "upbn", 1e-3, true),
    ] {
        let want = fuse_conv_bn_weights(
            &m.f[&format!("{layer}.weight")],
            m.f.get(&format!("{layer}.bias")).map(v1).as_ref(),
            &m.batch_norm(bn, eps),
            transpose,
        )
        .unwrap();
        assert_eq!(
            as_f32(&got[&format!("{layer}.weight")]),
            want.weight,
            "{layer}"
        );
        assert_eq!(
            as_f32(&got[&format!("{layer}.bias")]),
            want.bias.into_dyn(),
            "{layer}"
        );
    }
    let w: Array2<f32> = m.f["fc.weight"].clone().into_dimensionality().unwrap();
    let fc = fuse_linear_bn_weights(&w, Some(&v1(&m.f["fc.bias"])), &m.batch_norm("bnfc", 0.01))
        .unwrap();
    assert_eq!(as_f32(&got["fc.weight"]), fc.weight);
    let default_eps =
        fuse_linear_bn_weights(&w, Some(&v1(&m.f["fc.bias"])), &m.batch_norm("bnfc", 1e-4))
            .unwrap();
    assert_ne!(
        fc.weight, default_eps.weight,
        "eps must matter for this test"
    );

    // Bad options: named, nothing written.
    for (fuse, message) in [
        ("c1,b1:eps", "option `eps` needs a value (eps=E)"),
        ("c1,b1:eps=oops", "eps `oops` is not a number"),
        (
            "c1,b1:transpose=maybe",
            "option `transpose=maybe` needs no value, true or false",
        ),
        ("c1,b1:eps=1:eps=2", "option `eps` given twice"),
        ("c1,b1:fast", "unknown option `fast`"),
        ("c1,b1:eps=-1", "eps must be finite and >= 0"),
    ] {
        fails(&dir, &input, &["--fuse", fuse, "--backend", "cpu"], message);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `FoldSpec::parse` / `parse_with_defaults`: per-fusion options after a colon.
fn fold_spec_options_parse() {
    let s = FoldSpec::parse("a.0,b:eps=1e-3").unwrap();
    assert_eq!(
        (s.layer.as_str(), s.bn.as_str(), s.eps, s.transpose),
        ("a.0", "b", 1e-3, false)
    );
    let s = FoldSpec::parse(" a , b , r :transpose: eps = 0.5").unwrap();
    assert_eq!(s.relu.as_deref(), Some("r"));
    assert_eq!((s.eps, s.transpose), (0.5, true));
    let s = FoldSpec::parse_with_defaults("a,b", 0.25, true).unwrap();
    assert_eq!((s.eps, s.transpose), (0.25, true));
    let s = FoldSpec::parse_with_defaults("a,b:transpose=false:eps=2", 0.25, true).unwrap();
    assert_eq!((s.eps, s.transpose), (2.0, false));
    assert_eq!(FoldSpec::parse("a,b").unwrap(), FoldSpec::new("a", "b"));
    for bad in [
        "a,b:",
        "a,b:eps=",
        "a,b:transpose:transpose",
        "a:eps=1",
        "a,b,c,d:eps=1",
    ] {
        let e = FoldSpec::parse(bad).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{bad}: {e}");
        assert!(e.to_string().contains(":eps=E"), "{bad}: {e}");
    }
}

crate::qfuse_tests! {
    library_folds_every_kind_and_keeps_the_rest,
    state_dict_round_trips_every_dtype,
    gpu_backend_folds_the_same: gpu,
    binary_folds_and_leaves_the_input_alone,
    binary_errors,
    library_errors_are_typed,
    golden_fold_cases_through_the_binary,
    binary_folds_mixed_eps_and_transpose_in_one_run,
    fold_spec_options_parse,
}
