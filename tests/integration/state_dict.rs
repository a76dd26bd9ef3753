//! Module state dicts: PyTorch's names (plain, fused, intrinsic, QAT), the int64
//! `num_batches_tracked`, save → load round trips with identical forwards, a fused model's
//! state dict in a freshly built fused model, strict / non-strict key errors with PyTorch's
//! messages, shape and dtype mismatches.

use ndarray::{Array1, Array2, Array4, ArrayD, IxDyn};
use qfuse::fuse::{fuse_modules, fuse_modules_qat, FuseOptions};
use qfuse::io::state_dict::{Dtype, HostTensor};
use qfuse::io::{load_state_dict, RawTensor, StateDict};
use qfuse::nn::{Container, Layer, Module};
use qfuse::ops::{BatchNorm, Conv2dParams};
use qfuse::qat::{self, QatQConfig};
use qfuse::{CpuBackend, Error};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn arr(&mut self, shape: &[usize]) -> ArrayD<f32> {
        let n: usize = shape.iter().product();
        ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(|_| self.next()).collect()).unwrap()
    }
    fn arr1(&mut self, n: usize, lo: f32, hi: f32) -> Array1<f32> {
        Array1::from(
            (0..n)
                .map(|_| lo + (hi - lo) * (self.next() + 1.0) / 2.0)
                .collect::<Vec<_>>(),
        )
    }
}

fn bn(rng: &mut Rng, c: usize) -> BatchNorm {
    BatchNorm {
        weight: Some(rng.arr1(c, 0.5, 1.5)),
        bias: Some(rng.arr1(c, -0.5, 0.5)),
        running_mean: rng.arr1(c, -0.5, 0.5),
        running_var: rng.arr1(c, 0.5, 2.0),
        eps: 1e-5,
        momentum: 0.1,
    }
}

/// A small net with named children: conv1, bn1, relu, flatten, fc (seeded weights).
fn net(seed: u64) -> Module {
    let mut rng = Rng(seed);
    let w: Array4<f32> = (rng.arr(&[4, 3, 3, 3]) * 0.4)
        .into_dimensionality()
        .unwrap();
    let fc: Array2<f32> = (rng.arr(&[5, 4 * 4 * 4]) * 0.2)
        .into_dimensionality()
        .unwrap();
    let c = Container::new("Net")
        .with_child(
            "conv1",
            Module::conv2d(
                w,
                Some(rng.arr1(4, -0.1, 0.1)),
                Conv2dParams {
                    padding: [1, 1],
                    ..Default::default()
                },
            )
            .unwrap(),
        )
        .unwrap()
        .with_child("bn1", Module::batch_norm2d(bn(&mut rng, 4)).unwrap())
        .unwrap()
        .with_child("relu", Module::relu())
        .unwrap()
        .with_child("flatten", Module::flatten(1, -1))
        .unwrap()
        .with_child(
            "fc",
            Module::linear(fc, Some(rng.arr1(5, -0.1, 0.1))).unwrap(),
        )
        .unwrap();
    Module::container(c)
}

fn input(seed: u64) -> ArrayD<f32> {
    Rng(seed).arr(&[2, 3, 4, 4])
}

fn inplace() -> FuseOptions {
    FuseOptions {
        inplace: true,
        ..Default::default()
    }
}

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "qfuse-sd-{}-{name}.safetensors",
        std::process::id()
    ))
}

fn nbt(sd: &StateDict, key: &str) -> i64 {
    let r = sd
        .raw
        .get(key)
        .expect("num_batches_tracked is a raw tensor");
    assert_eq!(r.dtype(), Dtype::I64);
    assert_eq!(r.shape(), &[] as &[usize]);
    i64::from_le_bytes(r.data().try_into().unwrap())
}

