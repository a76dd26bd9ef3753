//! The device trainer (`qfuse::train`): its backward against finite differences of its own
//! loss on a small net with every node kind (conv + BatchNorm, conv + ReLU6 with a residual
//! add, max pooling, flatten, linear), one SGD step against the downloaded gradients, the
//! trained net handed back (`to_net`) against the CPU reference in eval mode, and NNI's Mnist
//! network learning the shipped digits.
//!
//! Run with `WGPU_BACKEND=vulkan QFUSE_REQUIRE_GPU=1` (lavapipe); without an adapter each test
//! prints one skip line.

use crate::common;

use std::collections::BTreeMap;

use ndarray::{Array1, Array2, Array4, ArrayD, IxDyn};
use qfuse::data::digits::{Digits, MNIST_MEAN, MNIST_STD};
use qfuse::deploy::Net;
use qfuse::deploy::{convert, convert_with_ranges, DeployConfig};
use qfuse::gpu::{GpuContext, GpuTensor};
use qfuse::kernels::train::upload_labels;
use qfuse::ops::{Activation, BatchNorm, Conv2d, Conv2dParams};
use qfuse::optim::Sgd;
use qfuse::train::{evaluate, fit, FitOptions, GpuTrainer, Progress, QatOptions};

/// SplitMix64.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
    }
    pub(crate) fn arr(&mut self, shape: &[usize], lo: f32, hi: f32) -> ArrayD<f32> {
        ArrayD::from_shape_simple_fn(IxDyn(shape), || self.uniform(lo, hi))
    }
}

pub(crate) type Params = BTreeMap<String, ArrayD<f32>>;

/// Elementwise closeness (no `approx` dependency).
trait Close {
    fn abs_diff_eq(&self, other: &Self, tol: f32) -> bool;
}

impl<D: ndarray::Dimension> Close for ndarray::Array<f32, D> {
    fn abs_diff_eq(&self, other: &Self, tol: f32) -> bool {
        self.shape() == other.shape() && self.iter().zip(other).all(|(a, b)| (a - b).abs() <= tol)
    }
}

pub(crate) fn small_params(seed: u64) -> Params {
    let mut rng = Rng(seed);
    let mut p = Params::new();
    p.insert("c1.weight".into(), rng.arr(&[4, 2, 3, 3], -0.4, 0.4));
    p.insert("c1.bias".into(), rng.arr(&[4], -0.1, 0.1));
    p.insert("c1.bn.weight".into(), rng.arr(&[4], 0.5, 1.5));
    p.insert("c1.bn.bias".into(), rng.arr(&[4], -0.2, 0.2));
    p.insert("c2.weight".into(), rng.arr(&[4, 4, 3, 3], -0.3, 0.3));
    p.insert("c2.bias".into(), rng.arr(&[4], 0.5, 1.0));
    p.insert("fc1.weight".into(), rng.arr(&[6, 36], -0.3, 0.3));
    p.insert("fc1.bias".into(), rng.arr(&[6], 0.2, 0.5));
    p.insert("fc2.weight".into(), rng.arr(&[5, 6], -0.5, 0.5));
    p.insert("fc2.bias".into(), rng.arr(&[5], -0.1, 0.1));
    p
}

fn a1(a: &ArrayD<f32>) -> Array1<f32> {
    a.clone().into_dimensionality().unwrap()
}

/// c1: conv 3×3 (2→4) + BN (no activation, smooth); c2: conv 3×3 pad 1 + ReLU6; add(c1, c2);
/// max pool 2; flatten; fc1 + ReLU; fc2.
pub(crate) fn small_net(p: &Params) -> Net {
    let mut net = Net::new();
    let x = net.input();
    let c1 = net
        .conv(
            "c1",
            Conv2d {
                weight: p["c1.weight"].clone().into_dimensionality().unwrap(),
                bias: Some(a1(&p["c1.bias"])),
                params: Conv2dParams::default(),
            },
            x,
        )
        .unwrap();
    let bn = BatchNorm {
        weight: Some(a1(&p["c1.bn.weight"])),
        bias: Some(a1(&p["c1.bn.bias"])),
        running_mean: Array1::zeros(4),
        running_var: Array1::ones(4),
        eps: 1e-5,
        momentum: 0.1,
    };
    let c1 = net.batch_norm(c1, bn).unwrap();
    let c2 = net
        .conv(
            "c2",
            Conv2d {
                weight: p["c2.weight"].clone().into_dimensionality().unwrap(),
                bias: Some(a1(&p["c2.bias"])),
                params: Conv2dParams {
                    padding: [1, 1],
                    ..Default::default()
                },
            },
            c1,
        )
        .unwrap();
    let c2 = net.activation(c2, Activation::Relu6).unwrap();
    let s = net.add("add", c1, c2).unwrap();
    let s = net.max_pool2d("pool", 2, 2, s).unwrap();
    let f = net.flatten("flat", s).unwrap();
    let h = net
        .linear(
            "fc1",
            p["fc1.weight"].clone().into_dimensionality().unwrap(),
            Some(a1(&p["fc1.bias"])),
            f,
        )
        .unwrap();
    let h = net.activation(h, Activation::Relu).unwrap();
    let out = net
        .linear(
            "fc2",
            p["fc2.weight"].clone().into_dimensionality().unwrap(),
            Some(a1(&p["fc2.bias"])),
            h,
        )
        .unwrap();
    net.set_output(out).unwrap();
    net
}

