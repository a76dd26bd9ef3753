//! QAT modules: prepare_qat on small models, forward / backward against the Backend's
//! conv_bn_qat ops, CPU vs GPU, freeze_bn, the observer / fake-quant switches, γ = 0,
//! convert_to_float / convert_to_deployable, and a few SGD steps that reduce a loss.
//!
//! GPU parts run with `WGPU_BACKEND=vulkan QFUSE_REQUIRE_GPU=1` (lavapipe); without an
//! adapter they print one skip line.

use crate::common;

use ndarray::{Array1, Array2, Array3, Array4, ArrayD, Axis, IxDyn};
use qfuse::fuse::{fuse_modules, fuse_modules_qat, FuseOptions};
use qfuse::nn::{Layer, Module};
use qfuse::ops::{
    Activation, BatchNorm, Conv2d, Conv2dParams, ConvTranspose2dParams, QatConfig, QatWeightQuant,
};
use qfuse::qat::{self, FakeQuantConfig, ObserverKind, QatLayer, QatQConfig};
use qfuse::quant::{ObserverSpec, QDtype, QScheme, QuantRange};
use qfuse::reference;
use qfuse::{CpuBackend, Error, GpuBackend, HostOps};

// ------------------------------------------------------------------------- helpers

/// SplitMix64: a small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }
    fn arr(&mut self, shape: &[usize], lo: f32, hi: f32) -> ArrayD<f32> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.uniform(lo, hi)).collect();
        ArrayD::from_shape_vec(IxDyn(shape), v).unwrap()
    }
    fn arr1(&mut self, n: usize, lo: f32, hi: f32) -> Array1<f32> {
        Array1::from((0..n).map(|_| self.uniform(lo, hi)).collect::<Vec<_>>())
    }
}

fn bn_state(rng: &mut Rng, c: usize) -> BatchNorm {
    BatchNorm {
        weight: Some(rng.arr1(c, 0.5, 1.5)),
        bias: Some(rng.arr1(c, -0.5, 0.5)),
        running_mean: rng.arr1(c, -0.5, 0.5),
        running_var: rng.arr1(c, 0.5, 2.0),
        eps: 1e-5,
        momentum: 0.1,
    }
}

fn conv(rng: &mut Rng, cin: usize, cout: usize, k: usize, bias: bool) -> Module {
    let a = 1.5 / ((cin * k * k) as f32).sqrt();
    let w: Array4<f32> = rng
        .arr(&[cout, cin, k, k], -a, a)
        .into_dimensionality()
        .unwrap();
    let b = bias.then(|| rng.arr1(cout, -0.2, 0.2));
    Module::conv2d(w, b, pad1()).unwrap()
}

fn linear(rng: &mut Rng, inp: usize, out: usize, bias: bool) -> Module {
    let a = 1.5 / (inp as f32).sqrt();
    let w: Array2<f32> = rng.arr(&[out, inp], -a, a).into_dimensionality().unwrap();
    let b = bias.then(|| rng.arr1(out, -0.2, 0.2));
    Module::linear(w, b).unwrap()
}

fn pad1() -> Conv2dParams {
    Conv2dParams {
        padding: [1, 1],
        ..Default::default()
    }
}

fn inplace() -> FuseOptions {
    FuseOptions {
        inplace: true,
        ..Default::default()
    }
}

fn spec(scheme: QScheme) -> ObserverSpec {
    ObserverSpec::new(QDtype::QInt8, scheme, QuantRange::INT8, 0).unwrap()
}

/// Weight fake quant with a running min/max observer: its first step observes exactly what
/// `conv_bn_qat_forward`'s memoryless observer sees.
fn minmax_qconfig(scheme: QScheme) -> QatQConfig {
    QatQConfig::weight_only(FakeQuantConfig::min_max(spec(scheme)).unwrap())
}

fn assert_close(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>, tol: f32) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let mut worst = 0.0f32;
    for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= tol * (1.0 + w.abs()),
            "{what}[{i}]: got {g:e}, want {w:e}"
        );
        worst = worst.max(err);
    }
}

fn kinds(m: &Module) -> Vec<String> {
    m.named_children()
        .iter()
        .map(|(_, c)| c.kind_name())
        .collect()
}

fn qat_at<'a>(m: &'a Module, path: &str) -> &'a QatLayer {
    match m.get(path).unwrap().layer() {
        Layer::Qat(q) => q,
        other => panic!("`{path}` is {}, not a QAT module", other.kind_name()),
    }
}

fn qat_at_mut<'a>(m: &'a mut Module, path: &str) -> &'a mut QatLayer {
    match m.get_mut(path).unwrap().layer_mut() {
        Layer::Qat(q) => q,
        _ => panic!("`{path}` is not a QAT module"),
    }
}

fn gpu() -> Option<GpuBackend> {
    common::gpu().map(GpuBackend::new)
}

/// conv(3→c) + bn + relu as a Sequential, QAT-fused (intrinsic ConvBnReLU2d at "0").
fn conv_bn_relu(rng: &mut Rng, c: usize, bias: bool, act: bool) -> Module {
    let mut mods = vec![
        conv(rng, 3, c, 3, bias),
        Module::batch_norm2d(bn_state(rng, c)).unwrap(),
    ];
    if act {
        mods.push(Module::relu());
    }
    let mut m = Module::sequential(mods);
    let group: Vec<String> = (0..m.named_children().len())
        .map(|i| i.to_string())
        .collect();
    fuse_modules_qat(&mut m, group, inplace()).unwrap();
    m
}

/// The loss `Σ y·dy` (its gradient is `dy`).
fn dot_loss(
    dy: &ArrayD<f32>,
) -> impl FnOnce(&ArrayD<f32>) -> qfuse::Result<(f32, ArrayD<f32>)> + '_ {
    move |y| Ok(((y * dy).sum(), dy.clone()))
}

fn conv_of(q: &QatLayer) -> Conv2d {
    match &q.head {
        qat::QatHead::Conv2d(c) => Conv2d {
            weight: c.weight.clone().into_dimensionality().unwrap(),
            bias: c.bias.clone(),
            params: c.params,
        },
        _ => panic!("not a Conv2d head"),
    }
}

// ------------------------------------------------------------------------- prepare_qat