fn pytorch_names_plain_fused_intrinsic_qat() {
    let m = net(1);
    assert_eq!(
        m.state_dict_keys(),
        [
            "conv1.weight",
            "conv1.bias",
            "bn1.weight",
            "bn1.bias",
            "bn1.running_mean",
            "bn1.running_var",
            "bn1.num_batches_tracked",
            "fc.weight",
            "fc.bias",
        ]
    );
    let sd = m.state_dict().unwrap();
    assert_eq!(sd.dtype("conv1.weight"), Some(Dtype::F32));
    assert_eq!(sd.shape("conv1.weight"), Some(&[4, 3, 3, 3][..]));
    assert_eq!(nbt(&sd, "bn1.num_batches_tracked"), 0);

    // Eval fusion: ConvReLU2d is a Sequential(conv, relu) in PyTorch.
    let mut fused = net(1);
    fused.eval();
    fuse_modules(&mut fused, ["conv1", "bn1", "relu"], inplace()).unwrap();
    assert_eq!(
        fused.state_dict_keys(),
        ["conv1.0.weight", "conv1.0.bias", "fc.weight", "fc.bias"]
    );

    // QAT fusion: intrinsic ConvBnReLU2d = Sequential(conv, bn, relu).
    let mut intr = net(1);
    fuse_modules_qat(&mut intr, ["conv1", "bn1", "relu"], inplace()).unwrap();
    assert_eq!(
        intr.state_dict_keys(),
        [
            "conv1.0.weight",
            "conv1.0.bias",
            "conv1.1.weight",
            "conv1.1.bias",
            "conv1.1.running_mean",
            "conv1.1.running_var",
            "conv1.1.num_batches_tracked",
            "fc.weight",
            "fc.bias",
        ]
    );

    // QAT modules: torch.ao's names.
    qat::prepare_qat(&mut intr, &QatQConfig::default_qat("x86").unwrap()).unwrap();
    let fq = |p: &str| {
        [
            format!("{p}.fake_quant_enabled"),
            format!("{p}.observer_enabled"),
            format!("{p}.scale"),
            format!("{p}.zero_point"),
            format!("{p}.activation_post_process.eps"),
            format!("{p}.activation_post_process.min_val"),
            format!("{p}.activation_post_process.max_val"),
        ]
    };
    let mut want: Vec<String> = [
        "conv1.weight",
        "conv1.bias",
        "conv1.bn.weight",
        "conv1.bn.bias",
        "conv1.bn.running_mean",
        "conv1.bn.running_var",
        "conv1.bn.num_batches_tracked",
    ]
    .map(String::from)
    .to_vec();
    want.extend(fq("conv1.weight_fake_quant"));
    want.extend(fq("conv1.activation_post_process"));
    want.extend(["fc.weight".to_string(), "fc.bias".to_string()]);
    want.extend(fq("fc.weight_fake_quant"));
    want.extend(fq("fc.activation_post_process"));
    assert_eq!(intr.state_dict_keys(), want);
    let sd = intr.state_dict().unwrap();
    let flag = &sd.raw["conv1.weight_fake_quant.fake_quant_enabled"];
    assert_eq!(
        (flag.dtype(), flag.shape(), flag.data()),
        (Dtype::U8, &[1][..], &[1u8][..])
    );
    assert_eq!(
        sd.dtype("conv1.weight_fake_quant.zero_point"),
        Some(Dtype::I32)
    );
    assert_eq!(sd.shape("conv1.weight_fake_quant.scale"), Some(&[1][..]));
    // Per-channel observers start empty; per-tensor ones are 0-dim ±inf.
    assert_eq!(
        sd.shape("conv1.weight_fake_quant.activation_post_process.min_val"),
        Some(&[0][..])
    );
    let HostTensor::F32(m) =
        &sd.tensors["conv1.activation_post_process.activation_post_process.min_val"]
    else {
        panic!("f32")
    };
    assert_eq!(m.shape(), &[] as &[usize]);
    assert_eq!(m[IxDyn(&[])], f32::INFINITY);
    let HostTensor::F32(e) = &sd.tensors["conv1.weight_fake_quant.activation_post_process.eps"]
    else {
        panic!("f32")
    };
    assert_eq!(e.as_slice().unwrap(), &[f32::EPSILON]);
}

