//! The module tree and the fusion API: fused == unfused (eval, CPU, 1e-4), GPU == CPU (1e-4),
//! QAT intrinsics, hooks, find_fusable round trips, inplace vs copy, every error, custom
//! fusers; plus the backend additions behind them (LeakyReLU / Hardswish, conv_transpose2d,
//! the fused-activation ops) on the GPU against the CPU.
//!
//! GPU parts run with `WGPU_BACKEND=vulkan QFUSE_REQUIRE_GPU=1` (lavapipe); without an
//! adapter they print one skip line.

use crate::common;

use std::any::Any;
use std::sync::{Arc, Mutex};

use ndarray::{Array1, Array2, Array3, Array4, ArrayD, IxDyn};
use qfuse::fuse::{
    default_patterns, find_fusable, find_fusable_with, fuse_modules, fuse_modules_qat, FuseOptions,
    FuserRegistry,
};
use qfuse::nn::{
    BatchNormLayer, Container, Conv1dParams, CustomLayer, Fused, FusedHead, Layer, Module,
};
use qfuse::ops::{Activation, BatchNorm, Conv2dParams, ConvTranspose2dParams, QatConfig};
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
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
    fn arr(&mut self, shape: &[usize], lo: f32, hi: f32) -> ArrayD<f32> {
        let n = shape.iter().product();
        ArrayD::from_shape_vec(IxDyn(shape), self.vec(n, lo, hi)).unwrap()
    }
    fn arr1(&mut self, n: usize, lo: f32, hi: f32) -> Array1<f32> {
        Array1::from(self.vec(n, lo, hi))
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

fn bn2d(rng: &mut Rng, c: usize) -> Module {
    Module::batch_norm2d(bn(rng, c)).unwrap()
}

fn bn1d(rng: &mut Rng, c: usize) -> Module {
    Module::batch_norm1d(bn(rng, c)).unwrap()
}

/// A conv2d with weights scaled by 1/sqrt(fan_in) (so activations stay near 1).
fn conv(rng: &mut Rng, cin: usize, cout: usize, k: usize, p: Conv2dParams, bias: bool) -> Module {
    let fan = (cin / p.groups * k * k) as f32;
    let a = 1.5 / fan.sqrt();
    let w = rng
        .arr(&[cout, cin / p.groups, k, k], -a, a)
        .into_dimensionality()
        .unwrap();
    let b = bias.then(|| rng.arr1(cout, -0.2, 0.2));
    Module::conv2d(w, b, p).unwrap()
}

fn conv1d(rng: &mut Rng, cin: usize, cout: usize, k: usize, p: Conv1dParams, bias: bool) -> Module {
    let fan = (cin / p.groups * k) as f32;
    let a = 1.5 / fan.sqrt();
    let w: Array3<f32> = rng
        .arr(&[cout, cin / p.groups, k], -a, a)
        .into_dimensionality()
        .unwrap();
    let b = bias.then(|| rng.arr1(cout, -0.2, 0.2));
    Module::conv1d(w, b, p).unwrap()
}

fn linear(rng: &mut Rng, inp: usize, out: usize, bias: bool) -> Module {
    let a = 1.5 / (inp as f32).sqrt();
    let w: Array2<f32> = rng.arr(&[out, inp], -a, a).into_dimensionality().unwrap();
    let b = bias.then(|| rng.arr1(out, -0.2, 0.2));
    Module::linear(w, b).unwrap()
}

fn conv_t(
    rng: &mut Rng,
    cin: usize,
    cout: usize,
    k: usize,
    p: ConvTranspose2dParams,
    bias: bool,
) -> Module {
    let a = 1.5 / ((cin / p.groups * k * k) as f32).sqrt();
    let w: Array4<f32> = rng
        .arr(&[cin, cout / p.groups, k, k], -a, a)
        .into_dimensionality()
        .unwrap();
    let b = bias.then(|| rng.arr1(cout, -0.2, 0.2));
    Module::conv_transpose2d(w, b, p).unwrap()
}

fn pad1() -> Conv2dParams {
    Conv2dParams {
        padding: [1, 1],
        ..Default::default()
    }
}

fn assert_close(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>, tol: f32) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let mut worst = 0.0f32;
    for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= tol * (1.0 + w.abs()) || (g.is_nan() && w.is_nan()),
            "{what}[{i}]: got {g:e}, want {w:e}"
        );
        worst = worst.max(err);
    }
    assert!(got.iter().any(|v| *v != 0.0), "{what}: all zeros");
}

fn kinds(m: &Module) -> Vec<String> {
    m.named_children()
        .iter()
        .map(|(_, c)| c.kind_name())
        .collect()
}

fn gpu() -> Option<GpuBackend> {
    common::gpu().map(GpuBackend::new)
}

// ------------------------------------------------------------------------- models

/// A ResNet BasicBlock: relu2(bn2(conv2(relu1(bn1(conv1(x))))) + x), with its two chains
/// declared (the add sits between bn2 and relu2).
fn basic_block(rng: &mut Rng, c: usize) -> Module {
    let block = Container::new("BasicBlock")
        .with_child("conv1", conv(rng, c, c, 3, pad1(), false))
        .unwrap()
        .with_child("bn1", bn2d(rng, c))
        .unwrap()
        .with_child("relu1", Module::relu())
        .unwrap()
        .with_child("conv2", conv(rng, c, c, 3, pad1(), false))
        .unwrap()
        .with_child("bn2", bn2d(rng, c))
        .unwrap()
        .with_child("relu2", Module::relu())
        .unwrap()
        .with_forward(
            vec![vec!["conv1", "bn1", "relu1", "conv2", "bn2"], vec!["relu2"]],
            |s, x| {
                let y = s.call("conv1", x)?;
                let y = s.call("bn1", &y)?;
                let y = s.call("relu1", &y)?;
                let y = s.call("conv2", &y)?;
                let y = s.call("bn2", &y)?;
                s.call("relu2", &(y + x))
            },
        )
        .unwrap();
    Module::container(block)
}

fn resnet(rng: &mut Rng) -> Module {
    let stem = Conv2dParams {
        stride: [2, 2],
        padding: [1, 1],
        ..Default::default()
    };
    let net = Container::new("ResNetish")
        .with_child("conv1", conv(rng, 3, 8, 3, stem, false))
        .unwrap()
        .with_child("bn1", bn2d(rng, 8))
        .unwrap()
        .with_child("relu", Module::relu())
        .unwrap()
        .with_child(
            "layer1",
            Module::sequential([basic_block(rng, 8), basic_block(rng, 8)]),
        )
        .unwrap()
        .with_child("pool", Module::max_pool2d(2, 2).unwrap())
        .unwrap()
        .with_child("flatten", Module::flatten(1, -1))
        .unwrap()
        .with_child("fc", linear(rng, 8 * 4 * 4, 10, true))
        .unwrap();
    Module::container(net)
}

