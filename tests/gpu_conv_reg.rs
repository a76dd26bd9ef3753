//! The register-blocked conv2d forward (`forward_reg`, [`ConvAlgorithm::RegisterBlocked`]),
//! forced on whatever adapter runs the tests, against the CPU reference: every tile it can run
//! (1, 2, 4, 8 channels; the 3-tap stride-1 inner loop on and off; several workgroup sizes),
//! epilogues, odd output widths (the 8-pixel blocks' tails), strides, dilation, padding,
//! groups, depthwise, batch 1, channel counts that leave a partial channel block, and a grid
//! tiled over x and y. Also: which kernel `ConvAlgorithm::Auto` picks on a CPU adapter, and
//! the tile checks.
//!
//! Run on a machine without a GPU with `WGPU_BACKEND=vulkan QFUSE_REQUIRE_GPU=1` (lavapipe).

mod common;

use ndarray::{Array1, Array4, ArrayD};
use qfuse::gpu::{GpuContext, GpuTensor};
use qfuse::kernels::conv2d::{conv2d, conv2d_with_algorithm, ConvAlgorithm, ConvEpilogue, RegTile};
use qfuse::ops::{Activation, Conv2dParams};
use qfuse::reference;

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
        lo + (hi - lo) * (((self.next_u64() >> 40) as f32) / (1u32 << 24) as f32)
    }
    fn array4(&mut self, shape: [usize; 4]) -> Array4<f32> {
        Array4::from_shape_fn(shape, |_| self.uniform(-1.0, 1.0))
    }
    fn array1(&mut self, n: usize, lo: f32, hi: f32) -> Array1<f32> {
        Array1::from_shape_fn(n, |_| self.uniform(lo, hi))
    }
}

fn assert_close(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>, atol: f32, rtol: f32) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
        if (g.is_nan() && w.is_nan()) || g == w {
            continue;
        }
        let err = (g - w).abs();
        assert!(
            err <= atol + rtol * w.abs(),
            "{what}[{i}] (of shape {:?}): got {g:e}, want {w:e} (atol {atol:e}, rtol {rtol:e})",
            got.shape()
        );
    }
}

fn up(ctx: &GpuContext, a: ArrayD<f32>) -> GpuTensor {
    GpuTensor::upload_f32(ctx, &a).unwrap()
}

fn p(stride: [usize; 2], padding: [usize; 2], dilation: [usize; 2], groups: usize) -> Conv2dParams {
    Conv2dParams {
        stride,
        padding,
        dilation,
        groups,
    }
}