fn prepare_qat_converts_small_models() {
    let mut rng = Rng(1);
    let q = QatQConfig::default_qat("x86").unwrap();

    // conv + bn + relu → intrinsic ConvBnReLU2d → QAT ConvBnReLU2d, same parameters.
    let mut m = conv_bn_relu(&mut rng, 4, true, true);
    let Layer::Fused(f) = m.get("0").unwrap().layer().clone() else {
        panic!("not fused")
    };
    assert_eq!(qat::prepare_qat(&mut m, &q).unwrap(), ["0"]);
    assert_eq!(kinds(&m), ["ConvBnReLU2d", "Identity", "Identity"]);
    let l = qat_at(&m, "0");
    assert_eq!(l.qualified_name(), "torch.ao.nn.intrinsic.qat.ConvBnReLU2d");
    match (&l.head, &f.head) {
        (qat::QatHead::Conv2d(a), qfuse::nn::FusedHead::Conv2d(b)) => assert_eq!(a, b),
        _ => panic!("heads differ"),
    }
    assert_eq!(l.bn, f.bn);
    assert!(!l.freeze_bn);
    assert!(l.weight_fake_quant.is_per_channel());
    assert!(l.activation_post_process.is_some());
    assert!(m.get("0").unwrap().is_training());
    // A second call converts nothing.
    assert!(qat::prepare_qat(&mut m, &q).unwrap().is_empty());

    // linear + bn → LinearBn1d; plain conv → Conv2d; conv + relu (eval fusion) → ConvReLU2d;
    // linear + relu → LinearReLU; ConvTranspose2d stays.
    let mut lin_bn = Module::sequential([
        linear(&mut rng, 5, 3, true),
        Module::batch_norm1d(bn_state(&mut rng, 3)).unwrap(),
    ]);
    fuse_modules_qat(&mut lin_bn, ["0", "1"], inplace()).unwrap();
    let mut plain = Module::sequential([
        conv(&mut rng, 3, 4, 3, false),
        conv(&mut rng, 4, 4, 1, true),
        Module::relu(),
        linear(&mut rng, 4, 2, true),
        Module::relu(),
        Module::conv_transpose2d(
            rng.arr(&[2, 2, 2, 2], -1.0, 1.0)
                .into_dimensionality()
                .unwrap(),
            None,
            ConvTranspose2dParams::default(),
        )
        .unwrap(),
    ]);
    fuse_modules(&mut plain, vec![vec!["1", "2"], vec!["3", "4"]], inplace()).unwrap();
    assert_eq!(qat::prepare_qat(&mut lin_bn, &q).unwrap(), ["0"]);
    assert_eq!(kinds(&lin_bn), ["LinearBn1d", "Identity"]);
    assert_eq!(qat::prepare_qat(&mut plain, &q).unwrap(), ["0", "1", "3"]);
    assert_eq!(
        kinds(&plain),
        [
            "Conv2d",
            "ConvReLU2d",
            "Identity",
            "LinearReLU",
            "Identity",
            "ConvTranspose2d"
        ]
    );
    assert_eq!(
        qat_at(&plain, "0").qualified_name(),
        "torch.ao.nn.qat.Conv2d"
    );
    assert_eq!(
        qat_at(&plain, "3").qualified_name(),
        "torch.ao.nn.intrinsic.qat.LinearReLU"
    );

    // Conv1d + bn + relu → ConvBnReLU1d.
    let w: Array3<f32> = rng
        .arr(&[4, 2, 3], -0.5, 0.5)
        .into_dimensionality()
        .unwrap();
    let mut c1 = Module::sequential([
        Module::conv1d(w, None, Default::default()).unwrap(),
        Module::batch_norm1d(bn_state(&mut rng, 4)).unwrap(),
        Module::relu(),
    ]);
    fuse_modules_qat(&mut c1, ["0", "1", "2"], inplace()).unwrap();
    qat::prepare_qat(&mut c1, &q).unwrap();
    assert_eq!(kinds(&c1)[0], "ConvBnReLU1d");
    let y = c1
        .forward(&CpuBackend, &rng.arr(&[3, 2, 9], -1.0, 1.0))
        .unwrap();
    assert_eq!(y.shape(), &[3, 4, 7]);

    // Per module: only "1".
    let mut sel = Module::sequential([
        conv(&mut rng, 3, 4, 3, false),
        conv(&mut rng, 4, 4, 1, true),
    ]);
    let done = qat::prepare_qat_with(&mut sel, |path, _| (path == "1").then_some(q)).unwrap();
    assert_eq!(done, ["1"]);
    assert_eq!(qat_at(&sel, "1").kind_name(), "Conv2d");
    assert!(matches!(sel.get("0").unwrap().layer(), Layer::Conv2d(_)));
}

fn prepare_qat_errors_leave_the_model_unchanged() {
    let mut rng = Rng(2);
    let mut m = conv_bn_relu(&mut rng, 4, false, true);
    let before = format!("{:?}", m);
    let bad_axis = QatQConfig::weight_only(FakeQuantConfig {
        observer: ObserverKind::MinMax,
        spec: ObserverSpec {
            axis: 4,
            ..spec(QScheme::PerChannelSymmetric)
        },
    });
    let e = qat::prepare_qat(&mut m, &bad_axis).unwrap_err();
    assert!(
        matches!(e, Error::AxisOutOfRange { axis: 4, rank: 4 }),
        "{e}"
    );
    let bad_c = QatQConfig::weight_only(FakeQuantConfig {
        observer: ObserverKind::MovingAverage {
            averaging_constant: 1.5,
        },
        spec: spec(QScheme::PerTensorSymmetric),
    });
    let e = qat::prepare_qat(&mut m, &bad_c).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert!(QatQConfig::default_qat("tpu").is_err());
    assert_eq!(format!("{:?}", m), before);
}

// ------------------------------------------------------------------------- forward / backward

