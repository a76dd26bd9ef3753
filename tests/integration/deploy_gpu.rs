//! `deploy::GpuIntModel`, the device-resident integer forward, against
//! `IntModel::forward(&CpuBackend, ..)` bit for bit: the Mnist network and a ResNet basic
//! block (residual add), both requantization modes, both dot-product paths; the flatten
//! repack kernel (channel counts that are not multiples of 4, other ranks); and bad input
//! (wrong shapes, NaN, empty batch) giving the CPU path's errors.
//!
//! Run on a machine without a GPU with `WGPU_BACKEND=vulkan QFUSE_REQUIRE_GPU=1` (lavapipe).

use crate::common;

use std::sync::Arc;

use ndarray::{Array1, Array2, ArrayD, IxDyn};
use qfuse::deploy::{self, DeployConfig, GpuIntModel, IntModel, Net};
use qfuse::gpu::{GpuContext, GpuTensor, Int8Dot};
use qfuse::kernels::int8::{self as k8, GpuInt8Tensor};
use qfuse::model::{mnist, resnet};
use qfuse::ops::{Activation, Conv2d, Conv2dParams};
use qfuse::quant::RequantMode;
use qfuse::CpuBackend;

fn dots(ctx: &GpuContext) -> Vec<Int8Dot> {
    let mut v = vec![Int8Dot::Portable];
    if ctx.packed_int8_dot_available() {
        v.push(Int8Dot::Packed);
    }
    v
}

fn cfg(mode: RequantMode) -> DeployConfig {
    DeployConfig {
        requant: mode,
        ..DeployConfig::default()
    }
}

fn mnist_model(mode: RequantMode) -> IntModel {
    let mut m = mnist::mnist(0).unwrap();
    m.eval();
    let calib = mnist::synthetic_batch(32, 1);
    mnist::set_trained_bn_stats(&mut m, &calib, 3).unwrap();
    let net = mnist::deploy_net(&m).unwrap();
    deploy::convert(&net, &CpuBackend, [&calib.into_dyn()], &cfg(mode)).unwrap()
}

fn block_model(mode: RequantMode) -> IntModel {
    let net = resnet::basic_block(8, 0).unwrap();
    let calib = resnet::synthetic_input(4, 8, 10, 1).into_dyn();
    deploy::convert(&net, &CpuBackend, [&calib], &cfg(mode)).unwrap()
}

/// Deterministic values in [-1, 1) (xorshift).
fn values(shape: &[usize], seed: u32) -> ArrayD<f32> {
    let mut s = seed.max(1);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
    })
}

/// conv (3 → 5 channels, 3×3, padding 1) + ReLU → max pool 2 → flatten (5·4·4 = 80
/// features, 5 channels: not a multiple of 4) → linear 80 → 7.
fn odd_channel_net() -> Net {
    let mut net = Net::new();
    let x = net.input();
    let w = values(&[5, 3, 3, 3], 3).into_dimensionality().unwrap();
    let conv = Conv2d {
        weight: w,
        bias: Some(Array1::from_vec(vec![0.1, -0.2, 0.05, 0.0, 0.3])),
        params: Conv2dParams {
            padding: [1, 1],
            ..Conv2dParams::default()
        },
    };
    let c = net.conv("conv", conv, x).unwrap();
    net.activation(c, Activation::Relu).unwrap();
    let p = net.max_pool2d("pool", 2, 2, c).unwrap();
    let f = net.flatten("flatten", p).unwrap();
    let lw: Array2<f32> = values(&[7, 80], 5).into_dimensionality().unwrap();
    let l = net
        .linear("fc", lw * 0.2, Some(Array1::from_elem(7, 0.01)), f)
        .unwrap();
    net.set_output(l).unwrap();
    net
}

/// The device forward (host and device-tensor entry points) equals the CPU forward on every
/// dot path.
fn check_model(ctx: &Arc<GpuContext>, model: &IntModel, x: &ArrayD<f32>, what: &str) {
    let want = model.forward(&CpuBackend, x).unwrap();
    for dot in dots(ctx) {
        let g = GpuIntModel::new(model, ctx.clone())
            .unwrap()
            .with_dot(dot)
            .unwrap();
        assert_eq!(g.dot(), dot);
        assert_eq!(g.forward(x).unwrap(), want, "{what} {dot:?}");
        // Twice: the prepared layers are reusable.
        assert_eq!(g.forward(x).unwrap(), want, "{what} {dot:?} again");
        let gx = GpuTensor::upload_f32(ctx, x).unwrap();
        let got = g
            .forward_gpu(&gx)
            .unwrap()
            .into_checked(ctx)
            .unwrap()
            .download(ctx)
            .unwrap();
        assert_eq!(got, want, "{what} {dot:?} forward_gpu");
        // From codes already on the device.
        let q =
            qfuse::reference::int8::quantize(x, &model.values[0], model.activation_range).unwrap();
        let gq = GpuInt8Tensor::upload(ctx, &q).unwrap();
        let got = g.forward_codes(&gq).unwrap().download(ctx).unwrap();
        assert_eq!(got, want, "{what} {dot:?} forward_codes");
    }
}