/// (input shape, weight shape, settings, name).
type Case = ([usize; 4], [usize; 4], Conv2dParams, &'static str);

fn configs() -> Vec<Case> {
    vec![
        (
            [2, 3, 8, 8],
            [8, 3, 3, 3],
            p([1, 1], [1, 1], [1, 1], 1),
            "3x3 pad 1",
        ),
        (
            [1, 5, 9, 17],
            [9, 5, 3, 3],
            p([1, 1], [1, 1], [1, 1], 1),
            "width 17, 9 channels",
        ),
        (
            [3, 4, 7, 7],
            [16, 4, 3, 3],
            p([1, 1], [1, 1], [1, 1], 1),
            "7x7 batch 3",
        ),
        (
            [1, 2, 5, 1],
            [3, 2, 3, 3],
            p([1, 1], [1, 1], [1, 1], 1),
            "width 1",
        ),
        (
            [1, 3, 6, 12],
            [5, 3, 3, 3],
            p([1, 1], [0, 0], [1, 1], 1),
            "3x3 no padding",
        ),
        (
            [1, 3, 6, 11],
            [7, 3, 3, 3],
            p([1, 1], [2, 2], [1, 1], 1),
            "3x3 pad 2",
        ),
        (
            [2, 4, 9, 9],
            [6, 4, 3, 3],
            p([2, 2], [1, 1], [1, 1], 1),
            "stride 2",
        ),
        (
            [1, 3, 10, 21],
            [5, 3, 3, 3],
            p([1, 1], [2, 2], [2, 2], 1),
            "dilation 2",
        ),
        (
            [2, 3, 7, 19],
            [4, 3, 2, 3],
            p([2, 1], [1, 0], [1, 2], 1),
            "nonsquare kernel/stride/padding/dilation",
        ),
        (
            [1, 3, 8, 13],
            [4, 3, 3, 3],
            p([1, 2], [1, 1], [1, 1], 1),
            "stride 1x2",
        ),
        (
            [2, 8, 7, 10],
            [8, 1, 3, 3],
            p([1, 1], [1, 1], [1, 1], 8),
            "depthwise",
        ),
        (
            [1, 4, 6, 6],
            [8, 1, 3, 3],
            p([2, 2], [1, 1], [1, 1], 4),
            "depthwise x2 multiplier, stride 2",
        ),
        (
            [1, 6, 6, 5],
            [10, 3, 3, 3],
            p([1, 1], [1, 1], [1, 1], 2),
            "groups 2",
        ),
        (
            [1, 6, 5, 9],
            [9, 2, 3, 3],
            p([1, 1], [1, 1], [1, 1], 3),
            "groups 3, 3 per group",
        ),
        (
            [2, 16, 5, 5],
            [12, 16, 1, 1],
            p([1, 1], [0, 0], [1, 1], 1),
            "1x1",
        ),
        (
            [2, 1, 12, 12],
            [20, 1, 5, 5],
            p([1, 1], [0, 0], [1, 1], 1),
            "5x5 no padding",
        ),
        (
            [1, 3, 9, 9],
            [6, 3, 3, 5],
            p([1, 1], [1, 2], [1, 1], 1),
            "3x5 kernel",
        ),
        (
            [2, 24, 13, 11],
            [80, 24, 3, 3],
            p([1, 1], [1, 1], [1, 1], 1),
            "80 channels, long reduction",
        ),
    ]
}

/// Forward through `algorithm` with a few epilogues, against the CPU.
fn check(ctx: &GpuContext, rng: &mut Rng, case: &Case, algorithm: ConvAlgorithm) {
    let (xs, ws, params, what) = case;
    let x = rng.array4(*xs);
    let w = rng.array4(*ws);
    let o = ws[0];
    let scale = rng.array1(o, -2.0, 2.0);
    let bias = rng.array1(o, -1.0, 1.0);
    let (gx, gw) = (up(ctx, x.clone().into_dyn()), up(ctx, w.clone().into_dyn()));
    let (gs, gb) = (
        up(ctx, scale.clone().into_dyn()),
        up(ctx, bias.clone().into_dyn()),
    );
    let k = ws[1] * ws[2] * ws[3];
    let atol = 2e-4 * (k as f32 / 256.0).max(1.0);
    let plain = reference::conv2d::conv2d(&x, &w, None, params).unwrap();
    for (with_scale, with_bias, act) in [
        (false, false, Activation::None),
        (true, true, Activation::Relu),
        (false, true, Activation::Relu6),
    ] {
        let epilogue = ConvEpilogue {
            out_scale: with_scale.then_some(&gs),
            bias: with_bias.then_some(&gb),
            activation: act,
        };
        let got = conv2d_with_algorithm(ctx, &gx, &gw, params, &epilogue, algorithm)
            .unwrap()
            .download_f32(ctx)
            .unwrap();
        let mut want = plain.clone();
        for ((_, c, _, _), v) in want.indexed_iter_mut() {
            let mut t = *v;
            if with_scale {
                t *= scale[c];
            }
            if with_bias {
                t += bias[c];
            }
            *v = match act {
                Activation::Relu => t.max(0.0),
                Activation::Relu6 => t.clamp(0.0, 6.0),
                _ => t,
            };
        }
        assert_close(
            &format!("{what} {algorithm:?} scale {with_scale} bias {with_bias} {act:?}"),
            &got,
            &want.into_dyn(),
            atol,
            1e-4,
        );
    }
}

#[test]
fn register_blocked_default_tile_matches_reference() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(21);
    for case in configs() {
        check(&ctx, &mut rng, &case, ConvAlgorithm::RegisterBlocked);
    }
}

#[test]
fn register_blocked_every_tile_matches_reference() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(22);
    for case in configs() {
        for channels in [1, 2, 4, 8] {
            for k3_stride1 in [false, true] {
                for workgroup in [8, 24, 64] {
                    let tile = RegTile {
                        channels,
                        k3_stride1,
                        workgroup,
                        rows: 1,
                    };
                    check(
                        &ctx,
                        &mut rng,
                        &case,
                        ConvAlgorithm::RegisterBlockedWith(tile),
                    );
                }
            }
        }
    }
}

#[test]
fn register_blocked_resnet_like_shape() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = Rng(23);
    // 256 input channels (K = 2304), a 14-wide row (two 8-pixel blocks, the second partial).
    let case = (
        [1, 256, 14, 14],
        [32, 256, 3, 3],
        p([1, 1], [1, 1], [1, 1], 1),
        "256x14x14",
    );
    check(&ctx, &mut rng, &case, ConvAlgorithm::RegisterBlocked);
}

