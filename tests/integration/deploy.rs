//! Integer deployment: conversion, the integer model against its fused and unfused
//! simulations, CPU against GPU, safetensors round trip, and every kind of bad input.

use crate::common;

use ndarray::{Array1, Array2, Array4, ArrayD};
use qfuse::deploy::{self, DeployConfig, IntLayer, IntModel, Net};
use qfuse::fuse::{fuse_modules, FuseOptions};
use qfuse::model::{mnist, resnet};
use qfuse::ops::{Activation, BatchNorm, Conv2d, Conv2dParams};
use qfuse::quant::{QScheme, QuantRange, RequantMode};
use qfuse::{CpuBackend, Error, GpuBackend, HostOps};

fn mnist_setup() -> (Net, IntModel, DeployConfig) {
    let mut m = mnist::mnist(0).unwrap();
    m.eval();
    let calib = mnist::synthetic_batch(32, 1);
    mnist::set_trained_bn_stats(&mut m, &calib, 3).unwrap();
    let net = mnist::deploy_net(&m).unwrap();
    let cfg = DeployConfig::default();
    let model = deploy::convert(&net, &CpuBackend, [&calib.into_dyn()], &cfg).unwrap();
    (net, model, cfg)
}

fn block_setup(cfg: &DeployConfig) -> (Net, IntModel) {
    let net = resnet::basic_block(8, 0).unwrap();
    let calib = resnet::synthetic_input(4, 8, 10, 1).into_dyn();
    let model = deploy::convert(&net, &CpuBackend, [&calib], cfg).unwrap();
    (net, model)
}

fn mnist_converts_to_int8_with_folded_bn_and_relu6_clamps() {
    let (net, model, _) = mnist_setup();
    assert_eq!(net.nodes().len(), 7);
    let kinds: Vec<&str> = model.nodes.iter().map(|n| n.layer.kind()).collect();
    assert_eq!(
        kinds,
        [
            "conv2d",
            "max_pool2d",
            "conv2d",
            "max_pool2d",
            "flatten",
            "linear",
            "linear"
        ]
    );
    let IntLayer::Conv {
        weight,
        weight_scale,
        bias,
        requant,
        act,
        ..
    } = &model.nodes[0].layer
    else {
        panic!("conv1 is not a conv");
    };
    assert_eq!(weight.shape(), &[20, 1, 5, 5]);
    assert_eq!(weight_scale.len(), 20, "per-channel weight scales");
    assert!(bias.is_some(), "folded BN gives a bias");
    assert_eq!(*act, Activation::Relu6);
    assert_eq!(requant.clamp_min, model.values[1].zero_point[0]);
    // Every weight channel uses the full symmetric range on its largest magnitude.
    for o in 0..20 {
        let m = weight
            .index_axis(ndarray::Axis(0), o)
            .iter()
            .map(|&v| (v as i32).abs())
            .max()
            .unwrap();
        assert!(m >= 127, "channel {o} max code {m}");
    }
}

fn deploying_the_fused_model_gives_the_same_integer_model() {
    let mut m = mnist::mnist(0).unwrap();
    m.eval();
    let calib = mnist::synthetic_batch(16, 1);
    mnist::set_trained_bn_stats(&mut m, &calib, 3).unwrap();
    let cfg = DeployConfig::default();
    let unfused = deploy::convert(
        &mnist::deploy_net(&m).unwrap(),
        &CpuBackend,
        [&calib.clone().into_dyn()],
        &cfg,
    )
    .unwrap();
    let groups: [&[&str]; 3] = [
        &["conv1", "batchnorm1", "relu1"],
        &["conv2", "relu2"],
        &["fc1", "relu3"],
    ];
    fuse_modules(&mut m, groups, FuseOptions::default()).unwrap();
    let fused = deploy::convert(
        &mnist::deploy_net(&m).unwrap(),
        &CpuBackend,
        [&calib.into_dyn()],
        &cfg,
    )
    .unwrap();
    assert_eq!(fused, unfused);
}