/// The ConvBn QAT module's training step equals calling the Backend's conv_bn_qat ops
/// directly (fresh min/max observer: the same qparams as the op's own observer).
fn check_against_backend_ops(b: &dyn HostOps, what: &str) {
    for (i, (bias, act, scheme)) in [
        (true, true, QScheme::PerChannelSymmetric),
        (false, false, QScheme::PerTensorSymmetric),
        (true, false, QScheme::PerChannelAffine),
        (false, true, QScheme::PerTensorAffine),
    ]
    .into_iter()
    .enumerate()
    {
        let mut rng = Rng(10 + i as u64);
        let mut m = conv_bn_relu(&mut rng, 6, bias, act);
        qat::prepare_qat(&mut m, &minmax_qconfig(scheme)).unwrap();
        let l = qat_at(&m, "0").clone();
        let conv = conv_of(&l);
        let bn = l.bn.clone().unwrap().bn;
        let cfg = QatConfig {
            activation: if act {
                Activation::Relu
            } else {
                Activation::None
            },
            freeze_bn: false,
            weight_observer: spec(scheme),
        };
        let x = rng.arr(&[2, 3, 7, 6], -1.0, 1.0);
        let x4: Array4<f32> = x.clone().into_dimensionality().unwrap();
        let dy = rng.arr(&[2, 6, 7, 6], -1.0, 1.0);
        let dy4: Array4<f32> = dy.clone().into_dimensionality().unwrap();

        let want = b.conv_bn_qat_forward(&x4, &conv, &bn, &cfg).unwrap();
        let want_g = b
            .conv_bn_qat_backward(&x4, &dy4, &conv, &bn, &cfg, &want)
            .unwrap();
        // forward_with with the default weight quant is the same op.
        let with = b
            .conv_bn_qat_forward_with(&x4, &conv, &bn, &cfg, &QatWeightQuant::default())
            .unwrap();
        assert_eq!(with.y, want.y, "{what} case {i}: forward_with(default)");

        let step = qat::train_step(&mut m, b, &x, dot_loss(&dy)).unwrap();
        let tag = format!("{what} case {i}");
        assert_close(
            &format!("{tag} y"),
            &step.output,
            &want.y.clone().into_dyn(),
            1e-6,
        );
        let after = qat_at(&m, "0");
        let bn_after = &after.bn.as_ref().unwrap();
        assert_close(
            &format!("{tag} running_mean"),
            &bn_after.bn.running_mean.clone().into_dyn(),
            &want.running_mean.clone().into_dyn(),
            1e-6,
        );
        assert_close(
            &format!("{tag} running_var"),
            &bn_after.bn.running_var.clone().into_dyn(),
            &want.running_var.clone().into_dyn(),
            1e-6,
        );
        assert_eq!(bn_after.num_batches_tracked, 1);
        assert_eq!(
            after.weight_fake_quant.qparams().unwrap().scale,
            want.weight_qparams.scale
        );
        assert_close(
            &format!("{tag} dx"),
            &step.dx,
            &want_g.dx.clone().into_dyn(),
            1e-5,
        );
        assert_close(
            &format!("{tag} dW"),
            &step.grads["0.weight"],
            &want_g.dweight.clone().into_dyn(),
            1e-5,
        );
        assert_close(
            &format!("{tag} dγ"),
            &step.grads["0.bn.weight"],
            &want_g.dbn_weight.clone().into_dyn(),
            1e-5,
        );
        assert_close(
            &format!("{tag} dβ"),
            &step.grads["0.bn.bias"],
            &want_g.dbn_bias.clone().into_dyn(),
            1e-5,
        );
        match (&want_g.dbias, step.grads.get("0.bias")) {
            (Some(w), Some(g)) => {
                assert_close(&format!("{tag} db"), g, &w.clone().into_dyn(), 1e-5)
            }
            (None, None) => {}
            _ => panic!("{tag}: conv bias gradient presence differs"),
        }
        assert_eq!(step.grads.len(), if bias { 4 } else { 3 });
    }
}

fn conv_bn_step_equals_backend_ops_cpu() {
    check_against_backend_ops(&CpuBackend, "cpu");
}

fn conv_bn_step_equals_backend_ops_gpu() {
    let Some(g) = gpu() else { return };
    check_against_backend_ops(&g, "gpu");
}

/// conv+bn+relu → flatten → linear(+relu), QAT with output fake quants: two training steps
/// and an eval forward on the CPU and the GPU agree within 1e-4.
fn cpu_and_gpu_agree() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(20);
    let mut model = Module::sequential([
        conv(&mut rng, 3, 4, 3, true),
        Module::batch_norm2d(bn_state(&mut rng, 4)).unwrap(),
        Module::relu(),
        Module::flatten(1, -1),
        linear(&mut rng, 4 * 5 * 5, 6, true),
        Module::relu(),
        linear(&mut rng, 6, 3, true),
    ]);
    fuse_modules_qat(
        &mut model,
        vec![vec!["0", "1", "2"], vec!["4", "5"]],
        inplace(),
    )
    .unwrap();
    qat::prepare_qat(&mut model, &QatQConfig::default_qat("fbgemm").unwrap()).unwrap();
    assert_eq!(
        kinds(&model),
        [
            "ConvBnReLU2d",
            "Identity",
            "Identity",
            "Flatten",
            "LinearReLU",
            "Identity",
            "Linear"
        ]
    );
    let mut on_gpu = model.clone();
    for step in 0..2 {
        let x = rng.arr(&[4, 3, 5, 5], -1.0, 1.0);
        let dy = rng.arr(&[4, 3], -1.0, 1.0);
        let c = qat::train_step(&mut model, &CpuBackend, &x, dot_loss(&dy)).unwrap();
        let gg = qat::train_step(&mut on_gpu, &g, &x, dot_loss(&dy)).unwrap();
        assert_close(&format!("step {step} y"), &gg.output, &c.output, 1e-4);
        assert_close(&format!("step {step} dx"), &gg.dx, &c.dx, 1e-4);
        assert_eq!(
            c.grads.keys().collect::<Vec<_>>(),
            gg.grads.keys().collect::<Vec<_>>()
        );
        for (k, v) in &c.grads {
            assert_close(&format!("step {step} grad {k}"), &gg.grads[k], v, 1e-4);
        }
        let (a, b) = (qat_at(&model, "0"), qat_at(&on_gpu, "0"));
        let (ba, bb) = (a.bn.as_ref().unwrap(), b.bn.as_ref().unwrap());
        assert_close(
            "running_var",
            &bb.bn.running_var.clone().into_dyn(),
            &ba.bn.running_var.clone().into_dyn(),
            1e-4,
        );
        qat::sgd_step(&mut model, &c.grads, 0.01).unwrap();
        qat::sgd_step(&mut on_gpu, &c.grads, 0.01).unwrap();
    }
    model.eval();
    on_gpu.eval();
    let x = rng.arr(&[2, 3, 5, 5], -1.0, 1.0);
    let yc = model.forward(&CpuBackend, &x).unwrap();
    let yg = on_gpu.forward(&g, &x).unwrap();
    assert_close("eval y", &yg, &yc, 1e-4);
}

// ------------------------------------------------------------------------- freeze_bn