fn mnist_device_forward_matches_the_cpu_bit_for_bit() {
    let Some(ctx) = common::gpu() else { return };
    for mode in [RequantMode::Float, RequantMode::FixedPoint] {
        let model = mnist_model(mode);
        let x = mnist::synthetic_batch(12, 4).into_dyn();
        check_model(&ctx, &model, &x, &format!("mnist {mode:?}"));
    }
}

fn resnet_block_device_forward_matches_the_cpu_bit_for_bit() {
    let Some(ctx) = common::gpu() else { return };
    for mode in [RequantMode::Float, RequantMode::FixedPoint] {
        let model = block_model(mode);
        assert!(model
            .nodes
            .iter()
            .any(|n| matches!(n.layer, deploy::IntLayer::Add { .. })));
        let x = resnet::synthetic_input(3, 8, 10, 9).into_dyn();
        check_model(&ctx, &model, &x, &format!("basic block {mode:?}"));
    }
}

fn odd_channel_flatten_model_matches_the_cpu() {
    let Some(ctx) = common::gpu() else { return };
    let net = odd_channel_net();
    for mode in [RequantMode::Float, RequantMode::FixedPoint] {
        let calib = values(&[4, 3, 8, 8], 9);
        let model = deploy::convert(&net, &CpuBackend, [&calib], &cfg(mode)).unwrap();
        let x = values(&[3, 3, 8, 8], 11);
        check_model(&ctx, &model, &x, &format!("odd channels {mode:?}"));
    }
}

fn codes(shape: &[usize], seed: u64) -> ArrayD<i8> {
    let mut s = seed;
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 56) as u8 as i8
    })
}

fn flatten_repack_matches_the_host_reshape() {
    let Some(ctx) = common::gpu() else { return };
    for shape in [
        vec![2, 5, 3, 3],
        vec![3, 7, 2, 5],
        vec![1, 6, 4, 4],
        vec![2, 3, 1, 1],
        vec![4, 9, 1, 1],
        vec![2, 5, 7],
        vec![7],
        vec![3, 10],
        vec![0, 5, 2, 2],
    ] {
        let x = codes(&shape, shape.iter().product::<usize>() as u64 + 1);
        let gx = GpuInt8Tensor::upload(&ctx, &x).unwrap();
        let n = shape[0];
        let rest: usize = shape[1..].iter().product();
        let want = x
            .as_standard_layout()
            .to_owned()
            .into_shape_with_order(IxDyn(&[n, rest]))
            .unwrap();
        let got = k8::flatten_int8(&ctx, &gx).unwrap();
        assert_eq!(got.shape(), &[n, rest]);
        assert_eq!(got.download(&ctx).unwrap(), want, "{shape:?}");
        // Padding lanes of the repacked words are 0 (the packed layout's invariant).
        let words: Vec<u32> = got
            .words()
            .download_u32(&ctx)
            .unwrap()
            .iter()
            .copied()
            .collect();
        assert_eq!(words, k8::pack_codes(&want), "{shape:?} words");
    }
    // Any shape of the same element count.
    let x = codes(&[2, 5, 3, 3], 7);
    let gx = GpuInt8Tensor::upload(&ctx, &x).unwrap();
    for shape in [vec![6, 15], vec![90], vec![3, 6, 5], vec![1, 90, 1, 1]] {
        let want = x
            .as_standard_layout()
            .to_owned()
            .into_shape_with_order(IxDyn(&shape))
            .unwrap();
        let got = k8::repack_int8(&ctx, &gx, &shape).unwrap();
        assert_eq!(got.download(&ctx).unwrap(), want, "{shape:?}");
    }
    assert!(matches!(
        k8::repack_int8(&ctx, &gx, &[7, 13]),
        Err(qfuse::Error::ShapeMismatch { .. })
    ));
    let scalar = GpuInt8Tensor::upload(&ctx, &ArrayD::from_elem(IxDyn(&[]), 3i8)).unwrap();
    assert_eq!(
        k8::flatten_int8(&ctx, &scalar).unwrap_err().to_string(),
        qfuse::Error::invalid("flatten needs an input of rank >= 1").to_string()
    );
}