fn mnist_gap_fused_is_small_and_unfused_larger() {
    let (net, model, cfg) = mnist_setup();
    let x = mnist::synthetic_batch(64, 2).into_dyn();
    let g = deploy::measure_gap(&net, &model, &cfg, &CpuBackend, &x).unwrap();
    assert_eq!(g.fused.outputs, 640);
    assert!(g.fused.max_step_diff <= 1, "{g:?}");
    assert!(g.fused.identical_fraction() >= 0.99, "{g:?}");
    assert!(g.unfused.identical < g.fused.identical, "{g:?}");
    assert_eq!(g.layers.len(), 4);
    for l in &g.layers {
        assert!(l.fused.max_step_diff <= 1, "{l:?}");
        // Fed the same inputs, each fused layer differs only by rounding.
        assert!(l.fused_isolated.identical_fraction() >= 0.999, "{l:?}");
        assert!(l.fused_isolated.max_step_diff <= 1, "{l:?}");
    }
    // The first layer sees identical inputs either way.
    assert_eq!(g.layers[0].fused, g.layers[0].fused_isolated);
}

fn resnet_block_gap_meets_the_target_with_fusion() {
    let cfg = DeployConfig::default();
    let (net, model) = block_setup(&cfg);
    let x = resnet::synthetic_input(8, 8, 10, 2).into_dyn();
    let g = deploy::measure_gap(&net, &model, &cfg, &CpuBackend, &x).unwrap();
    assert!(g.fused.identical_fraction() >= 0.999, "{g:?}");
    assert!(g.fused.max_step_diff <= 1, "{g:?}");
    assert!(g.unfused.identical <= g.fused.identical, "{g:?}");
    // Per-tensor weights make folding matter much more: BN rescales channels differently.
    let mut pt = cfg.clone();
    pt.weight.qscheme = QScheme::PerTensorSymmetric;
    let (net, model) = block_setup(&pt);
    let g = deploy::measure_gap(&net, &model, &pt, &CpuBackend, &x).unwrap();
    assert!(g.fused.identical_fraction() >= 0.999, "{g:?}");
    assert!(g.unfused.identical_fraction() < 0.99, "{g:?}");
}

fn fixed_point_requantization_also_runs_and_stays_within_a_step_per_layer() {
    let cfg = DeployConfig {
        requant: RequantMode::FixedPoint,
        ..DeployConfig::default()
    };
    let (net, model) = block_setup(&cfg);
    let x = resnet::synthetic_input(4, 8, 10, 2).into_dyn();
    let g = deploy::measure_gap(&net, &model, &cfg, &CpuBackend, &x).unwrap();
    assert!(g.layers[0].fused.max_step_diff <= 1, "{g:?}");
    assert!(g.layers[0].fused.identical_fraction() >= 0.99, "{g:?}");
}