fn check_freeze_bn(b: &dyn HostOps, what: &str) {
    let mut rng = Rng(30);
    let mut m = conv_bn_relu(&mut rng, 4, true, true);
    qat::prepare_qat(&mut m, &minmax_qconfig(QScheme::PerChannelSymmetric)).unwrap();
    let x = rng.arr(&[2, 3, 6, 6], -1.0, 1.0);
    m.forward(b, &x).unwrap();
    assert_eq!(qat::freeze_bn_stats(&mut m), 1);
    assert!(qat_at(&m, "0").freeze_bn);
    let before = qat_at(&m, "0").bn.clone().unwrap();
    // train() keeps it frozen (PyTorch's train() does not unfreeze either).
    m.train(true);
    let y = m.forward(b, &x).unwrap();
    let after = qat_at(&m, "0").bn.clone().unwrap();
    assert_eq!(
        after, before,
        "{what}: running stats and num_batches_tracked unchanged"
    );
    // The BatchNorm uses the running statistics: the frozen QAT op.
    let l = qat_at(&m, "0");
    let cfg = QatConfig {
        activation: Activation::Relu,
        freeze_bn: true,
        weight_observer: spec(QScheme::PerChannelSymmetric),
    };
    let x4: Array4<f32> = x.clone().into_dimensionality().unwrap();
    let wq = QatWeightQuant::fixed(l.weight_fake_quant.qparams().unwrap());
    let want = b
        .conv_bn_qat_forward_with(&x4, &conv_of(l), &before.bn, &cfg, &wq)
        .unwrap();
    assert_close(&format!("{what} frozen y"), &y, &want.y.into_dyn(), 1e-6);
    // A frozen module trains (its backward is the frozen form).
    let dy = rng.arr(&[2, 4, 6, 6], -1.0, 1.0);
    let step = qat::train_step(&mut m, b, &x, dot_loss(&dy)).unwrap();
    assert!(step.grads["0.bn.weight"].iter().all(|v| v.is_finite()));
    assert_eq!(qat_at(&m, "0").bn.clone().unwrap(), before);

    assert_eq!(qat::update_bn_stats(&mut m), 1);
    m.forward(b, &x).unwrap();
    let updated = qat_at(&m, "0").bn.clone().unwrap();
    assert_eq!(updated.num_batches_tracked, before.num_batches_tracked + 1);
    assert_ne!(updated.bn.running_mean, before.bn.running_mean);
}

fn freeze_bn_uses_and_keeps_running_stats_cpu() {
    check_freeze_bn(&CpuBackend, "cpu");
}

fn freeze_bn_uses_and_keeps_running_stats_gpu() {
    let Some(g) = gpu() else { return };
    check_freeze_bn(&g, "gpu");
}

// ------------------------------------------------------------------------- switches

fn observer_and_fake_quant_switches() {
    let b = &CpuBackend;
    let mut rng = Rng(40);
    let mut m = conv_bn_relu(&mut rng, 4, true, true);
    let q = QatQConfig::new(
        FakeQuantConfig::min_max(spec(QScheme::PerChannelSymmetric)).unwrap(),
        Some(
            FakeQuantConfig::moving_average(
                ObserverSpec::new(
                    QDtype::QUInt8,
                    QScheme::PerTensorAffine,
                    QuantRange::UINT8,
                    0,
                )
                .unwrap(),
            )
            .unwrap(),
        ),
    );
    qat::prepare_qat(&mut m, &q).unwrap();
    let x = rng.arr(&[2, 3, 6, 6], -1.0, 1.0);
    let y = m.forward(b, &x).unwrap();

    // The output fake quant: values on its grid, first-batch statistics.
    let apq = qat_at(&m, "0").activation_post_process.clone().unwrap();
    let qp = apq.qparams().unwrap();
    for &v in y.iter() {
        let t = v / qp.scale[0];
        assert!(
            (t - t.round()).abs() < 1e-3,
            "{v} is not on the grid {}",
            qp.scale[0]
        );
    }
    let (min1, max1) = (apq.min_val[0], apq.max_val[0]);
    assert_eq!(min1, 0.0); // after the ReLU

    // disable_observer: statistics and qparams frozen; the forward uses the stored ones.
    assert_eq!(qat::disable_observer(&mut m), 1);
    let wfq_before = qat_at(&m, "0").weight_fake_quant.clone();
    qat_at_mut(&mut m, "0").head = {
        let mut h = qat_at(&m, "0").head.clone();
        if let qat::QatHead::Conv2d(c) = &mut h {
            c.weight.mapv_inplace(|v| v * 3.0);
        }
        h
    };
    let x2 = rng.arr(&[2, 3, 6, 6], -2.0, 2.0);
    m.forward(b, &x2).unwrap();
    let l = qat_at(&m, "0");
    assert_eq!(l.weight_fake_quant, wfq_before);
    assert_eq!(l.activation_post_process.as_ref().unwrap().min_val[0], min1);
    assert_eq!(l.activation_post_process.as_ref().unwrap().max_val[0], max1);

    // enable_observer: the min/max observer widens; the moving average moves by 0.01.
    assert_eq!(qat::enable_observer(&mut m), 1);
    let y3 = m.forward(b, &x2).unwrap();
    let l = qat_at(&m, "0");
    let w_max = l.weight_fake_quant.max_val.clone();
    assert!(w_max.iter().zip(&wfq_before.max_val).all(|(a, b)| a >= b));
    assert!(y3.iter().all(|v| v.is_finite()));
    let apq = l.activation_post_process.as_ref().unwrap();
    assert!(apq.max_val[0] != max1);

    // disable_fake_quant: the QAT module equals the float intrinsic module (training mode,
    // same BatchNorm state) up to rounding.
    let mut rng = Rng(41);
    let float = conv_bn_relu(&mut rng, 4, true, true);
    let mut qm = float.clone();
    qat::prepare_qat(&mut qm, &QatQConfig::default_qat("x86").unwrap()).unwrap();
    assert_eq!(qat::disable_fake_quant(&mut qm), 1);
    let x = rng.arr(&[2, 3, 6, 6], -1.0, 1.0);
    let mut f2 = float.clone();
    let want = f2.forward(b, &x).unwrap();
    let got = qm.forward(b, &x).unwrap();
    assert_close("fake quant disabled vs float", &got, &want, 1e-5);
    let (bf, bq) = (
        match f2.get("0").unwrap().layer() {
            Layer::Fused(f) => f.bn.clone().unwrap(),
            _ => unreachable!(),
        },
        qat_at(&qm, "0").bn.clone().unwrap(),
    );
    assert_close(
        "running_var (fake quant disabled vs float)",
        &bq.bn.running_var.into_dyn(),
        &bf.bn.running_var.into_dyn(),
        1e-5,
    );
    // The observers still ran.
    assert!(qat_at(&qm, "0").weight_fake_quant.is_observed());
    // enable_fake_quant: quantized again (differs from float).
    assert_eq!(qat::enable_fake_quant(&mut qm), 1);
    let y = qm.forward(b, &x).unwrap();
    assert!(y.iter().zip(want.iter()).any(|(a, b)| (a - b).abs() > 1e-4));
}