fn backward_matches_finite_differences() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(11);
    let x = rng.arr(&[6, 2, 8, 8], -1.0, 1.0);
    let labels = [0u32, 1, 2, 3, 4, 1];
    let gx = GpuTensor::upload_f32(&ctx, &x).unwrap();
    let gl = upload_labels(&ctx, &labels, 5).unwrap();
    let params = small_params(5);
    let loss_at = |p: &Params| -> f32 {
        let mut t = GpuTrainer::new(ctx.clone(), &small_net(p), Sgd::new(0.1)).unwrap();
        t.gradients(&gx, &gl).unwrap().0
    };
    let mut t = GpuTrainer::new(ctx.clone(), &small_net(&params), Sgd::new(0.1)).unwrap();
    let (loss, grads) = t.gradients(&gx, &gl).unwrap();
    assert!((loss - loss_at(&params)).abs() < 1e-6);
    let names: Vec<&str> = grads.iter().map(|(n, _)| n.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    let mut want: Vec<&str> = params.keys().map(|k| k.as_str()).collect();
    want.sort_unstable();
    assert_eq!(sorted, want, "one gradient per parameter");
    let eps = 1e-3f32;
    for (name, g) in &grads {
        assert_eq!(g.shape(), params[name].shape(), "{name}");
        // The three largest gradient entries of each tensor (clearly above f32 noise).
        let mut idx: Vec<usize> = (0..g.len()).collect();
        let flat: Vec<f32> = g.iter().copied().collect();
        idx.sort_by(|&a, &b| flat[b].abs().total_cmp(&flat[a].abs()));
        for &i in idx.iter().take(3) {
            let mut plus = params.clone();
            let mut minus = params.clone();
            plus.get_mut(name).unwrap().as_slice_mut().unwrap()[i] += eps;
            minus.get_mut(name).unwrap().as_slice_mut().unwrap()[i] -= eps;
            let fd = (loss_at(&plus) - loss_at(&minus)) / (2.0 * eps);
            let an = flat[i];
            assert!(
                (fd - an).abs() <= 2e-3 + 0.05 * an.abs(),
                "{name}[{i}]: backward {an:e}, finite difference {fd:e}"
            );
        }
    }
}