fn the_integer_model_round_trips_through_safetensors() {
    let (_, model, _) = mnist_setup();
    let dir = std::env::temp_dir().join(format!("qfuse-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mnist_int8.safetensors");
    model.save(&path).unwrap();
    let back = IntModel::load(&path).unwrap();
    assert_eq!(back, model);
    let x = mnist::synthetic_batch(8, 5).into_dyn();
    assert_eq!(
        back.forward(&CpuBackend, &x).unwrap(),
        model.forward(&CpuBackend, &x).unwrap()
    );
    // The file holds int8 weights and int32 biases.
    let sd = qfuse::io::load_state_dict(&path).unwrap();
    assert_eq!(
        sd.raw["conv1.weight"].dtype(),
        qfuse::io::state_dict::Dtype::I8
    );
    assert!(sd.i32("conv1.bias").is_ok());
    // A state dict that is not an integer model, and damaged ones, are typed errors.
    let mut plain = sd.clone();
    plain.metadata.clear();
    let e = IntModel::from_state_dict(&plain, "x").unwrap_err();
    assert!(matches!(e, Error::MalformedStateDict { .. }), "{e}");
    let mut missing = sd.clone();
    missing.tensors.remove("fc1.multiplier");
    assert!(IntModel::from_state_dict(&missing, "x").is_err());
    let mut wrong = sd.clone();
    let g = wrong.metadata["qfuse.int_model"].replace("\"conv2d\"", "\"conv3d\"");
    wrong.metadata.insert("qfuse.int_model".into(), g);
    let e = IntModel::from_state_dict(&wrong, "x").unwrap_err();
    assert!(e.to_string().contains("conv3d"), "{e}");
    assert!(IntModel::from_bytes(b"not a safetensors file", "junk").is_err());
    std::fs::remove_dir_all(&dir).ok();
}

fn bad_inputs_are_typed_errors() {
    let (net, model, cfg) = mnist_setup();
    // No calibration data.
    let none: [&ArrayD<f32>; 0] = [];
    let e = deploy::convert(&net, &CpuBackend, none, &cfg).unwrap_err();
    assert!(e.to_string().contains("calibration"), "{e}");
    // Ranges that do not fit int8 codes, affine weights, per-channel activations.
    let mut c = cfg.clone();
    c.activation.range = QuantRange::new(0, 255).unwrap();
    assert!(c.validate().is_err());
    let mut c = cfg.clone();
    c.weight.qscheme = QScheme::PerChannelAffine;
    assert!(c.validate().is_err());
    let mut c = cfg.clone();
    c.activation.qscheme = QScheme::PerChannelAffine;
    assert!(c.validate().is_err());
    // NaN input, empty input, wrong shape.
    let mut x = mnist::synthetic_batch(2, 1).into_dyn();
    x[[0, 0, 3, 3]] = f32::NAN;
    let e = model.forward(&CpuBackend, &x).unwrap_err();
    assert!(e.to_string().contains("NaN"), "{e}");
    let empty = ArrayD::<f32>::zeros(ndarray::IxDyn(&[0, 1, 28, 28]));
    assert!(model.forward(&CpuBackend, &empty).is_err());
    let wrong = ArrayD::<f32>::zeros(ndarray::IxDyn(&[2, 3, 28, 28]));
    assert!(model.forward(&CpuBackend, &wrong).is_err());
    // A corrupted model fails validation before it runs.
    let mut broken = model.clone();
    broken.values.pop();
    assert!(broken
        .forward(&CpuBackend, &mnist::synthetic_batch(1, 1).into_dyn())
        .is_err());
}

fn net_builder_rejects_what_integer_kernels_cannot_run() {
    let conv = || Conv2d {
        weight: Array4::from_elem((2, 1, 3, 3), 0.1),
        bias: None,
        params: Conv2dParams::default(),
    };
    let bn = BatchNorm {
        weight: None,
        bias: None,
        running_mean: Array1::zeros(2),
        running_var: Array1::ones(2),
        eps: 1e-5,
        momentum: 0.1,
    };
    let mut net = Net::new();
    let x = net.input();
    // BN / activation on the input, unknown values, duplicate names.
    assert!(net.batch_norm(x, bn.clone()).is_err());
    assert!(net.activation(x, Activation::Relu).is_err());
    assert!(net.conv("c", conv(), 5).is_err());
    let c = net.conv("c", conv(), x).unwrap();
    assert!(net.conv("c", conv(), c).is_err());
    // BN after an activation, two activations, BN of the wrong width, BN after linear.
    net.activation(c, Activation::Relu).unwrap();
    assert!(net.batch_norm(c, bn.clone()).is_err());
    assert!(net.activation(c, Activation::Relu6).is_err());
    let c2 = net.conv("c2", conv(), x).unwrap();
    let mut wide = bn.clone();
    wide.running_mean = Array1::zeros(3);
    wide.running_var = Array1::ones(3);
    wide.weight = None;
    assert!(net.batch_norm(c2, wide).is_err());
    let f = net.flatten("f", c2).unwrap();
    let l = net
        .linear("l", Array2::from_elem((4, 2 * 6 * 6), 0.01), None, f)
        .unwrap();
    assert!(net.batch_norm(l, bn).is_err());
    assert!(net
        .linear("bad", Array2::zeros((4, 3)), Some(Array1::zeros(5)), f)
        .is_err());
    assert!(net.set_output(99).is_err());
    // Activations without an integer form fail at conversion, naming the node.
    net.activation(l, Activation::Hardswish).unwrap();
    let xin = Array4::from_elem((1, 1, 8, 8), 0.5).into_dyn();
    let e = deploy::convert(&net, &CpuBackend, [&xin], &DeployConfig::default()).unwrap_err();
    assert!(e.to_string().contains("`l`"), "{e}");
    // Modules with no integer form.
    let mut net = Net::new();
    let e = net
        .layer(
            "lrelu",
            &qfuse::nn::Layer::LeakyReLU {
                negative_slope: 0.1,
            },
            0,
        )
        .unwrap_err();
    assert!(e.to_string().contains("no integer form"), "{e}");
}

fn gpu_integer_model_matches_the_cpu_bit_for_bit() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = GpuBackend::new(ctx);
    for mode in [RequantMode::Float, RequantMode::FixedPoint] {
        let cfg = DeployConfig {
            requant: mode,
            ..DeployConfig::default()
        };
        let (_, model) = block_setup(&cfg);
        let x = resnet::synthetic_input(3, 8, 10, 9).into_dyn();
        assert_eq!(
            model.forward(&gpu, &x).unwrap(),
            model.forward(&CpuBackend, &x).unwrap(),
            "{mode:?}"
        );
    }
    let (net, model, cfg) = mnist_setup();
    let x = mnist::synthetic_batch(16, 4).into_dyn();
    assert_eq!(
        model.forward(&gpu, &x).unwrap(),
        model.forward(&CpuBackend, &x).unwrap()
    );
    let g = deploy::measure_gap(&net, &model, &cfg, &gpu, &x).unwrap();
    assert!(g.fused.max_step_diff <= 1, "{g:?}");
    let _ = gpu.name();
}