/// Depthwise + pointwise blocks with ReLU6, and the other activations.
fn mobilenet(rng: &mut Rng) -> Module {
    let s2 = Conv2dParams {
        stride: [2, 2],
        padding: [1, 1],
        ..Default::default()
    };
    let dw = Conv2dParams {
        padding: [1, 1],
        groups: 8,
        ..Default::default()
    };
    Module::sequential([
        conv(rng, 3, 8, 3, s2, false),
        bn2d(rng, 8),
        Module::relu6(),
        conv(rng, 8, 8, 3, dw, false),
        bn2d(rng, 8),
        Module::relu6(),
        conv(rng, 8, 16, 1, Conv2dParams::default(), false),
        bn2d(rng, 16),
        Module::hardswish(),
        conv(rng, 16, 16, 3, pad1(), true),
        Module::leaky_relu(0.1),
        bn2d(rng, 16),
        Module::relu(),
        conv(rng, 16, 8, 1, Conv2dParams::default(), true),
        bn2d(rng, 8),
    ])
}

fn mlp(rng: &mut Rng) -> Module {
    Module::sequential([
        linear(rng, 16, 12, false),
        bn1d(rng, 12),
        Module::relu(),
        linear(rng, 12, 10, true),
        bn1d(rng, 10),
        Module::leaky_relu(0.2),
        linear(rng, 10, 8, true),
        Module::relu6(),
        bn1d(rng, 8),
        Module::hardswish(),
    ])
}

fn deconv(rng: &mut Rng) -> Module {
    let up = ConvTranspose2dParams {
        stride: [2, 2],
        padding: [1, 1],
        output_padding: [1, 1],
        groups: 2,
        ..Default::default()
    };
    let g2 = ConvTranspose2dParams {
        groups: 2,
        ..Default::default()
    };
    let dw = ConvTranspose2dParams {
        padding: [1, 1],
        dilation: [2, 1],
        groups: 4,
        ..Default::default()
    };
    Module::sequential([
        conv_t(rng, 4, 6, 3, up, true),
        bn2d(rng, 6),
        Module::relu(),
        conv_t(rng, 6, 4, 2, g2, false),
        bn2d(rng, 4),
        conv_t(rng, 4, 4, 3, dw, true),
        Module::hardswish(),
    ])
}

fn conv1d_net(rng: &mut Rng) -> Module {
    let same = Conv1dParams {
        padding: 1,
        ..Default::default()
    };
    let grouped = Conv1dParams {
        stride: 2,
        groups: 3,
        ..Default::default()
    };
    Module::sequential([
        conv1d(rng, 4, 6, 3, same, true),
        bn1d(rng, 6),
        Module::relu(),
        conv1d(rng, 6, 6, 3, grouped, false),
        bn1d(rng, 6),
        conv1d(rng, 6, 4, 1, Conv1dParams::default(), true),
        Module::leaky_relu(0.05),
    ])
}

struct Case {
    name: &'static str,
    model: Module,
    input: ArrayD<f32>,
    groups: Vec<Vec<&'static str>>,
    /// Kinds of the first module of each group after eval fusion.
    eval_kinds: Vec<&'static str>,
    /// After QAT fusion.
    qat_kinds: Vec<&'static str>,
}

fn cases() -> Vec<Case> {
    let mut rng = Rng(2024);
    let r = &mut rng;
    vec![
        Case {
            name: "resnet",
            model: resnet(r),
            input: r.arr(&[2, 3, 16, 16], -1.0, 1.0),
            groups: vec![
                vec!["conv1", "bn1", "relu"],
                vec!["layer1.0.conv1", "layer1.0.bn1", "layer1.0.relu1"],
                vec!["layer1.0.conv2", "layer1.0.bn2"],
                vec!["layer1.1.conv1", "layer1.1.bn1", "layer1.1.relu1"],
                vec!["layer1.1.conv2", "layer1.1.bn2"],
            ],
            eval_kinds: vec!["ConvReLU2d", "ConvReLU2d", "Conv2d", "ConvReLU2d", "Conv2d"],
            qat_kinds: vec![
                "ConvBnReLU2d",
                "ConvBnReLU2d",
                "ConvBn2d",
                "ConvBnReLU2d",
                "ConvBn2d",
            ],
        },
        Case {
            name: "mobilenet",
            model: mobilenet(r),
            input: r.arr(&[2, 3, 12, 12], -1.0, 1.0),
            groups: vec![
                vec!["0", "1", "2"],
                vec!["3", "4", "5"],
                vec!["6", "7", "8"],
                vec!["9", "10"],
                vec!["11", "12"],
                vec!["13", "14"],
            ],
            eval_kinds: vec![
                "ConvReLU62d",
                "ConvReLU62d",
                "ConvHardswish2d",
                "ConvLeakyReLU2d",
                "BNReLU2d",
                "Conv2d",
            ],
            qat_kinds: vec![
                "ConvBnReLU62d",
                "ConvBnReLU62d",
                "ConvBnHardswish2d",
                "ConvLeakyReLU2d",
                "BNReLU2d",
                "ConvBn2d",
            ],
        },
        Case {
            name: "mlp",
            model: mlp(r),
            input: r.arr(&[6, 16], -1.0, 1.0),
            groups: vec![
                vec!["0", "1", "2"],
                vec!["3", "4", "5"],
                vec!["6", "7"],
                vec!["8", "9"],
            ],
            eval_kinds: vec![
                "LinearReLU",
                "LinearLeakyReLU",
                "LinearReLU6",
                "BNHardswish1d",
            ],
            qat_kinds: vec![
                "LinearBnReLU1d",
                "LinearBnLeakyReLU1d",
                "LinearReLU6",
                "BNHardswish1d",
            ],
        },
        Case {
            name: "deconv",
            model: deconv(r),
            input: r.arr(&[2, 4, 5, 5], -1.0, 1.0),
            groups: vec![vec!["0", "1", "2"], vec!["3", "4"], vec!["5", "6"]],
            eval_kinds: vec![
                "ConvTransposeReLU2d",
                "ConvTranspose2d",
                "ConvTransposeHardswish2d",
            ],
            qat_kinds: vec![
                "ConvTransposeBnReLU2d",
                "ConvTransposeBn2d",
                "ConvTransposeHardswish2d",
            ],
        },
        Case {
            name: "conv1d",
            model: conv1d_net(r),
            input: r.arr(&[2, 4, 12], -1.0, 1.0),
            groups: vec![vec!["0", "1", "2"], vec!["3", "4"], vec!["5", "6"]],
            eval_kinds: vec!["ConvReLU1d", "Conv1d", "ConvLeakyReLU1d"],
            qat_kinds: vec!["ConvBnReLU1d", "ConvBn1d", "ConvLeakyReLU1d"],
        },
    ]
}

fn group_strings(g: &[Vec<&str>]) -> Vec<Vec<String>> {
    g.iter()
        .map(|g| g.iter().map(|s| s.to_string()).collect())
        .collect()
}

// ------------------------------------------------------------------------- fusion numerics

fn eval_fusion_matches_unfused_on_cpu() {
    for mut case in cases() {
        case.model.eval();
        let groups = find_fusable(&case.model);
        assert_eq!(
            groups,
            group_strings(&case.groups),
            "{}: find_fusable",
            case.name
        );
        let fused = fuse_modules(&mut case.model, groups.clone(), FuseOptions::default())
            .unwrap()
            .unwrap();
        for (g, want) in groups.iter().zip(&case.eval_kinds) {
            assert_eq!(
                fused.get(&g[0]).unwrap().kind_name(),
                *want,
                "{}",
                case.name
            );
            for rest in &g[1..] {
                let m = fused.get(rest).unwrap();
                assert_eq!(m.kind_name(), "Identity");
                assert!(!m.is_training());
            }
        }
        // Nothing left to fuse.
        assert!(find_fusable(&fused).is_empty(), "{}", case.name);
        let want = case.model.forward(&CpuBackend, &case.input).unwrap();
        let got = fused.clone().forward(&CpuBackend, &case.input).unwrap();
        assert_close(
            &format!("{} fused vs unfused (cpu)", case.name),
            &got,
            &want,
            1e-4,
        );
    }
}