fn moving_average_observer_follows_pytorch() {
    let mut fq = qat::FakeQuantize::new(
        FakeQuantConfig::moving_average(spec(QScheme::PerTensorAffine)).unwrap(),
    )
    .unwrap();
    assert!(!fq.is_observed());
    assert_eq!(fq.qparams().unwrap().scale, [1.0]);
    fq.observe(&ArrayD::from_shape_vec(IxDyn(&[2]), vec![-1.0, 2.0]).unwrap())
        .unwrap();
    assert_eq!((fq.min_val[0], fq.max_val[0]), (-1.0, 2.0));
    fq.observe(&ArrayD::from_shape_vec(IxDyn(&[2]), vec![-3.0, 2.0]).unwrap())
        .unwrap();
    // PyTorch: −1 → −1.02 after a batch with min −3.
    assert!((fq.min_val[0] + 1.02).abs() < 1e-6, "{}", fq.min_val[0]);
    assert_eq!(fq.qparams().unwrap(), fq.calculate_qparams());

    let mut mm = qat::FakeQuantize::new(
        FakeQuantConfig::min_max(spec(QScheme::PerChannelSymmetric)).unwrap(),
    )
    .unwrap();
    let x = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![-1.0, 0.5, 2.0, 0.25]).unwrap();
    mm.observe(&x).unwrap();
    assert_eq!(
        (mm.min_val.clone(), mm.max_val.clone()),
        (vec![-1.0, 0.25], vec![0.5, 2.0])
    );
    let e = mm.observe(&ArrayD::zeros(IxDyn(&[3, 2]))).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
}

// ------------------------------------------------------------------------- γ = 0

fn gamma_zero_model(rng: &mut Rng) -> Module {
    let mut m = conv_bn_relu(rng, 4, true, true);
    if let Layer::Fused(f) = m.get_mut("0").unwrap().layer_mut() {
        let bn = f.bn.as_mut().unwrap();
        bn.bn.weight.as_mut().unwrap()[1] = 0.0;
        bn.bn.bias.as_mut().unwrap()[1] = 0.3;
    }
    m
}

/// The x86 QAT weight fake quant without the output one (so outputs are exact).
fn weight_only_x86() -> QatQConfig {
    QatQConfig::weight_only(FakeQuantConfig::default_per_channel_weight())
}

fn check_gamma_zero(b: &dyn HostOps, what: &str) {
    let mut rng = Rng(50);
    let float = gamma_zero_model(&mut rng);
    let x = rng.arr(&[2, 3, 6, 6], -1.0, 1.0);
    let x4: Array4<f32> = x.clone().into_dimensionality().unwrap();

    // PyTorch's form (the Backend's conv_bn_qat_forward) is NaN there.
    let mut qm = float.clone();
    qat::prepare_qat(&mut qm, &weight_only_x86()).unwrap();
    let l = qat_at(&qm, "0").clone();
    let cfg = QatConfig {
        activation: Activation::Relu,
        freeze_bn: false,
        weight_observer: spec(QScheme::PerChannelSymmetric),
    };
    let torch = b
        .conv_bn_qat_forward(&x4, &conv_of(&l), &l.bn.as_ref().unwrap().bn, &cfg)
        .unwrap();
    assert!(
        torch.y.iter().any(|v| v.is_nan()),
        "{what}: expected PyTorch's NaN"
    );

    // qfuse's QAT module stays finite; channel 1 is relu(β).
    let dy = rng.arr(&[2, 4, 6, 6], -1.0, 1.0);
    let step = qat::train_step(&mut qm, b, &x, dot_loss(&dy)).unwrap();
    assert!(
        step.output.iter().all(|v| v.is_finite()),
        "{what}: y finite"
    );
    for &v in step.output.index_axis(Axis(1), 1).iter() {
        assert!((v - 0.3).abs() < 1e-6, "{what}: channel 1 = β, got {v}");
    }
    let bn = qat_at(&qm, "0").bn.clone().unwrap();
    assert!(bn.bn.running_mean.iter().all(|v| v.is_finite()));
    assert!(bn.bn.running_var.iter().all(|v| v.is_finite()));
    for (k, g) in &step.grads {
        assert!(g.iter().all(|v| v.is_finite()), "{what}: grad {k} finite");
    }
    assert!(step.dx.iter().all(|v| v.is_finite()));
    // Eval (deploy graph) is finite too, channel 1 = relu(β).
    qm.eval();
    let ye = qm.forward(b, &x).unwrap();
    assert!(ye.iter().all(|v| v.is_finite()));
    for &v in ye.index_axis(Axis(1), 1).iter() {
        assert!((v - 0.3).abs() < 1e-6);
    }

    // With fake quant disabled it is the float path (training mode), output and stats.
    let mut qm = float.clone();
    qat::prepare_qat(&mut qm, &weight_only_x86()).unwrap();
    qat::disable_fake_quant(&mut qm);
    let mut f2 = float.clone();
    let want = f2.forward(b, &x).unwrap();
    let got = qm.forward(b, &x).unwrap();
    assert_close(&format!("{what} γ=0 fq off vs float"), &got, &want, 1e-5);
    let bf = match f2.get("0").unwrap().layer() {
        Layer::Fused(f) => f.bn.clone().unwrap(),
        _ => unreachable!(),
    };
    let bq = qat_at(&qm, "0").bn.clone().unwrap();
    assert_close(
        &format!("{what} γ=0 running_mean"),
        &bq.bn.running_mean.into_dyn(),
        &bf.bn.running_mean.into_dyn(),
        1e-5,
    );
    assert_close(
        &format!("{what} γ=0 running_var"),
        &bq.bn.running_var.into_dyn(),
        &bf.bn.running_var.into_dyn(),
        1e-5,
    );
}