fn device_calibration_on_the_cpu_gives_the_host_integer_model() {
    // Mnist (BN folded, ReLU6, max pooling, flatten, linear) and a ResNet basic block
    // (residual add), two batches: the same ranges, so the same integer model.
    let mut m = mnist::mnist(0).unwrap();
    m.eval();
    let calib = mnist::synthetic_batch(8, 1);
    mnist::set_trained_bn_stats(&mut m, &calib, 3).unwrap();
    let calib = calib.into_dyn();
    let net = mnist::deploy_net(&m).unwrap();
    let calib2 = mnist::synthetic_batch(4, 2).into_dyn();
    let cfg = DeployConfig::default();
    let host = deploy::convert(&net, &CpuBackend, [&calib, &calib2], &cfg).unwrap();
    let dev = deploy::convert_on(&net, &CpuBackend, [&calib, &calib2], &cfg).unwrap();
    assert_eq!(dev, host);
    let ranges = deploy::calibrate_ranges(&net, &CpuBackend, [&calib], &cfg.activation).unwrap();
    assert_eq!(ranges.len(), net.value_count());
    for (i, r) in ranges.iter().enumerate() {
        let observed = i == 0 || net.nodes()[i - 1].op.requantizes();
        assert_eq!(r.is_some(), observed, "value {i}");
    }
    let block = resnet::basic_block(8, 0).unwrap();
    let xb = resnet::synthetic_input(2, 8, 6, 1).into_dyn();
    let xb2 = resnet::synthetic_input(1, 8, 6, 5).into_dyn();
    for mode in [RequantMode::Float, RequantMode::FixedPoint] {
        let cfg = DeployConfig {
            requant: mode,
            ..DeployConfig::default()
        };
        assert_eq!(
            deploy::convert_on(&block, &CpuBackend, [&xb, &xb2], &cfg).unwrap(),
            deploy::convert(&block, &CpuBackend, [&xb, &xb2], &cfg).unwrap(),
            "{mode:?}"
        );
    }
    // Refused alike: no batch, a wrong input rank, a per-channel activation spec.
    let none: [&ArrayD<f32>; 0] = [];
    let e = deploy::convert_on(&net, &CpuBackend, none, &cfg).unwrap_err();
    assert!(e.to_string().contains("calibration batch"), "{e}");
    let flat = ArrayD::<f32>::zeros(ndarray::IxDyn(&[2, 784]));
    let eh = deploy::convert(&net, &CpuBackend, [&flat], &cfg).unwrap_err();
    let ed = deploy::convert_on(&net, &CpuBackend, [&flat], &cfg).unwrap_err();
    assert_eq!(ed.to_string(), eh.to_string());
    let mut per_channel = cfg.activation;
    per_channel.qscheme = QScheme::PerChannelAffine;
    assert!(deploy::calibrate_ranges(&net, &CpuBackend, [&calib], &per_channel).is_err());
    let bad = DeployConfig {
        activation: per_channel,
        ..DeployConfig::default()
    };
    assert!(deploy::convert_on(&net, &CpuBackend, [&calib], &bad).is_err());
}