/// A QAT model trained for a few steps: save → load into a fresh model → identical
/// state dict and identical forwards (eval and training).
fn round_trip_save_load_identical_forward() {
    let b = &CpuBackend;
    let build = |seed: u64| {
        let mut m = net(seed);
        fuse_modules_qat(&mut m, ["conv1", "bn1", "relu"], inplace()).unwrap();
        qat::prepare_qat(&mut m, &QatQConfig::default_qat("x86").unwrap()).unwrap();
        m
    };
    let mut trained = build(1);
    for i in 0..3 {
        trained.forward(b, &input(10 + i)).unwrap();
    }
    qat::disable_observer(&mut trained);
    let sd = trained.state_dict().unwrap();
    assert_eq!(nbt(&sd, "conv1.bn.num_batches_tracked"), 3);
    assert_eq!(sd.shape("conv1.weight_fake_quant.scale"), Some(&[4][..]));
    assert_eq!(
        sd.raw["conv1.weight_fake_quant.observer_enabled"].data(),
        &[0u8]
    );
    let path = tmp("round-trip");
    sd.save(&path).unwrap();
    let loaded = load_state_dict(&path).unwrap();
    std::fs::remove_file(&path).ok();

    let mut fresh = build(2);
    assert_ne!(
        fresh.state_dict().unwrap().tensors["conv1.weight"],
        sd.tensors["conv1.weight"]
    );
    let keys = fresh.load_state_dict(&loaded, true).unwrap();
    assert!(keys.is_empty(), "{keys:?}");
    let again = fresh.state_dict().unwrap();
    assert_eq!(again.tensors, sd.tensors);
    assert_eq!(again.raw, sd.raw);
    let Layer::Qat(q) = fresh.get("conv1").unwrap().layer() else {
        panic!("QAT")
    };
    assert_eq!(q.bn.as_ref().unwrap().num_batches_tracked, 3);
    assert!(!q.weight_fake_quant.observer_enabled);

    for mode in [false, true] {
        let (mut a, mut c) = (trained.clone(), fresh.clone());
        a.train(mode);
        c.train(mode);
        let x = input(20);
        assert_eq!(
            a.forward(b, &x).unwrap(),
            c.forward(b, &x).unwrap(),
            "train={mode}"
        );
    }
}

fn fused_state_dict_loads_into_a_fresh_fused_model() {
    let b = &CpuBackend;
    let fused = |seed: u64| {
        let mut m = net(seed);
        m.eval();
        fuse_modules(&mut m, ["conv1", "bn1", "relu"], inplace()).unwrap();
        m
    };
    let src = fused(1);
    let path = tmp("fused");
    src.state_dict().unwrap().save(&path).unwrap();
    let sd = load_state_dict(&path).unwrap();
    std::fs::remove_file(&path).ok();
    let mut dst = fused(7);
    let x = input(3);
    assert_ne!(
        src.clone().forward(b, &x).unwrap(),
        dst.clone().forward(b, &x).unwrap()
    );
    dst.load_state_dict(&sd, true).unwrap();
    assert_eq!(
        src.clone().forward(b, &x).unwrap(),
        dst.forward(b, &x).unwrap()
    );

    // The intrinsic (QAT-fused) form too.
    let intr = |seed: u64| {
        let mut m = net(seed);
        fuse_modules_qat(&mut m, ["conv1", "bn1", "relu"], inplace()).unwrap();
        m
    };
    let mut src = intr(1);
    src.forward(b, &x).unwrap();
    let mut dst = intr(9);
    dst.load_state_dict(&src.state_dict().unwrap(), true)
        .unwrap();
    src.eval();
    dst.eval();
    assert_eq!(src.forward(b, &x).unwrap(), dst.forward(b, &x).unwrap());
}