fn gpu_matches_cpu_fused_and_unfused() {
    let Some(gpu) = gpu() else { return };
    for mut case in cases() {
        case.model.eval();
        let groups = find_fusable(&case.model);
        let mut fused = fuse_modules(&mut case.model, groups, FuseOptions::default())
            .unwrap()
            .unwrap();
        let want = case.model.forward(&CpuBackend, &case.input).unwrap();
        let got = case.model.forward(&gpu, &case.input).unwrap();
        assert_close(
            &format!("{} unfused gpu vs cpu", case.name),
            &got,
            &want,
            1e-4,
        );
        let want = fused.forward(&CpuBackend, &case.input).unwrap();
        let got = fused.forward(&gpu, &case.input).unwrap();
        assert_close(
            &format!("{} fused gpu vs cpu", case.name),
            &got,
            &want,
            1e-4,
        );
    }
}

/// The running statistics of every BatchNorm of `m` (plain or inside an intrinsic), in
/// named_modules order.
fn running_stats(m: &Module) -> Vec<(Array1<f32>, Array1<f32>, u64)> {
    let mut out = Vec::new();
    for (_, m) in m.named_modules() {
        let b = match m.layer() {
            Layer::BatchNorm1d(b) | Layer::BatchNorm2d(b) => Some(b),
            Layer::Fused(f) => match (&f.head, &f.bn) {
                (_, Some(b)) => Some(b),
                (FusedHead::BatchNorm1d(b) | FusedHead::BatchNorm2d(b), None) => Some(b),
                _ => None,
            },
            _ => None,
        };
        if let Some(b) = b {
            out.push((
                b.bn.running_mean.clone(),
                b.bn.running_var.clone(),
                b.num_batches_tracked,
            ));
        }
    }
    out
}

fn check_qat(backend: &dyn HostOps, what: &str) {
    for case in cases() {
        let mut model = case.model.clone();
        model.train(true);
        let groups = find_fusable(&model);
        let mut fused = fuse_modules_qat(&mut model, groups.clone(), FuseOptions::default())
            .unwrap()
            .unwrap();
        for (g, want) in groups.iter().zip(&case.qat_kinds) {
            let m = fused.get(&g[0]).unwrap();
            assert_eq!(m.kind_name(), *want, "{}", case.name);
            assert!(m.is_training());
        }
        // Training mode: batch statistics, running statistics updated identically.
        for step in 0..2 {
            let want = model.forward(backend, &case.input).unwrap();
            let got = fused.forward(backend, &case.input).unwrap();
            assert_close(
                &format!("{what} {} qat train step {step}", case.name),
                &got,
                &want,
                1e-4,
            );
        }
        let (a, b) = (running_stats(&model), running_stats(&fused));
        assert_eq!(a.len(), b.len(), "{}", case.name);
        for ((m1, v1, n1), (m2, v2, n2)) in a.iter().zip(&b) {
            assert_eq!(n1, n2);
            assert_eq!(*n1, 2);
            assert_close(
                "running_mean",
                &m2.clone().into_dyn(),
                &m1.clone().into_dyn(),
                1e-5,
            );
            assert_close(
                "running_var",
                &v2.clone().into_dyn(),
                &v1.clone().into_dyn(),
                1e-5,
            );
        }
        // Eval mode: the intrinsics fold on the fly.
        model.eval();
        fused.eval();
        let want = model.forward(backend, &case.input).unwrap();
        let got = fused.forward(backend, &case.input).unwrap();
        assert_close(&format!("{what} {} qat eval", case.name), &got, &want, 1e-4);
    }
}

fn qat_fusion_keeps_batch_norm_cpu() {
    check_qat(&CpuBackend, "cpu");
}

fn qat_fusion_keeps_batch_norm_gpu() {
    let Some(gpu) = gpu() else { return };
    check_qat(&gpu, "gpu");
}

fn qat_intrinsic_holds_unfolded_parts() {
    let mut rng = Rng(5);
    let mut model = mobilenet(&mut rng);
    let conv0 = model.get("0").unwrap().clone();
    let bn1 = model.get("1").unwrap().clone();
    fuse_modules_qat(
        &mut model,
        ["0", "1", "2"],
        FuseOptions {
            inplace: true,
            ..Default::default()
        },
    )
    .unwrap();
    let Layer::Fused(f) = model.get("0").unwrap().layer() else {
        panic!("not fused")
    };
    assert!(f.is_intrinsic());
    assert_eq!(f.act, Activation::Relu6);
    let (Layer::Conv2d(c), FusedHead::Conv2d(fc)) = (conv0.layer(), &f.head) else {
        panic!("heads")
    };
    assert_eq!(c, fc);
    let Layer::BatchNorm2d(b) = bn1.layer() else {
        panic!()
    };
    assert_eq!(Some(b), f.bn.as_ref());
}

// ------------------------------------------------------------------------- hooks

type Log = Arc<Mutex<Vec<String>>>;

fn hooks_move_to_the_fused_module() {
    let mut rng = Rng(7);
    let mut model = resnet(&mut rng);
    model.eval();
    let log: Log = Arc::default();
    let l = log.clone();
    let pre = model
        .get_mut("conv1")
        .unwrap()
        .register_forward_pre_hook(move |path, x| {
            l.lock()
                .unwrap()
                .push(format!("pre {path} {:?}", x.shape()));
            None
        });
    let l = log.clone();
    let post = model
        .get_mut("relu")
        .unwrap()
        .register_forward_hook(move |path, _x, y| {
            l.lock()
                .unwrap()
                .push(format!("post {path} {:?}", y.shape()));
            None
        });
    // Lost, as in PyTorch: post-hook of the first module, pre-hook of a middle one.
    let l = log.clone();
    model
        .get_mut("conv1")
        .unwrap()
        .register_forward_hook(move |_, _, _| {
            l.lock().unwrap().push("lost".into());
            None
        });
    let l = log.clone();
    model
        .get_mut("bn1")
        .unwrap()
        .register_forward_pre_hook(move |_, _| {
            l.lock().unwrap().push("lost".into());
            None
        });

    let x = rng.arr(&[1, 3, 16, 16], -1.0, 1.0);
    model.forward(&CpuBackend, &x).unwrap();
    assert_eq!(log.lock().unwrap().len(), 4);
    log.lock().unwrap().clear();

    let mut fused = fuse_modules(&mut model, ["conv1", "bn1", "relu"], FuseOptions::default())
        .unwrap()
        .unwrap();
    let f = fused.get("conv1").unwrap();
    assert_eq!(f.forward_pre_hooks(), vec![pre]);
    assert_eq!(f.forward_hooks(), vec![post]);
    for n in ["bn1", "relu"] {
        let m = fused.get(n).unwrap();
        assert!(m.forward_pre_hooks().is_empty() && m.forward_hooks().is_empty());
    }
    fused.forward(&CpuBackend, &x).unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        vec![
            "pre conv1 [1, 3, 16, 16]".to_string(),
            "post conv1 [1, 8, 8, 8]".to_string()
        ]
    );
    // The handles still find their hooks after the move.
    assert!(pre.remove(&mut fused));
    assert!(!pre.remove(&mut fused));
    assert!(fused.remove_hook(post));
    assert!(fused.get("conv1").unwrap().forward_hooks().is_empty());
    // The original (not inplace) keeps its own hooks.
    assert_eq!(model.get("conv1").unwrap().forward_pre_hooks(), vec![pre]);
}