/// A small net whose float values are exact in f32 (weights and inputs multiples of 1/4,
/// few terms), so CPU and GPU observe identical values: conv + ReLU, a residual add,
/// max pooling, flatten, linear.
fn exact_net() -> (Net, Vec<ArrayD<f32>>) {
    let q = |i: usize, m: usize| ((i * 7 + 3) % m) as f32 / 4.0 - 1.0;
    let mut net = Net::new();
    let x = net.input();
    let conv = |o: usize, c: usize, seed: usize| Conv2d {
        weight: Array4::from_shape_fn((o, c, 3, 3), |(a, b, h, w)| {
            q(a * 31 + b * 11 + h * 3 + w + seed, 9)
        }),
        bias: Some(Array1::from_shape_fn(o, |i| q(i + seed, 5))),
        params: Conv2dParams {
            padding: [1, 1],
            ..Default::default()
        },
    };
    let c1 = net.conv("c1", conv(3, 2, 0), x).unwrap();
    net.activation(c1, Activation::Relu).unwrap();
    let c2 = net.conv("c2", conv(3, 3, 5), c1).unwrap();
    let a = net.add("add", c1, c2).unwrap();
    net.activation(a, Activation::Relu6).unwrap();
    let p = net.max_pool2d("pool", 2, 2, a).unwrap();
    let f = net.flatten("flat", p).unwrap();
    let l = net
        .linear(
            "fc",
            Array2::from_shape_fn((4, 12), |(i, j)| q(i * 12 + j, 7)),
            Some(Array1::from_shape_fn(4, |i| q(i, 3))),
            f,
        )
        .unwrap();
    net.set_output(l).unwrap();
    let batch = |n: usize, seed: usize| {
        ArrayD::from_shape_fn(ndarray::IxDyn(&[n, 2, 4, 4]), |d| {
            q(d[0] * 97 + d[1] * 31 + d[2] * 5 + d[3] + seed, 8)
        })
    };
    (net, vec![batch(2, 0), batch(1, 13)])
}

fn gpu_calibration_gives_the_cpu_integer_model() {
    if common::gpu().is_none() {
        return;
    }
    // A context of its own: the shared one counts the transfers of tests running alongside.
    let ctx = std::sync::Arc::new(qfuse::gpu::GpuContext::new().unwrap());
    let gpu = GpuBackend::new(ctx.clone());
    let (net, batches) = exact_net();
    for mode in [RequantMode::Float, RequantMode::FixedPoint] {
        let cfg = DeployConfig {
            requant: mode,
            ..DeployConfig::default()
        };
        let before = ctx.transfer_stats();
        let on_gpu = deploy::convert_on(&net, &gpu, &batches, &cfg).unwrap();
        let t = ctx.transfer_stats().since(&before);
        // 3 weights + 3 biases once, one upload per batch; one download per observed value
        // (the input, c1, c2, add, fc).
        assert_eq!((t.uploads, t.downloads), (6 + 2, 5), "{t:?}");
        assert_eq!(
            on_gpu,
            deploy::convert(&net, &CpuBackend, &batches, &cfg).unwrap()
        );
        assert_eq!(
            on_gpu,
            deploy::convert_on(&net, &CpuBackend, &batches, &cfg).unwrap()
        );
    }
    // Mnist (BN folded): the ranges agree to f32 rounding, and the model is the one
    // `convert_with_ranges` builds from them.
    let mut m = mnist::mnist(0).unwrap();
    m.eval();
    let calib = mnist::synthetic_batch(4, 1);
    mnist::set_trained_bn_stats(&mut m, &calib, 3).unwrap();
    let net = mnist::deploy_net(&m).unwrap();
    let calib = calib.into_dyn();
    let cfg = DeployConfig::default();
    let rg = deploy::calibrate_ranges(&net, &gpu, [&calib], &cfg.activation).unwrap();
    let rc = deploy::calibrate_ranges(&net, &CpuBackend, [&calib], &cfg.activation).unwrap();
    for (g, c) in rg.iter().zip(&rc) {
        match (g, c) {
            (Some(g), Some(c)) => {
                let tol = 1e-4 * (c.0.abs() + c.1.abs()).max(1.0);
                assert!(
                    (g.0 - c.0).abs() <= tol && (g.1 - c.1).abs() <= tol,
                    "{g:?} {c:?}"
                );
            }
            (None, None) => {}
            _ => panic!("{g:?} vs {c:?}"),
        }
    }
    assert_eq!(
        deploy::convert_on(&net, &gpu, [&calib], &cfg).unwrap(),
        deploy::convert_with_ranges(&net, &CpuBackend, &rg, &cfg).unwrap()
    );
    // The GPU refuses what the CPU refuses.
    let flat = ArrayD::<f32>::zeros(ndarray::IxDyn(&[2, 784]));
    let eg = deploy::convert_on(&net, &gpu, [&flat], &cfg).unwrap_err();
    let ec = deploy::convert_on(&net, &CpuBackend, [&flat], &cfg).unwrap_err();
    assert_eq!(eg.to_string(), ec.to_string());
}