fn strict_and_non_strict_key_errors() {
    let mut m = net(1);
    let before = m.state_dict().unwrap();
    let mut sd = net(2).state_dict().unwrap();
    sd.remove("fc.bias");
    sd.remove("bn1.running_var");
    sd.tensors.insert(
        "extra.weight".into(),
        HostTensor::F32(ArrayD::zeros(IxDyn(&[2]))),
    );
    let e = m.load_state_dict(&sd, true).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(&e, Error::StateDictKeys { missing, unexpected, .. }
            if missing == &["bn1.running_var", "fc.bias"] && unexpected == &["extra.weight"]),
        "{e:?}"
    );
    assert_eq!(
        msg,
        "Error(s) in loading state_dict for Net:\n\tMissing key(s) in state_dict: \
         \"bn1.running_var\", \"fc.bias\".\n\tUnexpected key(s) in state_dict: \
         \"extra.weight\"."
    );
    // Strict failure leaves the model unchanged.
    assert_eq!(m.state_dict().unwrap().tensors, before.tensors);

    // Non-strict: the rest loads, the lists come back.
    let keys = m.load_state_dict(&sd, false).unwrap();
    assert_eq!(keys.missing_keys, ["bn1.running_var", "fc.bias"]);
    assert_eq!(keys.unexpected_keys, ["extra.weight"]);
    let now = m.state_dict().unwrap();
    assert_eq!(now.tensors["conv1.weight"], sd.tensors["conv1.weight"]);
    assert_eq!(now.tensors["fc.bias"], before.tensors["fc.bias"]);

    // Only unexpected keys.
    let mut sd2 = net(2).state_dict().unwrap();
    sd2.tensors.insert(
        "relu.weight".into(),
        HostTensor::F32(ArrayD::zeros(IxDyn(&[1]))),
    );
    let e = net(1).load_state_dict(&sd2, true).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Error(s) in loading state_dict for Net:\n\tUnexpected key(s) in state_dict: \
         \"relu.weight\"."
    );
}