fn sgd_step_applies_the_gradients_and_to_net_round_trips() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(12);
    let x = rng.arr(&[6, 2, 8, 8], -1.0, 1.0);
    let labels = [4u32, 3, 2, 1, 0, 0];
    let gx = GpuTensor::upload_f32(&ctx, &x).unwrap();
    let gl = upload_labels(&ctx, &labels, 5).unwrap();
    let params = small_params(6);
    let lr = 0.25;
    let mut probe = GpuTrainer::new(ctx.clone(), &small_net(&params), Sgd::new(lr)).unwrap();
    let (_, grads) = probe.gradients(&gx, &gl).unwrap();
    let mut t = GpuTrainer::new(ctx.clone(), &small_net(&params), Sgd::new(lr)).unwrap();
    t.step(&gx, &gl).unwrap();
    let after = t.to_net().unwrap();
    // The expected net: every parameter moved by -lr * grad.
    let mut moved = params.clone();
    for (name, g) in &grads {
        let p = moved.get_mut(name).unwrap();
        p.zip_mut_with(g, |a, &b| *a = b.mul_add(-lr, *a));
    }
    let expect = small_net(&moved);
    for (a, b) in after.nodes().iter().zip(expect.nodes()) {
        assert_eq!(a.name, b.name);
        assert_eq!(a.inputs, b.inputs);
        match (&a.op, &b.op) {
            (
                qfuse::deploy::NodeOp::Conv {
                    conv: ca,
                    bn: ba,
                    act: aa,
                },
                qfuse::deploy::NodeOp::Conv {
                    conv: cb,
                    bn: bb,
                    act: ab,
                },
            ) => {
                assert_eq!(aa, ab);
                assert!(ca.weight.abs_diff_eq(&cb.weight, 1e-6), "{}", a.name);
                assert!(ca
                    .bias
                    .as_ref()
                    .unwrap()
                    .abs_diff_eq(cb.bias.as_ref().unwrap(), 1e-6));
                if let (Some(x), Some(y)) = (ba, bb) {
                    assert!(x
                        .weight
                        .as_ref()
                        .unwrap()
                        .abs_diff_eq(y.weight.as_ref().unwrap(), 1e-6));
                    assert!(x
                        .bias
                        .as_ref()
                        .unwrap()
                        .abs_diff_eq(y.bias.as_ref().unwrap(), 1e-6));
                    // The running statistics moved (one training forward, momentum 0.1).
                    assert!(x.running_mean.iter().any(|&m| m != 0.0));
                } else {
                    assert_eq!(ba.is_some(), bb.is_some());
                }
            }
            (
                qfuse::deploy::NodeOp::Linear {
                    weight: wa,
                    bias: ba,
                    act: aa,
                },
                qfuse::deploy::NodeOp::Linear {
                    weight: wb,
                    bias: bb,
                    act: ab,
                },
            ) => {
                assert_eq!(aa, ab);
                assert!(wa.abs_diff_eq(wb, 1e-6), "{}", a.name);
                assert!(ba.as_ref().unwrap().abs_diff_eq(bb.as_ref().unwrap(), 1e-6));
            }
            (oa, ob) => assert_eq!(oa, ob),
        }
    }
    // Eval forward of the trained net: the trainer on the GPU against the CPU reference.
    let logits = t.forward_eval(&gx).unwrap().download_f32(&ctx).unwrap();
    let cpu = after.forward_values(&qfuse::CpuBackend, &x, false).unwrap();
    let cpu_out = &cpu[after.output()];
    assert!(
        logits.abs_diff_eq(cpu_out, 1e-4),
        "GPU {logits:?} vs CPU {cpu_out:?}"
    );
    assert_eq!(t.steps(), 1);
    // A step is one submission and moves no tensor data (batch and labels already uploaded,
    // the loss left on the device); so is an eval forward. On a context of its own: other
    // tests share the test context and its counters.
    let own = std::sync::Arc::new(GpuContext::new().unwrap());
    let mut t2 = GpuTrainer::new(own.clone(), &after, Sgd::new(lr)).unwrap();
    let (ox, ol) = (
        GpuTensor::upload_f32(&own, &x).unwrap(),
        upload_labels(&own, &labels, 5).unwrap(),
    );
    t2.step(&ox, &ol).unwrap();
    let (transfers, submissions) = (own.transfer_stats(), own.pool_stats().submissions);
    let loss = t2.step(&ox, &ol).unwrap();
    let eval = t2.forward_eval(&ox).unwrap();
    assert_eq!(own.pool_stats().submissions - submissions, 2);
    let moved = own.transfer_stats().since(&transfers);
    assert_eq!(moved.transfers(), 0, "{moved:?}");
    assert!(loss.download_f32(&own).unwrap()[[0]].is_finite());
    assert_eq!(eval.shape(), [6, 5]);
    // Refusals.
    assert!(t
        .set_sgd(Sgd {
            momentum: 0.9,
            ..Sgd::new(0.1)
        })
        .is_err());
    assert!(GpuTrainer::new(ctx.clone(), &Net::new(), Sgd::new(0.1)).is_err());
    assert!(GpuTrainer::new(ctx.clone(), &small_net(&params), Sgd::new(-1.0)).is_err());
    let wrong = upload_labels(&ctx, &[0, 1], 5).unwrap();
    assert!(t.step(&gx, &wrong).is_err());
}