fn device_net_forward_on_the_gpu_matches_the_cpu_with_one_upload_and_one_download() {
    if common::gpu().is_none() {
        return;
    }
    let ctx = std::sync::Arc::new(qfuse::gpu::GpuContext::new().unwrap());
    let gpu = GpuBackend::new(ctx.clone());
    let mut m = mnist::mnist(0).unwrap();
    m.eval();
    let x = mnist::synthetic_batch(4, 1);
    mnist::set_trained_bn_stats(&mut m, &x, 3).unwrap();
    let net = mnist::deploy_net(&m).unwrap();
    let x = x.into_dyn();
    for fold in [true, false] {
        let before = ctx.transfer_stats();
        let on_gpu = deploy::DeviceNet::prepare(&net, gpu.clone(), fold).unwrap();
        let prep = ctx.transfer_stats().since(&before);
        // 4 weights + 4 biases; unfolded, batchnorm1's 4 vectors too.
        assert_eq!(
            (prep.uploads, prep.downloads),
            (if fold { 8 } else { 12 }, 0),
            "{prep:?}"
        );
        let before = ctx.transfer_stats();
        let y = on_gpu.forward(&x).unwrap();
        let t = ctx.transfer_stats().since(&before);
        assert_eq!((t.uploads, t.downloads), (1, 1), "{t:?}");
        assert!(on_gpu.folded() == fold && on_gpu.value_count() == net.value_count());
        let on_cpu = deploy::DeviceNet::prepare(&net, CpuBackend, fold).unwrap();
        let want = on_cpu.forward(&x).unwrap();
        assert_eq!(y.shape(), want.shape());
        let scale = want.iter().fold(1.0f32, |a, v| a.max(v.abs()));
        for (a, b) in y.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4 * scale, "fold {fold}: {a} vs {b}");
        }
        // The host-array form gives every value, the output last-computed one among them.
        let values = net.forward_values(&CpuBackend, &x, fold).unwrap();
        assert_eq!(values.len(), net.value_count());
        assert_eq!(values[net.output()], want);
        // The observer hook sees each value once, in order, and its error stops the forward.
        let mut seen = Vec::new();
        on_cpu
            .forward_observed(&x, &mut |v, _| {
                seen.push(v);
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, (0..net.value_count()).collect::<Vec<_>>());
        let e = on_cpu
            .forward_observed(&x, &mut |v, _| {
                if v == 2 {
                    Err(Error::invalid("stop at 2"))
                } else {
                    Ok(())
                }
            })
            .unwrap_err();
        assert!(e.to_string().contains("stop at 2"), "{e}");
    }
    // The folded and unfolded float models agree to f32 rounding.
    let a = net.forward_values(&CpuBackend, &x, true).unwrap();
    let b = net.forward_values(&CpuBackend, &x, false).unwrap();
    let scale = b[net.output()].iter().fold(1.0f32, |m, v| m.max(v.abs()));
    for (p, q) in a[net.output()].iter().zip(&b[net.output()]) {
        assert!((p - q).abs() <= 1e-3 * scale, "{p} vs {q}");
    }
}

crate::qfuse_tests! {
    mnist_converts_to_int8_with_folded_bn_and_relu6_clamps,
    deploying_the_fused_model_gives_the_same_integer_model,
    mnist_gap_fused_is_small_and_unfused_larger,
    resnet_block_gap_meets_the_target_with_fusion,
    fixed_point_requantization_also_runs_and_stays_within_a_step_per_layer,
    the_integer_model_round_trips_through_safetensors,
    bad_inputs_are_typed_errors,
    net_builder_rejects_what_integer_kernels_cannot_run,
    gpu_integer_model_matches_the_cpu_bit_for_bit: gpu,
    device_calibration_on_the_cpu_gives_the_host_integer_model,
    gpu_calibration_gives_the_cpu_integer_model: gpu,
    device_net_forward_on_the_gpu_matches_the_cpu_with_one_upload_and_one_download: gpu,
}