fn hooks_replace_values_and_see_paths() {
    let mut model = Module::sequential([
        Module::sequential([Module::identity(), Module::relu()]),
        Module::identity(),
    ]);
    let seen: Log = Arc::default();
    let s = seen.clone();
    model
        .get_mut("0.1")
        .unwrap()
        .register_forward_pre_hook(move |p, x| {
            s.lock().unwrap().push(p.to_string());
            Some(x.mapv(|v| v - 1.0))
        });
    let h = model
        .get_mut("1")
        .unwrap()
        .register_forward_hook(|_, _, y| Some(y.mapv(|v| v * 10.0)));
    let x = ArrayD::from_shape_vec(IxDyn(&[3]), vec![0.5f32, 2.0, 3.0]).unwrap();
    let y = model.forward(&CpuBackend, &x).unwrap();
    assert_eq!(y.as_slice().unwrap(), &[0.0, 10.0, 20.0]);
    assert_eq!(*seen.lock().unwrap(), vec!["0.1".to_string()]);
    // A hook on the root sees path "".
    let s = seen.clone();
    model.register_forward_pre_hook(move |p, _| {
        s.lock().unwrap().push(format!("root:{p}"));
        None
    });
    h.remove(&mut model);
    let y = model.forward(&CpuBackend, &x).unwrap();
    assert_eq!(y.as_slice().unwrap(), &[0.0, 1.0, 2.0]);
    assert_eq!(seen.lock().unwrap().last().unwrap(), "0.1");
    assert!(seen.lock().unwrap().contains(&"root:".to_string()));
}

// ------------------------------------------------------------------------- API behaviour