fn gamma_zero_stays_finite_cpu() {
    check_gamma_zero(&CpuBackend, "cpu");
}

fn gamma_zero_stays_finite_gpu() {
    let Some(g) = gpu() else { return };
    check_gamma_zero(&g, "gpu");
    // And the GPU step equals the CPU step, gradients included.
    let mut rng = Rng(51);
    let mut a = gamma_zero_model(&mut rng);
    qat::prepare_qat(&mut a, &QatQConfig::default_qat("x86").unwrap()).unwrap();
    let mut c = a.clone();
    let x = rng.arr(&[2, 3, 6, 6], -1.0, 1.0);
    let dy = rng.arr(&[2, 4, 6, 6], -1.0, 1.0);
    let sc = qat::train_step(&mut a, &CpuBackend, &x, dot_loss(&dy)).unwrap();
    let sg = qat::train_step(&mut c, &g, &x, dot_loss(&dy)).unwrap();
    assert_close("γ=0 gpu y", &sg.output, &sc.output, 1e-4);
    assert_close("γ=0 gpu dx", &sg.dx, &sc.dx, 1e-4);
    for (k, v) in &sc.grads {
        assert_close(&format!("γ=0 gpu {k}"), &sg.grads[k], v, 1e-4);
    }
}

// ------------------------------------------------------------------------- eval, convert

/// Eval mode is the deploy graph, which equals PyTorch's eval formula
/// `bn_eval(conv(x, W_q) / s + b)`.
fn eval_forward_is_the_deploy_graph() {
    let b = &CpuBackend;
    let mut rng = Rng(60);
    let mut m = conv_bn_relu(&mut rng, 4, true, true);
    qat::prepare_qat(&mut m, &minmax_qconfig(QScheme::PerChannelSymmetric)).unwrap();
    m.eval();
    let x = rng.arr(&[2, 3, 6, 6], -1.0, 1.0);
    let y = m.forward(b, &x).unwrap();
    let l = qat_at(&m, "0");
    let bn = l.bn.clone().unwrap().bn;
    let conv = conv_of(l);
    let (s, w_s) =
        reference::conv_bn::qat_scaled_weight(&conv.weight.clone().into_dyn(), &bn).unwrap();
    let w_q = b
        .fake_quant(
            &w_s,
            &l.weight_fake_quant.qparams().unwrap(),
            QuantRange::INT8,
        )
        .unwrap();
    let x4: Array4<f32> = x.into_dimensionality().unwrap();
    let mut z = b
        .conv2d(&x4, &w_q.into_dimensionality().unwrap(), None, &conv.params)
        .unwrap();
    for (c, mut lane) in z.axis_iter_mut(Axis(1)).enumerate() {
        let bias = conv.bias.as_ref().unwrap()[c];
        lane.mapv_inplace(|v| v / s[c] + bias);
    }
    let want = b
        .batch_norm2d(&z, &bn, false)
        .unwrap()
        .y
        .mapv(|v| v.max(0.0));
    assert_close("eval vs PyTorch's formula", &y, &want.into_dyn(), 1e-5);
    // Eval leaves the BatchNorm alone.
    assert_eq!(qat_at(&m, "0").bn.as_ref().unwrap().num_batches_tracked, 0);
}