/// The same error (variant and message) from the device forward as from the CPU forward.
fn same_error(what: &str, g: &GpuIntModel, model: &IntModel, x: &ArrayD<f32>) {
    let want = model.forward(&CpuBackend, x).unwrap_err();
    let got = g.forward(x).unwrap_err();
    assert_eq!(got.to_string(), want.to_string(), "{what}");
    assert_eq!(
        std::mem::discriminant(&got),
        std::mem::discriminant(&want),
        "{what}: {got:?} vs {want:?}"
    );
    if !x.is_empty() {
        let ctx = g.context();
        let gx = GpuTensor::upload_f32(ctx, x).unwrap();
        let got = match g.forward_gpu(&gx) {
            Ok(out) => out.into_checked(ctx).unwrap_err(),
            Err(e) => e,
        };
        assert_eq!(got.to_string(), want.to_string(), "{what} forward_gpu");
    }
}

fn bad_input_gives_the_cpu_errors() {
    let Some(ctx) = common::gpu() else { return };
    let model = mnist_model(RequantMode::Float);
    let g = GpuIntModel::new(&model, ctx.clone()).unwrap();
    let x = mnist::synthetic_batch(2, 4).into_dyn();

    let flat = x.clone().into_shape_with_order(IxDyn(&[2, 784])).unwrap();
    same_error("rank 2 input", &g, &model, &flat);
    same_error("3 channels", &g, &model, &values(&[2, 3, 28, 28], 1));
    // 27×27 runs through both convs and pools, then fc1 gets 450 features, not 800.
    same_error("27x27", &g, &model, &values(&[2, 1, 27, 27], 2));
    same_error(
        "4x4 (conv kernel too big)",
        &g,
        &model,
        &values(&[2, 1, 4, 4], 2),
    );
    same_error("empty batch", &g, &model, &values(&[0, 1, 28, 28], 2));
    same_error("scalar", &g, &model, &ArrayD::from_elem(IxDyn(&[]), 0.5f32));

    let mut nan = x.clone();
    nan[[1, 0, 3, 4]] = f32::NAN;
    nan[[1, 0, 20, 4]] = f32::NAN;
    same_error("NaN", &g, &model, &nan);
    // NaN and a bad shape: the CPU path quantizes (and rejects the NaN) first.
    let mut both = values(&[2, 3, 28, 28], 1);
    both[[0, 2, 0, 1]] = f32::NAN;
    same_error("NaN and 3 channels", &g, &model, &both);
    // Infinities are not errors: they saturate.
    let mut inf = x.clone();
    inf[[0, 0, 0, 0]] = f32::INFINITY;
    inf[[1, 0, 5, 5]] = f32::NEG_INFINITY;
    assert_eq!(
        g.forward(&inf).unwrap(),
        model.forward(&CpuBackend, &inf).unwrap()
    );

    // Residual add with mismatched inputs cannot be built by convert; the block's add sees
    // its conv output and input, so a wrong channel count fails at the first conv.
    let block = block_model(RequantMode::FixedPoint);
    let gb = GpuIntModel::new(&block, ctx.clone()).unwrap();
    same_error("block 4 channels", &gb, &block, &values(&[1, 4, 10, 10], 3));

    // A non-f32 device input.
    let gi = GpuTensor::from_slice_u32(&ctx, &[0; 4], &[1, 1, 2, 2]).unwrap();
    assert!(g.forward_gpu(&gi).is_err());
}

fn an_invalid_model_is_rejected_when_prepared() {
    let Some(ctx) = common::gpu() else { return };
    let mut model = mnist_model(RequantMode::Float);
    model.values.pop();
    let want = model
        .forward(&CpuBackend, &mnist::synthetic_batch(1, 1).into_dyn())
        .unwrap_err();
    let got = GpuIntModel::new(&model, ctx).unwrap_err();
    assert_eq!(got.to_string(), want.to_string());
}

fn large_batch_matches() {
    let Some(ctx) = common::gpu() else { return };
    let model = mnist_model(RequantMode::FixedPoint);
    let g = GpuIntModel::new(&model, ctx).unwrap();
    let x = mnist::synthetic_batch(65, 8).into_dyn();
    assert_eq!(
        g.forward(&x).unwrap(),
        model.forward(&CpuBackend, &x).unwrap()
    );
}

crate::qfuse_tests! {
    mnist_device_forward_matches_the_cpu_bit_for_bit: gpu,
    resnet_block_device_forward_matches_the_cpu_bit_for_bit: gpu,
    odd_channel_flatten_model_matches_the_cpu: gpu,
    flatten_repack_matches_the_host_reshape: gpu,
    bad_input_gives_the_cpu_errors: gpu,
    an_invalid_model_is_rejected_when_prepared: gpu,
    large_batch_matches: gpu,
}