/// A context whose device allows only 16 workgroups per dimension, so that the grid is tiled
/// over x and y even at test sizes.
fn small_grid_context() -> Option<GpuContext> {
    common::gpu()?;
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
    let instance = wgpu::Instance::new(desc);
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        ..Default::default()
    }))
    .expect("an adapter (common::gpu found one)");
    let mut limits = adapter.limits();
    limits.max_compute_workgroups_per_dimension = 16;
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("small grid"),
        required_limits: limits,
        ..Default::default()
    }))
    .expect("a device with lowered limits");
    Some(GpuContext::from_device(device, queue).unwrap())
}

#[test]
fn register_blocked_small_grid_limit() {
    let Some(ctx) = small_grid_context() else {
        return;
    };
    let mut rng = Rng(24);
    // 2 * 24 * 3 = 144 pixel blocks in 18 workgroups of 8, times 2 channel blocks of 8: 36
    // workgroups, more than 16 per dimension.
    let tile = RegTile {
        channels: 8,
        k3_stride1: true,
        workgroup: 8,
        rows: 1,
    };
    let case = (
        [2, 4, 24, 24],
        [12, 4, 3, 3],
        p([1, 1], [1, 1], [1, 1], 1),
        "small grid",
    );
    assert!(ctx.grid_1d(36, 1).unwrap()[1] > 1);
    check(
        &ctx,
        &mut rng,
        &case,
        ConvAlgorithm::RegisterBlockedWith(tile),
    );
    check(&ctx, &mut rng, &case, ConvAlgorithm::RegisterBlocked);
}

#[test]
fn register_tile_choice_and_checks() {
    let params = p([1, 1], [1, 1], [1, 1], 1);
    let t = RegTile::for_conv(64, 3, &params, 8 * 56 * 7);
    assert_eq!((t.channels, t.k3_stride1, t.workgroup), (8, true, 64));
    assert_eq!(RegTile::for_conv(1, 3, &params, 64).channels, 1);
    assert_eq!(RegTile::for_conv(3, 3, &params, 64).channels, 2);
    assert_eq!(RegTile::for_conv(6, 3, &params, 64).channels, 4);
    // 56 blocks (512x7x7, batch 8): 64 would idle 8 of them, more than an eighth.
    assert_eq!(RegTile::for_conv(512, 3, &params, 56).workgroup, 8);
    assert!(!RegTile::for_conv(8, 3, &p([2, 2], [1, 1], [1, 1], 1), 64).k3_stride1);
    assert!(!RegTile::for_conv(8, 3, &p([1, 1], [1, 1], [1, 2], 1), 64).k3_stride1);
    assert!(!RegTile::for_conv(8, 5, &params, 64).k3_stride1);

    let Some(ctx) = common::gpu() else { return };
    let x = GpuTensor::zeros(&ctx, &[1, 2, 4, 4], qfuse::gpu::DType::F32).unwrap();
    let w = GpuTensor::zeros(&ctx, &[2, 2, 3, 3], qfuse::gpu::DType::F32).unwrap();
    for tile in [
        RegTile {
            channels: 3,
            k3_stride1: false,
            workgroup: 64,
            rows: 1,
        },
        RegTile {
            channels: 8,
            k3_stride1: false,
            workgroup: 0,
            rows: 1,
        },
        RegTile {
            channels: 8,
            k3_stride1: false,
            workgroup: 512,
            rows: 1,
        },
        RegTile {
            channels: 8,
            k3_stride1: true,
            workgroup: 64,
            rows: 2,
        },
    ] {
        let err = conv2d_with_algorithm(
            &ctx,
            &x,
            &w,
            &params,
            &ConvEpilogue::none(),
            ConvAlgorithm::RegisterBlockedWith(tile),
        )
        .unwrap_err();
        assert!(err.to_string().contains("register tile"), "{err}");
    }
    // Auto runs the register-blocked kernel on a CPU adapter: same results either way.
    let mut rng = Rng(25);
    let xa = rng.array4([1, 3, 9, 9]);
    let wa = rng.array4([4, 3, 3, 3]);
    let (gx, gw) = (up(&ctx, xa.into_dyn()), up(&ctx, wa.into_dyn()));
    let auto = conv2d(&ctx, &gx, &gw, &params, &ConvEpilogue::none())
        .unwrap()
        .download_f32(&ctx)
        .unwrap();
    let forced = if qfuse::kernels::conv2d::is_cpu_adapter(&ctx) {
        ConvAlgorithm::RegisterBlocked
    } else {
        ConvAlgorithm::Direct
    };
    let other = conv2d_with_algorithm(&ctx, &gx, &gw, &params, &ConvEpilogue::none(), forced)
        .unwrap()
        .download_f32(&ctx)
        .unwrap();
    assert_eq!(auto, other);
}