fn convert_to_float_equals_the_float_fused_model() {
    let b = &CpuBackend;
    let mut rng = Rng(70);
    let mut float = Module::sequential([
        conv(&mut rng, 3, 4, 3, true),
        Module::batch_norm2d(bn_state(&mut rng, 4)).unwrap(),
        Module::relu(),
        Module::flatten(1, -1),
        linear(&mut rng, 4 * 5 * 5, 6, false),
        Module::batch_norm1d(bn_state(&mut rng, 6)).unwrap(),
        linear(&mut rng, 6, 3, true),
    ]);
    let groups = vec![vec!["0", "1", "2"], vec!["4", "5"]];
    let mut qm = float.clone();
    fuse_modules_qat(&mut qm, groups.clone(), inplace()).unwrap();
    qat::prepare_qat(&mut qm, &QatQConfig::default_qat("x86").unwrap()).unwrap();
    assert_eq!(kinds(&qm)[4], "LinearBn1d");
    // A few training forwards move the running statistics (fake quant on).
    for _ in 0..3 {
        qm.forward(b, &rng.arr(&[4, 3, 5, 5], -1.0, 1.0)).unwrap();
    }
    // The float reference: the same (trained) parameters, eval-fused.
    let trained = qat::convert_to_float(&qm).unwrap();
    assert_eq!(
        kinds(&trained),
        [
            "ConvReLU2d",
            "Identity",
            "Identity",
            "Flatten",
            "Linear",
            "Identity",
            "Linear"
        ]
    );
    assert!(trained.get("0").unwrap().is_training());
    // Build the same float model from the QAT state to compare with `fuse_modules`.
    for (path, bnp) in [("0", "1"), ("4", "5")] {
        let l = qat_at(&qm, path);
        let head = match &l.head {
            qat::QatHead::Conv2d(c) => Layer::Conv2d(c.clone()),
            qat::QatHead::Linear(x) => Layer::Linear(x.clone()),
            _ => unreachable!(),
        };
        *float.get_mut(path).unwrap().layer_mut() = head;
        let bn = l.bn.clone().unwrap();
        *float.get_mut(bnp).unwrap().layer_mut() = if path == "0" {
            Layer::BatchNorm2d(bn)
        } else {
            Layer::BatchNorm1d(bn)
        };
    }
    *float.get_mut("6").unwrap().layer_mut() = match &qat_at(&qm, "6").head {
        qat::QatHead::Linear(x) => Layer::Linear(x.clone()),
        _ => unreachable!(),
    };
    float.eval();
    let mut fused = fuse_modules(&mut float, groups, FuseOptions::default())
        .unwrap()
        .unwrap();
    let x = rng.arr(&[3, 3, 5, 5], -1.0, 1.0);
    let want = fused.forward(b, &x).unwrap();

    let mut conv_f = trained.clone();
    conv_f.eval();
    assert_close(
        "convert_to_float",
        &conv_f.forward(b, &x).unwrap(),
        &want,
        1e-5,
    );
    // The QAT model in eval with fake quant (and observers) disabled: the same.
    let mut q_eval = qm.clone();
    qat::disable_fake_quant(&mut q_eval);
    qat::disable_observer(&mut q_eval);
    q_eval.eval();
    assert_close(
        "QAT eval, fake quant off",
        &q_eval.forward(b, &x).unwrap(),
        &want,
        1e-5,
    );

    // Deployable: folded weights fake-quantized with the final (stored) qparams.
    let dep = qat::convert_to_deployable(&qm).unwrap();
    assert_eq!(dep.qparams.keys().collect::<Vec<_>>(), ["0", "4", "6"]);
    let fq = &qat_at(&qm, "0").weight_fake_quant;
    let folded = match trained.get("0").unwrap().layer() {
        Layer::Fused(f) => match &f.head {
            qfuse::nn::FusedHead::Conv2d(c) => c.weight.clone(),
            _ => unreachable!(),
        },
        _ => unreachable!(),
    };
    let want_w =
        reference::fake_quant::fake_quantize(&folded, &fq.qparams().unwrap(), fq.range()).unwrap();
    match dep.model.get("0").unwrap().layer() {
        Layer::Fused(f) => match &f.head {
            qfuse::nn::FusedHead::Conv2d(c) => assert_eq!(c.weight, want_w),
            _ => unreachable!(),
        },
        other => panic!("{}", other.kind_name()),
    }
    let q0 = &dep.qparams["0"];
    assert_eq!(q0.weight.qparams, fq.qparams().unwrap());
    assert_eq!(q0.weight.range, QuantRange::INT8);
    assert!(q0.activation.is_some());
    // The deployable model's forward is close to the QAT model's eval forward.
    let mut dm = dep.model.clone();
    dm.eval();
    let mut qe = qm.clone();
    qat::disable_observer(&mut qe);
    qe.eval();
    let yq = qe.forward(b, &x).unwrap();
    let yd = dm.forward(b, &x).unwrap();
    let worst = yq
        .iter()
        .zip(yd.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    // The QAT eval forward also fake-quantizes outputs; the deployable one does not.
    assert!(worst < 0.1, "deployable vs QAT eval: {worst}");
}

// ------------------------------------------------------------------------- training

/// MSE against a fixed random teacher, SGD on a QAT student: the loss goes down.
fn check_training(b: &dyn HostOps, what: &str) {
    let mut rng = Rng(80);
    let teacher_w = rng.arr(&[3, 4 * 4 * 4], -0.3, 0.3);
    let xs: Vec<ArrayD<f32>> = (0..4).map(|_| rng.arr(&[8, 3, 4, 4], -1.0, 1.0)).collect();
    let mut model = Module::sequential([
        conv(&mut rng, 3, 4, 3, false),
        Module::batch_norm2d(bn_state(&mut rng, 4)).unwrap(),
        Module::relu(),
        Module::flatten(1, -1),
        linear(&mut rng, 4 * 4 * 4, 3, true),
    ]);
    fuse_modules_qat(&mut model, ["0", "1", "2"], inplace()).unwrap();
    qat::prepare_qat(&mut model, &QatQConfig::default_qat("x86").unwrap()).unwrap();
    let target = |x: &ArrayD<f32>| -> ArrayD<f32> {
        // teacher: linear on relu(x) flattened per sample, padded to the student's width
        let n = x.shape()[0];
        let flat = x
            .mapv(|v| v.max(0.0))
            .into_shape_with_order((n, 48))
            .unwrap();
        let w: Array2<f32> = teacher_w.clone().into_shape_with_order((3, 64)).unwrap();
        let w48 = w.slice(ndarray::s![.., ..48]).to_owned();
        flat.dot(&w48.t()).into_dyn()
    };
    let mse = |y: &ArrayD<f32>, t: &ArrayD<f32>| -> (f32, ArrayD<f32>) {
        let d = y - t;
        let n = d.len() as f32;
        ((&d * &d).sum() / n, d.mapv(|v| 2.0 * v / n))
    };
    let epoch_loss = |m: &mut Module| -> f32 {
        let mut total = 0.0;
        for x in &xs {
            let t = target(x);
            let mut e = m.clone();
            qat::freeze_bn_stats(&mut e);
            let y = e.forward(b, x).unwrap();
            total += mse(&y, &t).0;
        }
        total / xs.len() as f32
    };
    let initial = epoch_loss(&mut model);
    let mut last_step_losses = Vec::new();
    for _epoch in 0..6 {
        for x in &xs {
            let t = target(x);
            let step = qat::train_step(&mut model, b, x, |y| Ok(mse(y, &t))).unwrap();
            last_step_losses.push(step.loss);
            qat::sgd_step(&mut model, &step.grads, 0.05).unwrap();
        }
    }
    let fin = epoch_loss(&mut model);
    assert!(
        fin < 0.8 * initial,
        "{what}: loss {initial} → {fin} (steps {last_step_losses:?})"
    );
}

fn qat_training_reduces_the_loss_cpu() {
    check_training(&CpuBackend, "cpu");
}

fn qat_training_reduces_the_loss_gpu() {
    let Some(g) = gpu() else { return };
    check_training(&g, "gpu");
}

fn plain_qat_modules_backward_matches_finite_differences() {
    // Fake quant off, so the function is smooth: dL/dW of a QAT Linear and Conv2d against
    // central differences.
    let b = &CpuBackend;
    let mut rng = Rng(90);
    let mut model = Module::sequential([
        conv(&mut rng, 2, 3, 3, true),
        Module::hardswish(),
        Module::flatten(1, -1),
        linear(&mut rng, 3 * 4 * 4, 2, true),
    ]);
    qat::prepare_qat(&mut model, &QatQConfig::default_qat("x86").unwrap()).unwrap();
    qat::disable_fake_quant(&mut model);
    let x = rng.arr(&[2, 2, 4, 4], -1.0, 1.0);
    let dy = rng.arr(&[2, 2], -1.0, 1.0);
    let step = qat::train_step(&mut model.clone(), b, &x, dot_loss(&dy)).unwrap();
    let loss_at = |m: &Module| -> f64 {
        let y = m.clone().forward(b, &x).unwrap();
        y.iter()
            .zip(dy.iter())
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum()
    };
    for name in ["0.weight", "0.bias", "3.weight", "3.bias"] {
        let g = &step.grads[name];
        for idx in [0usize, g.len() / 2, g.len() - 1] {
            let eps = 1e-2f32;
            let mut plus = qat::Gradients::new();
            let mut e = ArrayD::zeros(g.raw_dim());
            e.as_slice_mut().unwrap()[idx] = 1.0;
            plus.insert(name.to_string(), e);
            let mut mp = model.clone();
            qat::sgd_step(&mut mp, &plus, -eps).unwrap();
            let mut mm = model.clone();
            qat::sgd_step(&mut mm, &plus, eps).unwrap();
            let fd = (loss_at(&mp) - loss_at(&mm)) / (2.0 * eps as f64);
            let an = g.as_slice().unwrap()[idx] as f64;
            assert!(
                (fd - an).abs() < 2e-2 * (1.0 + an.abs()),
                "{name}[{idx}]: fd {fd} vs {an}"
            );
        }
    }
}

fn train_step_and_sgd_refuse_what_they_cannot_do() {
    let b = &CpuBackend;
    let mut rng = Rng(100);
    let mut m = Module::sequential([
        conv(&mut rng, 3, 4, 3, false),
        Module::max_pool2d(2, 2).unwrap(),
    ]);
    qat::prepare_qat(&mut m, &QatQConfig::default_qat("x86").unwrap()).unwrap();
    let x = rng.arr(&[1, 3, 4, 4], -1.0, 1.0);
    let e = qat::train_step(&mut m, b, &x, |y| Ok((0.0, y.clone()))).unwrap_err();
    assert!(e.to_string().contains("MaxPool2d"), "{e}");

    let mut cb = conv_bn_relu(&mut rng, 4, false, true);
    qat::prepare_qat(&mut cb, &QatQConfig::default_qat("x86").unwrap()).unwrap();
    cb.eval();
    let e = qat::train_step(&mut cb, b, &x, |y| Ok((0.0, y.clone()))).unwrap_err();
    assert!(e.to_string().contains("eval mode"), "{e}");
    cb.train(true);
    let e = qat::train_step(&mut cb, b, &x, |_| Ok((0.0, ArrayD::zeros(IxDyn(&[1]))))).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");

    let before = format!("{:?}", cb);
    let mut g = qat::Gradients::new();
    g.insert("0.nope".into(), ArrayD::zeros(IxDyn(&[1])));
    assert!(qat::sgd_step(&mut cb, &g, 0.1).is_err());
    let mut g = qat::Gradients::new();
    g.insert("0.bn.weight".into(), ArrayD::zeros(IxDyn(&[3])));
    let e = qat::sgd_step(&mut cb, &g, 0.1).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    assert_eq!(format!("{:?}", cb), before);
}

/// With fake quant off, the QAT ConvBnReLU2d step (its γ = 0 channel included) has the
/// float conv → BatchNorm → ReLU chain's gradients.
fn check_float_gradients(b: &dyn HostOps, what: &str) {
    let mut rng = Rng(110);
    let float = gamma_zero_model(&mut rng);
    let Layer::Fused(f) = float.get("0").unwrap().layer().clone() else {
        panic!("not fused")
    };
    let conv = match &f.head {
        qfuse::nn::FusedHead::Conv2d(c) => Conv2d {
            weight: c.weight.clone().into_dimensionality().unwrap(),
            bias: c.bias.clone(),
            params: c.params,
        },
        _ => unreachable!(),
    };
    let bn = f.bn.clone().unwrap().bn;
    let x = rng.arr(&[2, 3, 6, 6], -1.0, 1.0);
    let dy = rng.arr(&[2, 4, 6, 6], -1.0, 1.0);
    let x4: Array4<f32> = x.clone().into_dimensionality().unwrap();
    let z = b
        .conv2d(&x4, &conv.weight, conv.bias.as_ref(), &conv.params)
        .unwrap();
    let bo = b.batch_norm2d(&z, &bn, true).unwrap();
    let dbo = b
        .activation_backward(&bo.y.clone().into_dyn(), &dy, Activation::Relu)
        .unwrap()
        .into_dimensionality()
        .unwrap();
    let bg = b.batch_norm2d_backward(&z, &dbo, &bn, &bo, true).unwrap();
    let cg = b
        .conv2d_backward(&x4, &conv.weight, &bg.dx, &conv.params)
        .unwrap();

    let mut qm = float.clone();
    qat::prepare_qat(&mut qm, &weight_only_x86()).unwrap();
    qat::disable_fake_quant(&mut qm);
    let step = qat::train_step(&mut qm, b, &x, dot_loss(&dy)).unwrap();
    let tol = 1e-4;
    assert_close(
        &format!("{what} float dx"),
        &step.dx,
        &cg.dx.into_dyn(),
        tol,
    );
    assert_close(
        &format!("{what} float dW"),
        &step.grads["0.weight"],
        &cg.dweight.into_dyn(),
        tol,
    );
    assert_close(
        &format!("{what} float db"),
        &step.grads["0.bias"],
        &cg.dbias.into_dyn(),
        tol,
    );
    assert_close(
        &format!("{what} float dγ"),
        &step.grads["0.bn.weight"],
        &bg.dweight.into_dyn(),
        tol,
    );
    assert_close(
        &format!("{what} float dβ"),
        &step.grads["0.bn.bias"],
        &bg.dbias.into_dyn(),
        tol,
    );
}

fn fake_quant_off_gradients_are_the_float_ones_cpu() {
    check_float_gradients(&CpuBackend, "cpu");
}

fn fake_quant_off_gradients_are_the_float_ones_gpu() {
    let Some(g) = gpu() else { return };
    check_float_gradients(&g, "gpu");
}

crate::qfuse_tests! {
    prepare_qat_converts_small_models,
    prepare_qat_errors_leave_the_model_unchanged,
    conv_bn_step_equals_backend_ops_cpu,
    conv_bn_step_equals_backend_ops_gpu: gpu,
    cpu_and_gpu_agree: gpu,
    freeze_bn_uses_and_keeps_running_stats_cpu,
    freeze_bn_uses_and_keeps_running_stats_gpu: gpu,
    observer_and_fake_quant_switches,
    moving_average_observer_follows_pytorch,
    gamma_zero_stays_finite_cpu,
    gamma_zero_stays_finite_gpu: gpu,
    eval_forward_is_the_deploy_graph,
    convert_to_float_equals_the_float_fused_model,
    qat_training_reduces_the_loss_cpu,
    qat_training_reduces_the_loss_gpu: gpu,
    plain_qat_modules_backward_matches_finite_differences,
    train_step_and_sgd_refuse_what_they_cannot_do,
    fake_quant_off_gradients_are_the_float_ones_cpu,
    fake_quant_off_gradients_are_the_float_ones_gpu: gpu,
}