fn mnist_learns_the_digits() {
    let Some(ctx) = common::gpu() else { return };
    let mut digits = Digits::bundled().unwrap();
    digits.normalize(MNIST_MEAN, MNIST_STD).unwrap();
    let model = qfuse::model::mnist::mnist(0).unwrap();
    let net = qfuse::model::mnist::deploy_net(&model).unwrap();
    let sgd = Sgd {
        lr: 0.05,
        momentum: 0.9,
        ..Sgd::new(0.05)
    };
    let mut trainer = GpuTrainer::new(ctx.clone(), &net, sgd).unwrap();
    // 640 training images (10 steps of 64) keep the test short on lavapipe; the shipped
    // training split is used in full by `qfuse demo`.
    let train = qfuse::data::digits::Split {
        images: digits
            .train
            .images
            .slice(ndarray::s![0..640, .., .., ..])
            .to_owned(),
        labels: digits.train.labels[..640].to_vec(),
    };
    let before = evaluate(&mut trainer, &digits.test, 120).unwrap();
    let mut steps = 0;
    let mut epochs = Vec::new();
    let report = fit(
        &mut trainer,
        &train,
        Some(&digits.test),
        &FitOptions {
            epochs: 1,
            batch_size: 64,
            seed: 0,
        },
        &mut |p| match p {
            Progress::Step { loss, .. } => {
                assert!(loss.is_finite());
                steps += 1;
            }
            Progress::Epoch { test_accuracy, .. } => epochs.push(*test_accuracy),
        },
    )
    .unwrap();
    assert_eq!(steps, 10);
    assert_eq!(report.steps, steps as u64);
    assert_eq!(epochs.len(), 1);
    let after = report.test_accuracy[0];
    println!(
        "Mnist on digits: test accuracy {before:.3} before, {after:.3} after 10 steps; loss {:?}",
        report.epoch_losses
    );
    assert!(after > 0.4 && after > before + 0.25, "{before} -> {after}");
    // The trained net evaluates the same on the CPU reference.
    let trained = trainer.to_net().unwrap();
    let x: Array4<f32> = digits
        .test
        .images
        .slice(ndarray::s![0..40, .., .., ..])
        .to_owned();
    let cpu = trained
        .forward_values(&qfuse::CpuBackend, &x.clone().into_dyn(), false)
        .unwrap();
    let gpu = trainer
        .forward_eval(&GpuTensor::upload_f32(&ctx, &x.into_dyn()).unwrap())
        .unwrap()
        .download_f32(&ctx)
        .unwrap();
    let cpu_out: Array2<f32> = cpu[trained.output()].clone().into_dimensionality().unwrap();
    assert!(gpu.abs_diff_eq(&cpu_out.into_dyn(), 1e-3));
}

/// QAT on the small net (conv + BN as ConvBn2d QAT, conv + ReLU6, residual add, pool,
/// linears): every parameter gets a finite gradient, steps lower the loss, observers fill, and
/// the QAT model in eval mode computes what the integer model deployed from its observers
/// simulates (`convert_with_ranges` + `IntModel::simulate`), within rounding of the
/// BN-scaled against the folded weight.
fn qat_trains_and_simulates_the_deployed_model() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(21);
    let x = rng.arr(&[6, 2, 8, 8], -1.0, 1.0);
    let labels = [0u32, 1, 2, 3, 4, 1];
    let gx = GpuTensor::upload_f32(&ctx, &x).unwrap();
    let gl = upload_labels(&ctx, &labels, 5).unwrap();
    let params = small_params(5);
    let net = small_net(&params);
    let cfg = DeployConfig::default();
    let sgd = Sgd {
        lr: 0.05,
        momentum: 0.9,
        ..Sgd::new(0.05)
    };
    let mut t = GpuTrainer::new(ctx.clone(), &net, sgd).unwrap();
    assert!(!t.qat_enabled());
    assert!(t.freeze_observers(true).is_err(), "QAT is off");
    assert!(t.activation_ranges().is_err(), "QAT is off");
    t.enable_qat(QatOptions::for_deployment(&cfg)).unwrap();
    assert!(t.qat_enabled());
    assert!(t.enable_qat(QatOptions::default()).is_err(), "twice");
    let e = t.forward_eval(&gx).unwrap_err().to_string();
    assert!(e.contains("observers have seen no batch"), "{e}");
    assert!(t.activation_ranges().is_err(), "nothing observed yet");

    let (loss0, grads) = t.gradients(&gx, &gl).unwrap();
    let mut names: Vec<&str> = grads.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    let mut want: Vec<&str> = params.keys().map(|k| k.as_str()).collect();
    want.sort_unstable();
    assert_eq!(names, want, "one gradient per parameter");
    for (name, g) in &grads {
        assert_eq!(g.shape(), params[name].shape(), "{name}");
        assert!(g.iter().all(|v| v.is_finite()), "{name}");
        assert!(g.iter().any(|v| *v != 0.0), "{name}: all zero");
    }
    let mut last = loss0;
    for _ in 0..8 {
        last = t.step(&gx, &gl).unwrap().download_f32(&ctx).unwrap()[[0]];
    }
    assert!(last < loss0, "QAT steps: loss {loss0} -> {last}");

    // Observers: input and conv / linear / add outputs, nothing else.
    let ranges = t.activation_ranges().unwrap();
    assert_eq!(ranges.len(), net.value_count());
    for (v, r) in ranges.iter().enumerate() {
        let observed = v == 0 || net.nodes()[v - 1].op.requantizes();
        assert_eq!(r.is_some(), observed, "value {v}");
        if let Some((lo, hi)) = r {
            assert!(
                lo <= hi && lo.is_finite() && hi.is_finite(),
                "value {v}: {lo}..{hi}"
            );
        }
    }
    // Frozen observers do not move.
    t.freeze_observers(true).unwrap();
    t.freeze_bn_stats(true).unwrap();
    t.step(&gx, &gl).unwrap();
    assert_eq!(t.activation_ranges().unwrap(), ranges);

    let trained = t.to_net().unwrap();
    let int = convert_with_ranges(&trained, &qfuse::CpuBackend, &ranges, &cfg).unwrap();
    let sim = int.simulate(&qfuse::CpuBackend, &x).unwrap();
    let qat = t.forward_eval(&gx).unwrap().download_f32(&ctx).unwrap();
    let step = int.output_qparams().scale[0];
    let close = sim
        .iter()
        .zip(&qat)
        .filter(|(a, b)| (*a - *b).abs() <= 1.01 * step)
        .count();
    assert_eq!(sim.shape(), qat.shape());
    assert!(
        close as f64 >= 0.95 * sim.len() as f64,
        "QAT eval vs deployed simulation: {close}/{} within one output step ({step})",
        sim.len()
    );
}