fn shape_and_dtype_mismatches() {
    let mut m = net(1);
    let mut sd = net(2).state_dict().unwrap();
    sd.tensors.insert(
        "conv1.weight".into(),
        HostTensor::F32(ArrayD::zeros(IxDyn(&[8, 3, 3, 3]))),
    );
    for strict in [true, false] {
        let e = m.load_state_dict(&sd, strict).unwrap_err();
        match &e {
            Error::ShapeMismatch {
                context,
                expected,
                got,
            } => {
                assert!(context.contains("conv1.weight"), "{context}");
                assert_eq!(expected, &[4, 3, 3, 3]);
                assert_eq!(got, &[8, 3, 3, 3]);
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("conv1.weight"));
    }
    assert_eq!(
        m.state_dict().unwrap().tensors["conv1.weight"],
        net(1).state_dict().unwrap().tensors["conv1.weight"]
    );

    // A half-precision weight is a dtype error (PyTorch would cast).
    let mut sd = net(2).state_dict().unwrap();
    sd.remove("fc.bias");
    sd.raw.insert(
        "fc.bias".into(),
        RawTensor::new(Dtype::F16, vec![5], vec![0; 10]).unwrap(),
    );
    let e = m.load_state_dict(&sd, true).unwrap_err();
    assert!(
        matches!(&e, Error::DtypeMismatch { name, got, .. } if name == "fc.bias" && got == "float16"),
        "{e:?}"
    );
}

fn num_batches_tracked_is_int64() {
    let b = &CpuBackend;
    let mut m = net(1);
    for i in 0..5 {
        m.forward(b, &input(i)).unwrap();
    }
    let sd = m.state_dict().unwrap();
    assert_eq!(nbt(&sd, "bn1.num_batches_tracked"), 5);
    let bytes = sd.to_bytes().unwrap();
    let back = qfuse::io::state_dict::parse_state_dict(&bytes, "bytes").unwrap();
    assert_eq!(nbt(&back, "bn1.num_batches_tracked"), 5);

    let count = |m: &Module| match m.get("bn1").unwrap().layer() {
        Layer::BatchNorm2d(b) => b.num_batches_tracked,
        _ => unreachable!(),
    };
    let mut fresh = net(1);
    fresh.load_state_dict(&back, true).unwrap();
    assert_eq!(count(&fresh), 5);

    // int32 and [1]-shaped are accepted; a float is not.
    let mut sd32 = back.clone();
    sd32.remove("bn1.num_batches_tracked");
    sd32.tensors.insert(
        "bn1.num_batches_tracked".into(),
        HostTensor::I32(ArrayD::from_elem(IxDyn(&[1]), 7)),
    );
    fresh.load_state_dict(&sd32, true).unwrap();
    assert_eq!(count(&fresh), 7);
    let mut sdf = back.clone();
    sdf.remove("bn1.num_batches_tracked");
    sdf.tensors.insert(
        "bn1.num_batches_tracked".into(),
        HostTensor::F32(ArrayD::zeros(IxDyn(&[]))),
    );
    assert!(matches!(
        fresh.load_state_dict(&sdf, true).unwrap_err(),
        Error::DtypeMismatch { .. }
    ));

    // Missing num_batches_tracked is not reported (PyTorch, no version metadata); it keeps
    // its value.
    let mut none = back.clone();
    none.remove("bn1.num_batches_tracked");
    let keys = fresh.load_state_dict(&none, true).unwrap();
    assert!(keys.is_empty());
    assert_eq!(count(&fresh), 7);
}

fn fake_quant_buffers_take_the_loaded_length() {
    let b = &CpuBackend;
    let build = || {
        let mut m = net(1);
        fuse_modules_qat(&mut m, ["conv1", "bn1", "relu"], inplace()).unwrap();
        qat::prepare_qat(&mut m, &QatQConfig::default_qat("x86").unwrap()).unwrap();
        m
    };
    let mut trained = build();
    trained.forward(b, &input(1)).unwrap();
    let sd = trained.state_dict().unwrap();
    // A fresh per-channel fake quant has scale [1] and empty statistics; it takes [4].
    let mut fresh = build();
    fresh.load_state_dict(&sd, true).unwrap();
    let Layer::Qat(q) = fresh.get("conv1").unwrap().layer() else {
        panic!()
    };
    assert_eq!(q.weight_fake_quant.scale.len(), 4);
    assert_eq!(q.weight_fake_quant.min_val.len(), 4);
    assert!(q.weight_fake_quant.is_observed());
    // A per-tensor fake quant refuses a scale of length 2.
    let mut bad = sd.clone();
    bad.tensors.insert(
        "conv1.activation_post_process.scale".into(),
        HostTensor::F32(ArrayD::ones(IxDyn(&[2]))),
    );
    let e = build().load_state_dict(&bad, true).unwrap_err();
    assert!(
        matches!(&e, Error::ShapeMismatch { context, .. } if context.contains("conv1.activation_post_process.scale")),
        "{e:?}"
    );
    // scale and zero_point must agree in length.
    let mut bad = sd.clone();
    bad.tensors.insert(
        "conv1.weight_fake_quant.zero_point".into(),
        HostTensor::I32(ArrayD::zeros(IxDyn(&[3]))),
    );
    assert!(matches!(
        build().load_state_dict(&bad, true).unwrap_err(),
        Error::ShapeMismatch { .. }
    ));
}

crate::qfuse_tests! {
    pytorch_names_plain_fused_intrinsic_qat,
    round_trip_save_load_identical_forward,
    fused_state_dict_loads_into_a_fresh_fused_model,
    strict_and_non_strict_key_errors,
    shape_and_dtype_mismatches,
    num_batches_tracked_is_int64,
    fake_quant_buffers_take_the_loaded_length,
}