fn find_fusable_round_trip_inplace_and_copy() {
    for case in cases() {
        let mut a = case.model.clone();
        a.eval();
        let x = &case.input;
        let want = a.clone().forward(&CpuBackend, x).unwrap();
        let groups = find_fusable(&a);
        // Copy: the original is untouched.
        let before: Vec<String> = a
            .named_modules()
            .iter()
            .map(|(_, m)| m.kind_name())
            .collect();
        let mut copy = fuse_modules(&mut a, groups.clone(), FuseOptions::default())
            .unwrap()
            .unwrap();
        let after: Vec<String> = a
            .named_modules()
            .iter()
            .map(|(_, m)| m.kind_name())
            .collect();
        assert_eq!(before, after, "{}", case.name);
        // In place: the model itself changes, to the same thing.
        let mut b = a.clone();
        let r = fuse_modules(
            &mut b,
            groups,
            FuseOptions {
                inplace: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(r.is_none());
        let kb: Vec<String> = b
            .named_modules()
            .iter()
            .map(|(_, m)| m.kind_name())
            .collect();
        let kc: Vec<String> = copy
            .named_modules()
            .iter()
            .map(|(_, m)| m.kind_name())
            .collect();
        assert_eq!(kb, kc);
        assert_ne!(kb, before);
        let yb = b.forward(&CpuBackend, x).unwrap();
        let yc = copy.forward(&CpuBackend, x).unwrap();
        assert_eq!(yb, yc);
        assert_close(case.name, &yb, &want, 1e-4);
    }
}

fn groups_as_one_list_or_many() {
    let mut rng = Rng(11);
    let mut m = mobilenet(&mut rng);
    m.eval();
    let one = fuse_modules(&mut m, vec!["0", "1", "2"], FuseOptions::default())
        .unwrap()
        .unwrap();
    assert_eq!(one.get("0").unwrap().kind_name(), "ConvReLU62d");
    assert_eq!(one.get("3").unwrap().kind_name(), "Conv2d");
    let many = fuse_modules(
        &mut m,
        vec![vec!["0", "1", "2"], vec!["3", "4"]],
        FuseOptions::default(),
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        &kinds(&many)[..6],
        [
            "ConvReLU62d",
            "Identity",
            "Identity",
            "Conv2d",
            "Identity",
            "ReLU6"
        ]
    );
}

fn tree_paths_train_eval_replace() {
    let mut rng = Rng(3);
    let mut model = resnet(&mut rng);
    let paths: Vec<String> = model.named_modules().into_iter().map(|(p, _)| p).collect();
    let mut want = vec!["", "conv1", "bn1", "relu", "layer1"];
    let block = ["conv1", "bn1", "relu1", "conv2", "bn2", "relu2"];
    let mut tail = Vec::new();
    for b in ["0", "1"] {
        tail.push(format!("layer1.{b}"));
        for c in block {
            tail.push(format!("layer1.{b}.{c}"));
        }
    }
    want.extend(tail.iter().map(String::as_str));
    want.extend(["pool", "flatten", "fc"]);
    assert_eq!(paths, want);
    assert_eq!(model.kind_name(), "ResNetish");
    assert_eq!(model.get("layer1").unwrap().kind_name(), "Sequential");
    assert_eq!(model.get("layer1.1").unwrap().kind_name(), "BasicBlock");
    assert_eq!(
        model.get("layer1.1.bn2").unwrap().kind_name(),
        "BatchNorm2d"
    );

    // train()/eval() propagate; set_training is local.
    assert!(model.named_modules().iter().all(|(_, m)| m.is_training()));
    model.get_mut("layer1").unwrap().eval();
    assert!(model.is_training());
    assert!(!model.get("layer1.0.conv1").unwrap().is_training());
    assert!(model.get("conv1").unwrap().is_training());
    model.eval();
    model.get_mut("layer1.0").unwrap().set_training(true);
    assert!(model.get("layer1.0").unwrap().is_training());
    assert!(!model.get("layer1.0.bn1").unwrap().is_training());

    // replace keeps the name and the place.
    let old = model.replace("layer1.0.relu1", Module::relu6()).unwrap();
    assert_eq!(old.kind_name(), "ReLU");
    let names: Vec<&str> = model
        .get("layer1.0")
        .unwrap()
        .named_children()
        .iter()
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(names, block);
    assert_eq!(model.get("layer1.0.relu1").unwrap().kind_name(), "ReLU6");
    assert!(model.replace("", Module::identity()).is_err());

    // Unknown paths name the closest ones.
    // Nearest first, ties by name: conv1 (1 edit), then bn1, conv2, layer1.1.conv1 (2).
    assert_eq!(
        model.closest_paths("layer1.0.cnv1"),
        ["layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2"]
    );
    let e = model.get("layer1.0.cnv1").unwrap_err();
    assert!(matches!(e, Error::UnknownModule { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        "unknown module `layer1.0.cnv1`: did you mean `layer1.0.conv1`, `layer1.0.bn1`, \
         `layer1.0.conv2`?"
    );
    let e = model.get_mut("zzzzzzzzzzzz").unwrap_err().to_string();
    assert!(
        e.starts_with("unknown module `zzzzzzzzzzzz`: no module is close; the modules are `conv1`"),
        "{e}"
    );

    // visit_mut sees every module with its path.
    let mut seen = Vec::new();
    model.visit_mut(&mut |p, m| {
        if matches!(m.layer(), Layer::ReLU) {
            *m = Module::hardswish();
        }
        seen.push(p.to_string());
    });
    assert_eq!(seen, paths);
    assert_eq!(model.get("relu").unwrap().kind_name(), "Hardswish");
}

fn batch_norm_training_updates_running_stats() {
    let mut rng = Rng(4);
    let state = bn(&mut rng, 3);
    let mut m = Module::batch_norm2d(state.clone()).unwrap();
    let x4: Array4<f32> = rng
        .arr(&[4, 3, 5, 5], -2.0, 2.0)
        .into_dimensionality()
        .unwrap();
    let y = m.forward(&CpuBackend, &x4.clone().into_dyn()).unwrap();
    let want = reference::batch_norm::batch_norm2d(&x4, &state, true).unwrap();
    assert_eq!(y, want.y.into_dyn());
    let Layer::BatchNorm2d(b) = m.layer() else {
        panic!()
    };
    assert_eq!(b.bn.running_mean, want.running_mean);
    assert_eq!(b.num_batches_tracked, 1);
    m.eval();
    m.forward(&CpuBackend, &x4.into_dyn()).unwrap();
    let Layer::BatchNorm2d(b) = m.layer() else {
        panic!()
    };
    assert_eq!(b.num_batches_tracked, 1);
    // BatchNorm1d on (N, C, L) normalizes over N and L.
    let mut m1 = Module::batch_norm1d(state.clone()).unwrap();
    let x3 = rng.arr(&[4, 3, 7], -2.0, 2.0);
    let y1 = m1.forward(&CpuBackend, &x3).unwrap();
    let x4 = x3
        .clone()
        .into_shape_with_order(IxDyn(&[4, 3, 1, 7]))
        .unwrap();
    let want =
        reference::batch_norm::batch_norm2d(&x4.into_dimensionality().unwrap(), &state, true)
            .unwrap()
            .y
            .into_shape_with_order(IxDyn(&[4, 3, 7]))
            .unwrap();
    assert_eq!(y1, want);
    assert_eq!(BatchNormLayer::with_features(5).num_features(), 5);
}

fn layer_forward_shapes_and_input_errors() {
    let mut rng = Rng(9);
    let mut lin = linear(&mut rng, 4, 3, true);
    // Linear acts on the last dimension of any rank.
    let y = lin
        .forward(&CpuBackend, &rng.arr(&[2, 5, 4], -1.0, 1.0))
        .unwrap();
    assert_eq!(y.shape(), &[2, 5, 3]);
    let e = lin
        .forward(&CpuBackend, &rng.arr(&[2, 5], -1.0, 1.0))
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    let mut c = conv(&mut rng, 3, 4, 3, pad1(), true);
    let e = c
        .forward(&CpuBackend, &rng.arr(&[3, 8, 8], -1.0, 1.0))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid argument: Conv2d expects a 4-D input (N, C, H, W), got shape [3, 8, 8]"
    );
    let mut f = Module::flatten(1, -1);
    assert_eq!(
        f.forward(&CpuBackend, &rng.arr(&[2, 3, 4, 5], 0.0, 1.0))
            .unwrap()
            .shape(),
        &[2, 60]
    );
    let mut f = Module::flatten(1, 2);
    assert_eq!(
        f.forward(&CpuBackend, &rng.arr(&[2, 3, 4, 5], 0.0, 1.0))
            .unwrap()
            .shape(),
        &[2, 12, 5]
    );
    assert!(Module::flatten(3, 1)
        .forward(&CpuBackend, &rng.arr(&[2, 3, 4, 5], 0.0, 1.0))
        .is_err());
    assert!(Module::max_pool2d(0, 1).is_err());
    // Construction errors.
    let e = Module::linear(Array2::zeros((3, 4)), Some(Array1::zeros(2))).unwrap_err();
    assert_eq!(
        e.to_string(),
        "shape mismatch in Linear bias: expected [3], got [2]"
    );
    let e = Container::new("X")
        .with_child("a.b", Module::relu())
        .unwrap_err();
    assert!(e.to_string().contains("can't be empty or contain"), "{e}");
    let e = Container::new("X")
        .with_child("a", Module::relu())
        .unwrap()
        .with_order(["a", "b"])
        .unwrap_err();
    assert!(matches!(e, Error::UnknownModule { .. }), "{e}");
    // A declared order runs children in that order (and may repeat one).
    let c = Container::new("Twice")
        .with_child("relu", Module::relu())
        .unwrap()
        .with_child("neg", Module::leaky_relu(-1.0))
        .unwrap()
        .with_order(["neg", "relu", "neg"])
        .unwrap();
    let mut m = Module::container(c);
    let x = ArrayD::from_shape_vec(IxDyn(&[2]), vec![-2.0f32, 3.0]).unwrap();
    // neg: x>0 ? x : -x → [2, 3]; relu → [2, 3]; neg → [2, 3].
    assert_eq!(
        m.forward(&CpuBackend, &x).unwrap().as_slice().unwrap(),
        &[2.0, 3.0]
    );
    // A child used twice is never fused.
    let c = Container::new("Twice")
        .with_child(
            "conv",
            conv(&mut rng, 2, 2, 1, Conv2dParams::default(), false),
        )
        .unwrap()
        .with_child("relu", Module::relu())
        .unwrap()
        .with_order(["conv", "relu", "conv", "relu"])
        .unwrap();
    assert!(find_fusable(&Module::container(c)).is_empty());
}

// ------------------------------------------------------------------------- errors

fn err_of(r: qfuse::Result<Option<Module>>) -> Error {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

fn every_fusion_error() {
    let mut rng = Rng(21);
    let mut model = resnet(&mut rng);
    model.eval();
    let opts = FuseOptions::default;

    // Unknown name: the hint names the closest.
    let e = err_of(fuse_modules(&mut model, ["conv1", "bn_1"], opts()));
    assert!(
        matches!(&e, Error::UnknownModule { name, .. } if name == "bn_1"),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "unknown module `bn_1`: did you mean `bn1`, `conv1`?"
    );

    // Unsupported pattern: lists the types found.
    let e = err_of(fuse_modules(&mut model, ["relu", "layer1"], opts()));
    assert!(
        matches!(&e, Error::UnsupportedPattern { types, .. } if types == &["ReLU", "Sequential"]),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "did not find fuser method for: (ReLU, Sequential) (modules `relu`, `layer1`)"
    );
    let e = err_of(fuse_modules(&mut model, ["conv1"], opts()));
    assert_eq!(
        e.to_string(),
        "did not find fuser method for: (Conv2d) (modules `conv1`)"
    );
    let e = err_of(fuse_modules(&mut model, ["conv1", "relu", "bn1"], opts()));
    assert!(matches!(e, Error::UnsupportedPattern { .. }), "{e}");

    // Training mode under eval fusion ("Fusion only for eval!").
    let mut train = model.clone();
    train.train(true);
    let e = err_of(fuse_modules(&mut train, ["conv1", "bn1", "relu"], opts()));
    assert!(matches!(e, Error::FusionTrainingMode { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        "Fusion only for eval! `conv1` (Conv2d) is in training mode: call eval() before \
         fuse_modules, or use fuse_modules_qat"
    );
    // ... but conv + relu (no folding) fuses in training mode, as in PyTorch,
    assert!(fuse_modules(&mut train, ["layer1.0.bn1", "layer1.0.relu1"], opts()).is_ok());
    // and QAT fusion takes training modules; mixed modes are refused.
    assert!(fuse_modules_qat(&mut train, ["conv1", "bn1", "relu"], opts()).is_ok());
    train.get_mut("bn1").unwrap().set_training(false);
    let e = err_of(fuse_modules_qat(&mut train, ["conv1", "bn1"], opts()));
    assert_eq!(
        e.to_string(),
        "modules `conv1`, `bn1` must all be in the same mode (train or eval) to be fused"
    );

    // Channel mismatch: conv, linear, transposed conv.
    let mut bad = Module::sequential([
        conv(&mut rng, 3, 8, 3, pad1(), false),
        bn2d(&mut rng, 6),
        linear(&mut rng, 4, 5, true),
        bn1d(&mut rng, 3),
        conv_t(
            &mut rng,
            4,
            6,
            3,
            ConvTranspose2dParams {
                groups: 2,
                ..Default::default()
            },
            false,
        ),
        bn2d(&mut rng, 4),
    ]);
    bad.eval();
    let e = err_of(fuse_modules(&mut bad, ["0", "1"], opts()));
    assert!(
        matches!(
            e,
            Error::ChannelMismatch {
                layer_channels: 8,
                bn_channels: 6,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "channel mismatch: `0` (Conv2d) has 8 output channels but BatchNorm has 6"
    );
    let e = err_of(fuse_modules_qat(&mut bad, ["2", "3"], opts()));
    assert_eq!(
        e.to_string(),
        "channel mismatch: `2` (Linear) has 5 output channels but BatchNorm has 3"
    );
    let e = err_of(fuse_modules(&mut bad, ["4", "5"], opts()));
    assert_eq!(
        e.to_string(),
        "channel mismatch: `4` (ConvTranspose2d) has 6 output channels but BatchNorm has 4"
    );

    // A name in two groups, or twice in one.
    let e = err_of(fuse_modules(
        &mut model,
        vec![vec!["conv1", "bn1"], vec!["bn1", "relu"]],
        opts(),
    ));
    assert!(
        matches!(
            e,
            Error::DuplicateFusionName {
                first: 0,
                second: 1,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "module `bn1` appears in fusion groups 0 and 1; a module can be fused only once"
    );
    let e = err_of(fuse_modules(&mut model, ["relu", "relu"], opts()));
    assert!(
        matches!(
            e,
            Error::DuplicateFusionName {
                first: 0,
                second: 0,
                ..
            }
        ),
        "{e}"
    );

    // An empty group.
    let e = err_of(fuse_modules(
        &mut model,
        vec![vec!["conv1", "bn1"], vec![]],
        opts(),
    ));
    assert!(matches!(e, Error::EmptyFusionGroup { index: 1 }), "{e}");
    assert_eq!(e.to_string(), "fusion group 1 is empty");

    // One path inside another.
    let e = err_of(fuse_modules(&mut model, ["layer1", "layer1.0"], opts()));
    assert!(e.to_string().contains("one contains the other"), "{e}");

    // Errors leave an inplace model untouched (all groups are checked first).
    let before = kinds(&model);
    let e = err_of(fuse_modules(
        &mut model,
        vec![vec!["conv1", "bn1", "relu"], vec!["layer1.0.conv1", "nope"]],
        FuseOptions {
            inplace: true,
            ..Default::default()
        },
    ));
    assert!(matches!(e, Error::UnknownModule { .. }));
    assert_eq!(kinds(&model), before);
}

// ------------------------------------------------------------------------- custom fusers

/// Conv2d followed by MaxPool2d, as one caller-defined module.
#[derive(Debug, Clone)]
struct ConvPool {
    conv: Module,
    kernel: usize,
}

impl CustomLayer for ConvPool {
    fn kind_name(&self) -> String {
        "ConvPool2d".into()
    }
    fn forward(
        &mut self,
        backend: &dyn HostOps,
        x: &ArrayD<f32>,
        _training: bool,
    ) -> qfuse::Result<ArrayD<f32>> {
        let y = self.conv.forward(backend, x)?;
        let y4: Array4<f32> = y
            .into_dimensionality()
            .map_err(|e| Error::invalid(e.to_string()))?;
        Ok(backend
            .max_pool2d(&y4, self.kernel, self.kernel)?
            .into_dyn())
    }
    fn clone_box(&self) -> Box<dyn CustomLayer> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

fn custom_fuser_registry() {
    let mut rng = Rng(31);
    let mut model = Module::sequential([
        conv(&mut rng, 3, 4, 3, pad1(), true),
        Module::max_pool2d(2, 2).unwrap(),
        Module::relu(),
        conv(&mut rng, 4, 4, 1, Conv2dParams::default(), false),
        Module::relu(),
    ]);
    model.eval();
    let calls: Log = Arc::default();
    let c = calls.clone();
    let fusers = FuserRegistry::new()
        .with(&["Conv2d", "MaxPool2d"], move |ctx, mods| {
            c.lock()
                .unwrap()
                .push(format!("{} {:?}", ctx.is_qat, ctx.names));
            assert!(mods.iter().all(|m| m.forward_hooks().is_empty()));
            let Layer::MaxPool2d { kernel_size, .. } = mods[1].layer() else {
                return Err(Error::invalid("not a pool"));
            };
            Ok(Module::custom(Box::new(ConvPool {
                conv: mods[0].clone(),
                kernel: *kernel_size,
            })))
        })
        // Replaces the built-in Conv2d + ReLU fuser.
        .with(&["Conv2d", "ReLU"], |_ctx, mods| {
            Ok(Module::container(Container::sequential(mods.to_vec())))
        });
    assert_eq!(fusers.patterns().len(), 2);
    let groups = find_fusable_with(&model, &fusers);
    assert_eq!(groups, vec![vec!["0", "1"], vec!["3", "4"]]);
    // The built-in table alone finds only conv + relu.
    assert_eq!(find_fusable(&model), vec![vec!["3", "4"]]);

    let post = model
        .get_mut("1")
        .unwrap()
        .register_forward_hook(|_, _, y| Some(y * 2.0));
    model
        .get_mut("0")
        .unwrap()
        .register_forward_hook(|_, _, _| None);
    let x = rng.arr(&[2, 3, 8, 8], -1.0, 1.0);
    let want_y = model.clone().forward(&CpuBackend, &x).unwrap();
    let opts = FuseOptions {
        inplace: false,
        additional_fuser_method_mapping: fusers.clone(),
    };
    let mut fused = fuse_modules(&mut model, groups, opts).unwrap().unwrap();
    assert_eq!(
        kinds(&fused),
        ["ConvPool2d", "Identity", "ReLU", "Sequential", "Identity"]
    );
    assert_eq!(
        *calls.lock().unwrap(),
        vec![r#"false ["0", "1"]"#.to_string()]
    );
    // The last module's post-hook moved onto the custom module.
    assert_eq!(fused.get("0").unwrap().forward_hooks(), vec![post]);
    let Layer::Custom(c) = fused.get("0").unwrap().layer() else {
        panic!()
    };
    assert_eq!(c.as_any().downcast_ref::<ConvPool>().unwrap().kernel, 2);
    let got = fused.forward(&CpuBackend, &x).unwrap();
    assert_close("custom fuser", &got, &want_y, 1e-6);
    // is_qat reaches the fuser.
    fuse_modules_qat(
        &mut model,
        ["0", "1"],
        FuseOptions {
            inplace: false,
            additional_fuser_method_mapping: fusers,
        },
    )
    .unwrap();
    assert_eq!(calls.lock().unwrap().last().unwrap(), r#"true ["0", "1"]"#);
    // Its own errors come through.
    let failing =
        FuserRegistry::new().with(&["ReLU", "Conv2d"], |_, _| Err(Error::invalid("nope")));
    let e = err_of(fuse_modules(
        &mut model,
        ["2", "3"],
        FuseOptions {
            inplace: false,
            additional_fuser_method_mapping: failing,
        },
    ));
    assert_eq!(e.to_string(), "invalid argument: nope");
}

fn pattern_table_and_fused_names() {
    let p = default_patterns();
    assert!(p.contains(&vec!["Conv2d", "BatchNorm2d", "ReLU"]));
    assert!(p.contains(&vec!["ConvTranspose2d", "BatchNorm2d", "Hardswish"]));
    assert!(p.contains(&vec!["Linear", "BatchNorm1d", "LeakyReLU"]));
    assert!(p.contains(&vec!["BatchNorm2d", "ReLU6"]));
    assert!(!p.contains(&vec!["Conv1d", "BatchNorm2d"]));
    let conv =
        qfuse::nn::ConvLayer::conv2d(Array4::zeros([2, 1, 1, 1]), None, Conv2dParams::default())
            .unwrap();
    let name = |bn: bool, act| {
        Fused::new(
            FusedHead::Conv2d(conv.clone()),
            bn.then(|| BatchNormLayer::with_features(2)),
            act,
        )
        .unwrap()
        .kind_name()
    };
    assert_eq!(name(false, Activation::Relu), "ConvReLU2d");
    assert_eq!(name(true, Activation::None), "ConvBn2d");
    assert_eq!(name(true, Activation::Relu), "ConvBnReLU2d");
    assert_eq!(
        name(
            true,
            Activation::LeakyRelu {
                negative_slope: 0.1
            }
        ),
        "ConvBnLeakyReLU2d"
    );
    let e = Fused::new(
        FusedHead::Conv2d(conv),
        Some(BatchNormLayer::with_features(3)),
        Activation::None,
    )
    .unwrap_err();
    assert!(matches!(e, Error::ChannelMismatch { .. }), "{e}");
}

// ------------------------------------------------------------------------- backend additions

fn new_activations_gpu_vs_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(41);
    let specials = [
        0.0f32,
        -0.0,
        3.0,
        -3.0,
        2.9999998,
        -3.0000002,
        6.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-30,
        -1e-30,
    ];
    let x = ArrayD::from_shape_fn(IxDyn(&[3, 1001]), |d| {
        if d[1] < specials.len() {
            specials[d[1]]
        } else {
            rng.uniform(-8.0, 8.0)
        }
    });
    let dy = ArrayD::from_shape_fn(IxDyn(&[3, 1001]), |_| rng.uniform(-1.0, 1.0));
    for act in [
        Activation::LeakyRelu {
            negative_slope: 0.01,
        },
        Activation::LeakyRelu {
            negative_slope: -0.5,
        },
        Activation::Hardswish,
    ] {
        // LeakyReLU is bit-exact; Hardswish divides (by 6, by 3), as exact as the device's
        // f32 division.
        let tol = if act == Activation::Hardswish {
            1e-6
        } else {
            0.0
        };
        let want = reference::activation::activation(&x, act);
        let got = gpu.activation(&x, act).unwrap();
        check_bits_or_close(&format!("{act:?}"), &got, &want, tol);
        let want = reference::activation::activation_backward(&x, &dy, act).unwrap();
        let got = gpu.activation_backward(&x, &dy, act).unwrap();
        check_bits_or_close(&format!("{act:?} backward"), &got, &want, tol);
    }
}

fn check_bits_or_close(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>, tol: f32) {
    assert_eq!(got.shape(), want.shape());
    for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
        let ok = g.to_bits() == w.to_bits()
            || (g.is_nan() && w.is_nan())
            || (tol > 0.0 && (g - w).abs() <= tol * (1.0 + w.abs()));
        assert!(ok, "{what}[{i}]: got {g:e}, want {w:e}");
    }
}

fn all_acts() -> [Activation; 5] {
    [
        Activation::None,
        Activation::Relu,
        Activation::Relu6,
        Activation::LeakyRelu {
            negative_slope: 0.1,
        },
        Activation::Hardswish,
    ]
}

fn fused_activation_ops_gpu_vs_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(43);
    let x: Array4<f32> = rng
        .arr(&[2, 6, 7, 7], -2.0, 2.0)
        .into_dimensionality()
        .unwrap();
    let st = bn(&mut rng, 6);
    let p = Conv2dParams {
        padding: [1, 1],
        groups: 2,
        ..Default::default()
    };
    // 16 output channels per group: the implicit GEMM; 1 per group: the direct kernel.
    let w: Array4<f32> = rng
        .arr(&[32, 3, 3, 3], -0.5, 0.5)
        .into_dimensionality()
        .unwrap();
    let b = rng.arr1(32, -1.0, 1.0);
    let wd: Array4<f32> = rng
        .arr(&[6, 1, 3, 3], -0.5, 0.5)
        .into_dimensionality()
        .unwrap();
    let pd = Conv2dParams { groups: 6, ..p };
    let x2: Array2<f32> = rng.arr(&[5, 20], -1.0, 1.0).into_dimensionality().unwrap();
    let wl: Array2<f32> = rng.arr(&[7, 20], -0.5, 0.5).into_dimensionality().unwrap();
    let bl = rng.arr1(7, -0.5, 0.5);
    for act in all_acts() {
        let what = format!("{act:?}");
        let c = CpuBackend.conv2d_act(&x, &w, Some(&b), &p, act).unwrap();
        let g = gpu.conv2d_act(&x, &w, Some(&b), &p, act).unwrap();
        assert_close(
            &format!("conv2d_act gemm {what}"),
            &g.into_dyn(),
            &c.into_dyn(),
            1e-5,
        );
        let c = CpuBackend.conv2d_act(&x, &wd, None, &pd, act).unwrap();
        let g = gpu.conv2d_act(&x, &wd, None, &pd, act).unwrap();
        assert_close(
            &format!("conv2d_act direct {what}"),
            &g.into_dyn(),
            &c.into_dyn(),
            1e-5,
        );
        for training in [false, true] {
            let c = CpuBackend.batch_norm2d_act(&x, &st, training, act).unwrap();
            let g = gpu.batch_norm2d_act(&x, &st, training, act).unwrap();
            assert_close(
                &format!("bn_act {what} {training}"),
                &g.y.into_dyn(),
                &c.y.into_dyn(),
                1e-5,
            );
        }
        let c = CpuBackend.linear_act(&x2, &wl, Some(&bl), act).unwrap();
        let g = gpu.linear_act(&x2, &wl, Some(&bl), act).unwrap();
        assert_close(
            &format!("linear_act {what}"),
            &g.into_dyn(),
            &c.into_dyn(),
            1e-5,
        );
        let c = CpuBackend
            .conv_bn_act_eval(
                &x,
                &qfuse::ops::Conv2d {
                    weight: w.clone(),
                    bias: Some(b.clone()),
                    params: p,
                },
                &bn(&mut Rng(1), 32),
                act,
            )
            .unwrap()
            .0;
        let g = gpu
            .conv_bn_act_eval(
                &x,
                &qfuse::ops::Conv2d {
                    weight: w.clone(),
                    bias: Some(b.clone()),
                    params: p,
                },
                &bn(&mut Rng(1), 32),
                act,
            )
            .unwrap()
            .0;
        assert_close(
            &format!("conv_bn_act_eval {what}"),
            &g.into_dyn(),
            &c.into_dyn(),
            1e-5,
        );
    }
}

fn conv_transpose2d_gpu_vs_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(47);
    let settings = [
        ([2, 4, 5, 6], [4, 3, 3, 3], ConvTranspose2dParams::default()),
        (
            [1, 4, 4, 5],
            [4, 2, 3, 2],
            ConvTranspose2dParams {
                stride: [2, 3],
                padding: [1, 0],
                output_padding: [1, 2],
                dilation: [1, 2],
                groups: 2,
            },
        ),
        (
            [2, 6, 3, 3],
            [6, 1, 3, 3],
            ConvTranspose2dParams {
                stride: [2, 2],
                padding: [1, 1],
                output_padding: [1, 0],
                groups: 6,
                ..Default::default()
            },
        ),
        (
            [1, 2, 4, 3],
            [2, 2, 2, 2],
            ConvTranspose2dParams {
                padding: [0, 1],
                output_padding: [1, 0],
                dilation: [2, 1],
                ..Default::default()
            },
        ),
    ];
    for (i, (xs, ws, p)) in settings.into_iter().enumerate() {
        let x: Array4<f32> = rng.arr(&xs, -1.0, 1.0).into_dimensionality().unwrap();
        let w: Array4<f32> = rng.arr(&ws, -1.0, 1.0).into_dimensionality().unwrap();
        let out = p.output_shape(&xs, &ws).unwrap();
        let b = rng.arr1(out[1], -1.0, 1.0);
        for (bias, act) in [
            (None, Activation::None),
            (Some(&b), Activation::None),
            (Some(&b), Activation::Hardswish),
            (
                None,
                Activation::LeakyRelu {
                    negative_slope: 0.2,
                },
            ),
        ] {
            let c = CpuBackend
                .conv_transpose2d_act(&x, &w, bias, &p, act)
                .unwrap();
            let g = gpu.conv_transpose2d_act(&x, &w, bias, &p, act).unwrap();
            assert_eq!(c.shape(), out);
            assert_close(
                &format!("conv_transpose2d case {i} {act:?}"),
                &g.into_dyn(),
                &c.into_dyn(),
                1e-5,
            );
        }
    }
    // An empty batch.
    let x = Array4::<f32>::zeros([0, 4, 3, 3]);
    let w = Array4::<f32>::zeros([4, 2, 3, 3]);
    let p = ConvTranspose2dParams::default();
    assert_eq!(
        gpu.conv_transpose2d(&x, &w, None, &p).unwrap().shape(),
        CpuBackend
            .conv_transpose2d(&x, &w, None, &p)
            .unwrap()
            .shape()
    );
    // The GPU's errors are the CPU's.
    let x = Array4::<f32>::zeros([1, 4, 3, 3]);
    let w = Array4::<f32>::zeros([4, 2, 3, 3]);
    let bad = ConvTranspose2dParams {
        output_padding: [1, 0],
        ..Default::default()
    };
    assert_eq!(
        gpu.conv_transpose2d(&x, &w, None, &bad)
            .unwrap_err()
            .to_string(),
        CpuBackend
            .conv_transpose2d(&x, &w, None, &bad)
            .unwrap_err()
            .to_string()
    );
    let b3 = Array1::zeros(3);
    let p = ConvTranspose2dParams::default();
    assert_eq!(
        gpu.conv_transpose2d(&x, &w, Some(&b3), &p)
            .unwrap_err()
            .to_string(),
        CpuBackend
            .conv_transpose2d(&x, &w, Some(&b3), &p)
            .unwrap_err()
            .to_string()
    );
}

fn qat_step_with_new_activations_gpu_vs_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(53);
    let x: Array4<f32> = rng
        .arr(&[2, 3, 6, 6], -1.0, 1.0)
        .into_dimensionality()
        .unwrap();
    let conv = qfuse::ops::Conv2d {
        weight: rng
            .arr(&[8, 3, 3, 3], -0.5, 0.5)
            .into_dimensionality()
            .unwrap(),
        bias: Some(rng.arr1(8, -0.2, 0.2)),
        params: pad1(),
    };
    let st = bn(&mut rng, 8);
    let dy: Array4<f32> = rng
        .arr(&[2, 8, 6, 6], -1.0, 1.0)
        .into_dimensionality()
        .unwrap();
    for act in [
        Activation::LeakyRelu {
            negative_slope: 0.1,
        },
        Activation::Hardswish,
    ] {
        let cfg = QatConfig {
            activation: act,
            freeze_bn: false,
            weight_observer: ObserverSpec::new(
                QDtype::QInt8,
                QScheme::PerChannelSymmetric,
                QuantRange::INT8,
                0,
            )
            .unwrap(),
        };
        let c = CpuBackend
            .conv_bn_qat_forward(&x, &conv, &st, &cfg)
            .unwrap();
        let g = gpu.conv_bn_qat_forward(&x, &conv, &st, &cfg).unwrap();
        assert_close(
            &format!("qat fwd {act:?}"),
            &g.y.clone().into_dyn(),
            &c.y.clone().into_dyn(),
            1e-4,
        );
        let cg = CpuBackend
            .conv_bn_qat_backward(&x, &dy, &conv, &st, &cfg, &c)
            .unwrap();
        let gg = gpu
            .conv_bn_qat_backward(&x, &dy, &conv, &st, &cfg, &c)
            .unwrap();
        assert_close(
            &format!("qat dx {act:?}"),
            &gg.dx.into_dyn(),
            &cg.dx.into_dyn(),
            1e-3,
        );
        assert_close(
            &format!("qat dweight {act:?}"),
            &gg.dweight.into_dyn(),
            &cg.dweight.into_dyn(),
            1e-3,
        );
        assert_close(
            &format!("qat dgamma {act:?}"),
            &gg.dbn_weight.into_dyn(),
            &cg.dbn_weight.into_dyn(),
            1e-3,
        );
    }
}

crate::qfuse_tests! {
    eval_fusion_matches_unfused_on_cpu,
    gpu_matches_cpu_fused_and_unfused: gpu,
    qat_fusion_keeps_batch_norm_cpu,
    qat_fusion_keeps_batch_norm_gpu: gpu,
    qat_intrinsic_holds_unfolded_parts,
    hooks_move_to_the_fused_module,
    hooks_replace_values_and_see_paths,
    find_fusable_round_trip_inplace_and_copy,
    groups_as_one_list_or_many,
    tree_paths_train_eval_replace,
    batch_norm_training_updates_running_stats,
    layer_forward_shapes_and_input_errors,
    every_fusion_error,
    custom_fuser_registry,
    pattern_table_and_fused_names,
    new_activations_gpu_vs_cpu: gpu,
    fused_activation_ops_gpu_vs_cpu: gpu,
    conv_transpose2d_gpu_vs_cpu: gpu,
    qat_step_with_new_activations_gpu_vs_cpu: gpu,
}