/// `convert` is `convert_with_ranges` of the calibrated ranges; bad ranges are refused.
fn convert_with_ranges_checks_and_matches_convert() {
    let params = small_params(8);
    let net = small_net(&params);
    let mut rng = Rng(3);
    let calib = [
        rng.arr(&[4, 2, 8, 8], -1.0, 1.0),
        rng.arr(&[4, 2, 8, 8], -1.0, 1.0),
    ];
    let cfg = DeployConfig::default();
    let b = qfuse::CpuBackend;
    let int = convert(&net, &b, calib.iter(), &cfg).unwrap();
    let mut ranges = vec![(f32::INFINITY, f32::NEG_INFINITY); net.value_count()];
    for x in &calib {
        for (r, v) in ranges
            .iter_mut()
            .zip(net.forward_values(&b, x, true).unwrap())
        {
            let lo = v.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            *r = (r.0.min(lo), r.1.max(hi));
        }
    }
    let given: Vec<Option<(f32, f32)>> = ranges.iter().map(|&r| Some(r)).collect();
    assert_eq!(convert_with_ranges(&net, &b, &given, &cfg).unwrap(), int);
    // Only the input and requantizing outputs are read.
    let sparse: Vec<Option<(f32, f32)>> = given
        .iter()
        .enumerate()
        .map(|(v, r)| (v == 0 || net.nodes()[v - 1].op.requantizes()).then_some(r.unwrap()))
        .collect();
    assert_eq!(convert_with_ranges(&net, &b, &sparse, &cfg).unwrap(), int);
    let e = convert_with_ranges(&net, &b, &given[1..], &cfg).unwrap_err();
    assert!(
        e.to_string().contains("activation ranges for a net of"),
        "{e}"
    );
    let mut missing = given.clone();
    missing[0] = None;
    let e = convert_with_ranges(&net, &b, &missing, &cfg).unwrap_err();
    assert!(
        e.to_string().contains("no activation range for the input"),
        "{e}"
    );
    let mut reversed = given.clone();
    reversed[1] = Some((1.0, -1.0));
    let e = convert_with_ranges(&net, &b, &reversed, &cfg).unwrap_err();
    assert!(e.to_string().contains("reversed"), "{e}");
    let mut nan = given;
    nan[1] = Some((f32::NAN, 1.0));
    assert!(convert_with_ranges(&net, &b, &nan, &cfg).is_err());
}

crate::qfuse_tests! {
    qat_trains_and_simulates_the_deployed_model: gpu,
    convert_with_ranges_checks_and_matches_convert,
    backward_matches_finite_differences: gpu,
    sgd_step_applies_the_gradients_and_to_net_round_trips: gpu,
    mnist_learns_the_digits: gpu,
}
