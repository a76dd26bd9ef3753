//! The subgroup conv2d forward (`forward_sg` of `shaders/conv2d_subgroup.wgsl`,
//! [`ConvAlgorithm::Subgroup`]) against the CPU reference, on whatever adapter runs the tests
//! when its device has `wgpu::Features::SUBGROUP` (lavapipe does, subgroup size 8): both tiles
//! (8, 16 channels), the 3-tap stride-1 inner loop on and off, one, two and four output rows
//! per invocation (`forward_sg_r2` / `forward_sg_r4`, output heights that are not multiples
//! of 2 or 4), workgroups that fill whole
//! subgroups of 8 (weights shared by broadcast) and workgroups that leave a partial subgroup
//! (5, 12: the in-shader fallback to per-invocation weight loads), over the shapes of
//! `gpu_conv_reg.rs` (odd widths, padding, stride 2, dilation, groups, depthwise, batch 1 and
//! 3, partial channel blocks, epilogues) and a grid tiled over x and y. Also: what
//! `ConvAlgorithm::Auto` picks, the tile checks, and a device without `SUBGROUP` (the subgroup
//! path refused, Auto falling back).
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
        // Output heights 3, 6, 2 and 1 (not multiples of 4: the last row quad of
        // forward_sg_r4 partly past OH), batch 2 so the quad after a partial one is another
        // image's.
        (
            [2, 5, 3, 10],
            [16, 5, 3, 3],
            p([1, 1], [1, 1], [1, 1], 1),
            "3x3 height 3",
        ),
        (
            [2, 5, 6, 9],
            [24, 5, 3, 3],
            p([1, 1], [1, 1], [1, 1], 1),
            "3x3 height 6",
        ),
        (
            [3, 4, 4, 7],
            [8, 4, 3, 3],
            p([1, 1], [0, 0], [1, 1], 1),
            "3x3 no padding, height 2",
        ),
        (
            [2, 6, 3, 6],
            [16, 3, 3, 3],
            p([1, 1], [0, 0], [1, 1], 2),
            "3x3 groups 2, height 1",
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

/// The test context when its device has subgroups; `None` (with a line saying so) otherwise.
fn sg_gpu() -> Option<std::sync::Arc<GpuContext>> {
    let ctx = common::gpu()?;
    if !ctx.has_subgroups() {
        println!(
            "skipping subgroup test: {} has no wgpu::Features::SUBGROUP",
            ctx.name()
        );
        return None;
    }
    Some(ctx)
}

#[test]
fn subgroup_default_tile_matches_reference() {
    let Some(ctx) = sg_gpu() else { return };
    let mut rng = Rng(31);
    for case in configs() {
        check(&ctx, &mut rng, &case, ConvAlgorithm::Subgroup);
    }
}

#[test]
fn subgroup_every_tile_matches_reference() {
    let Some(ctx) = sg_gpu() else { return };
    let mut rng = Rng(32);
    for case in configs() {
        for channels in [8, 16] {
            for (k3_stride1, rows) in [(false, 1), (true, 1), (true, 2), (true, 4)] {
                // 8 and 64: whole subgroups of 8 (broadcast path on lavapipe); 5 and 12: a
                // partial subgroup (the per-invocation fallback for those lanes). Rows 2 / 4 run
                // forward_sg_r2 / forward_sg_r4 where the conv is 3x3, stride 1, dilation 1
                // (else forward_sg).
                for workgroup in [5, 8, 12, 64] {
                    let tile = RegTile {
                        channels,
                        k3_stride1,
                        workgroup,
                        rows,
                    };
                    check(&ctx, &mut rng, &case, ConvAlgorithm::SubgroupWith(tile));
                }
            }
        }
    }
}

#[test]
fn subgroup_resnet_like_shapes() {
    let Some(ctx) = sg_gpu() else { return };
    let mut rng = Rng(33);
    // 256 input channels (K = 2304), a 14-wide row (two 8-pixel blocks, the second partial),
    // 40 output channels (a partial 16-channel block).
    for case in [
        (
            [1, 256, 14, 14],
            [40, 256, 3, 3],
            p([1, 1], [1, 1], [1, 1], 1),
            "256x14x14",
        ),
        (
            [2, 32, 15, 15],
            [48, 32, 3, 3],
            p([2, 2], [1, 1], [1, 1], 1),
            "stride 2 downsampling",
        ),
    ] {
        check(&ctx, &mut rng, &case, ConvAlgorithm::Subgroup);
    }
}

/// A context whose device allows only 16 workgroups per dimension (so that the grid is tiled
/// over x and y even at test sizes), with `features` requested.
fn context_with(features: wgpu::Features, max_per_dim: u32) -> Option<GpuContext> {
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
    limits.max_compute_workgroups_per_dimension = max_per_dim;
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("subgroup test"),
        required_features: features & adapter.features(),
        required_limits: limits,
        ..Default::default()
    }))
    .expect("a device");
    Some(GpuContext::from_device(device, queue).unwrap())
}

#[test]
fn subgroup_small_grid_limit() {
    let Some(ctx) = context_with(wgpu::Features::SUBGROUP, 16) else {
        return;
    };
    if !ctx.has_subgroups() {
        return;
    }
    let mut rng = Rng(34);
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
    check(&ctx, &mut rng, &case, ConvAlgorithm::SubgroupWith(tile));
    check(&ctx, &mut rng, &case, ConvAlgorithm::Subgroup);
}

#[test]
fn device_without_subgroups_refuses_and_auto_falls_back() {
    let Some(ctx) = context_with(wgpu::Features::empty(), 65535) else {
        return;
    };
    assert!(!ctx.has_subgroups());
    assert_eq!(ctx.subgroup_sizes(), None);
    let params = p([1, 1], [1, 1], [1, 1], 1);
    let mut rng = Rng(35);
    let xa = rng.array4([1, 8, 9, 9]);
    let wa = rng.array4([16, 8, 3, 3]);
    let (gx, gw) = (up(&ctx, xa.into_dyn()), up(&ctx, wa.into_dyn()));
    for algorithm in [
        ConvAlgorithm::Subgroup,
        ConvAlgorithm::SubgroupWith(RegTile {
            channels: 8,
            k3_stride1: true,
            workgroup: 64,
            rows: 1,
        }),
    ] {
        let err = conv2d_with_algorithm(&ctx, &gx, &gw, &params, &ConvEpilogue::none(), algorithm)
            .unwrap_err();
        assert!(err.to_string().contains("SUBGROUP"), "{err}");
    }
    assert!(!qfuse::kernels::conv2d::use_subgroup_forward(&ctx, 16));
    // Auto still runs (forward_reg on a CPU adapter, else gemm / direct).
    let case = ([1, 8, 9, 9], [16, 8, 3, 3], params, "no subgroups, auto");
    check(&ctx, &mut rng, &case, ConvAlgorithm::Auto);
}

#[test]
fn subgroup_tile_choice_and_checks() {
    let params = p([1, 1], [1, 1], [1, 1], 1);
    let t = RegTile::for_subgroup_conv(64, [3, 3], &params, [8, 64, 56, 56]);
    assert_eq!(
        (t.channels, t.k3_stride1, t.workgroup, t.rows),
        (16, true, 64, 4)
    );
    // Four rows from OH = 8 up, two below (down to 2), one at OH = 1.
    for (oh, rows) in [(8, 4), (14, 4), (7, 2), (2, 2), (1, 1)] {
        assert_eq!(
            RegTile::for_subgroup_conv(16, [3, 3], &params, [1, 16, oh, 8]).rows,
            rows,
            "OH {oh}"
        );
    }
    assert_eq!(
        RegTile::for_subgroup_conv(8, [3, 3], &params, [1, 8, 8, 8]).channels,
        8
    );
    assert_eq!(
        RegTile::for_subgroup_conv(12, [3, 3], &params, [1, 8, 8, 8]).channels,
        8
    );
    let s2 = RegTile::for_subgroup_conv(16, [3, 3], &p([2, 2], [1, 1], [1, 1], 1), [1, 8, 8, 8]);
    assert!(!s2.k3_stride1);
    assert_eq!(s2.rows, 1);
    // Two or four rows only for 3x3, stride 1, dilation 1, at least two output rows.
    for (kernel, params, out) in [
        ([3, 5], params, [1, 8, 8, 8]),
        ([5, 3], params, [1, 8, 8, 8]),
        ([3, 3], p([1, 1], [1, 1], [2, 1], 1), [1, 8, 8, 8]),
        ([3, 3], p([2, 1], [1, 1], [1, 1], 1), [1, 8, 8, 8]),
        ([3, 3], params, [1, 8, 1, 8]),
    ] {
        assert_eq!(
            RegTile::for_subgroup_conv(16, kernel, &params, out).rows,
            1,
            "{kernel:?} {params:?} {out:?}"
        );
    }
    // 512x7x7, batch 8: 8 * 4 row pairs = 32 invocations, one workgroup of 32.
    assert_eq!(
        RegTile::for_subgroup_conv(512, [3, 3], &params, [8, 512, 7, 7]).workgroup,
        32
    );

    let Some(ctx) = sg_gpu() else { return };
    let (min, max) = ctx.subgroup_sizes().expect("sizes with SUBGROUP");
    assert!(min >= 1 && min <= max, "subgroup sizes {min}..{max}");
    let x = GpuTensor::zeros(&ctx, &[1, 2, 4, 4], qfuse::gpu::DType::F32).unwrap();
    let w = GpuTensor::zeros(&ctx, &[2, 2, 3, 3], qfuse::gpu::DType::F32).unwrap();
    for (channels, workgroup, rows) in [
        (4, 64, 1),
        (1, 64, 1),
        (32, 64, 1),
        (8, 0, 1),
        (16, 512, 1),
        (16, 64, 0),
        (16, 64, 3),
        (16, 64, 8),
    ] {
        let tile = RegTile {
            channels,
            k3_stride1: false,
            workgroup,
            rows,
        };
        let err = conv2d_with_algorithm(
            &ctx,
            &x,
            &w,
            &params,
            &ConvEpilogue::none(),
            ConvAlgorithm::SubgroupWith(tile),
        )
        .unwrap_err();
        assert!(err.to_string().contains("subgroup tile"), "{err}");
    }
    // Auto on a CPU adapter with subgroups and >= 8 channels per group runs forward_sg; the
    // same results as forcing it (bit for bit: same kernel, same tile).
    let mut rng = Rng(36);
    let xa = rng.array4([1, 8, 9, 9]);
    let wa = rng.array4([16, 8, 3, 3]);
    let (gx, gw) = (up(&ctx, xa.into_dyn()), up(&ctx, wa.into_dyn()));
    let auto = conv2d(&ctx, &gx, &gw, &params, &ConvEpilogue::none())
        .unwrap()
        .download_f32(&ctx)
        .unwrap();
    if qfuse::kernels::conv2d::is_cpu_adapter(&ctx) {
        assert!(qfuse::kernels::conv2d::use_subgroup_forward(&ctx, 16));
        let forced = conv2d_with_algorithm(
            &ctx,
            &gx,
            &gw,
            &params,
            &ConvEpilogue::none(),
            ConvAlgorithm::Subgroup,
        )
        .unwrap()
        .download_f32(&ctx)
        .unwrap();
        assert_eq!(auto, forced);
    }
}

/// Not a check: times the register-blocked and subgroup forwards (one, two and four output rows
/// per invocation, four also with 8 channels) at ResNet-18 3x3 shapes
/// (batch from `QFUSE_TIMING_BATCH`, default 8), interleaved, and prints the best GFLOP/s of
/// 5 runs each. Run with
/// `cargo test --release --test gpu_conv_subgroup -- --ignored --nocapture`.
#[test]
#[ignore]
fn subgroup_timing() {
    let Some(ctx) = sg_gpu() else { return };
    let batch: usize = std::env::var("QFUSE_TIMING_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let mut rng = Rng(37);
    let params = p([1, 1], [1, 1], [1, 1], 1);
    for (c, s, groups) in [
        (64, 56, 1),
        (128, 28, 1),
        (256, 14, 1),
        (512, 7, 1),
        (144, 56, 144),
    ] {
        let x = up(&ctx, rng.array4([batch, c, s, s]).into_dyn());
        let w = up(&ctx, rng.array4([c, c / groups, 3, 3]).into_dyn());
        let gp = Conv2dParams { groups, ..params };
        let flops = 2.0 * (batch * s * s * c * (c / groups) * 9) as f64;
        let tile = RegTile::for_subgroup_conv(c / groups, [3, 3], &gp, [batch, c, s, s]);
        let one_row = RegTile { rows: 1, ..tile };
        let two_rows = RegTile { rows: 2, ..tile };
        let four_rows = RegTile { rows: 4, ..tile };
        let four_rows_8 = RegTile {
            rows: 4,
            channels: 8,
            ..tile
        };
        let algorithms = [
            ("reg", ConvAlgorithm::RegisterBlocked),
            ("sg rows 1", ConvAlgorithm::SubgroupWith(one_row)),
            ("sg rows 2", ConvAlgorithm::SubgroupWith(two_rows)),
            ("sg rows 4", ConvAlgorithm::SubgroupWith(four_rows)),
            ("sg rows 4 x8", ConvAlgorithm::SubgroupWith(four_rows_8)),
            ("auto", ConvAlgorithm::Auto),
        ];
        let run = |algorithm| {
            let t = std::time::Instant::now();
            conv2d_with_algorithm(&ctx, &x, &w, &gp, &ConvEpilogue::none(), algorithm).unwrap();
            ctx.wait().unwrap();
            t.elapsed().as_secs_f64()
        };
        let mut best = [f64::MAX; 6];
        for rep in 0..6 {
            for (i, (_, algorithm)) in algorithms.iter().enumerate() {
                let t = run(*algorithm);
                if rep > 0 {
                    best[i] = best[i].min(t);
                }
            }
        }
        let mut line = format!("{batch}x{c}x{s}x{s} g{groups}:");
        for ((name, _), t) in algorithms.iter().zip(best) {
            line += &format!("  {name} {:.1} ms {:.2} GFLOP/s", t * 1e3, flops / t / 1e9);
        }
        println!("{line}");
    }
}

/// Not a check: runs one conv `QFUSE_TIMING_REPS` times (default 15) and prints every
/// submit-to-completion time, for looking at the spread. Shape from `QFUSE_TIMING_SHAPE`
/// (`N,C,S,G`, default `8,512,7,1`: N x C x S x S input, C output channels, 3x3, pad 1,
/// groups G). Run with
/// `cargo test --release --test gpu_conv_subgroup -- --ignored --nocapture repeat_timing`.
#[test]
#[ignore]
fn repeat_timing() {
    let Some(ctx) = sg_gpu() else { return };
    let shape: Vec<usize> = std::env::var("QFUSE_TIMING_SHAPE")
        .unwrap_or_else(|_| "8,512,7,1".to_string())
        .split(',')
        .map(|v| v.trim().parse().expect("QFUSE_TIMING_SHAPE: N,C,S,G"))
        .collect();
    let [n, c, s, groups] = shape[..] else {
        panic!("QFUSE_TIMING_SHAPE: N,C,S,G");
    };
    let reps: usize = std::env::var("QFUSE_TIMING_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let mut rng = Rng(38);
    let x = up(&ctx, rng.array4([n, c, s, s]).into_dyn());
    let w = up(&ctx, rng.array4([c, c / groups, 3, 3]).into_dyn());
    let params = p([1, 1], [1, 1], [1, 1], groups);
    let flops = 2.0 * (n * s * s * c * (c / groups) * 9) as f64;
    let mut times = Vec::new();
    for _ in 0..reps + 1 {
        let t = std::time::Instant::now();
        conv2d(&ctx, &x, &w, &params, &ConvEpilogue::none()).unwrap();
        ctx.wait().unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.remove(0);
    let all: Vec<String> = times.iter().map(|t| format!("{t:.0}")).collect();
    times.sort_by(f64::total_cmp);
    println!(
        "{n}x{c}x{s}x{s} g{groups}: median {:.1} ms ({:.2} GFLOP/s), min {:.1} ms; all [{}]",
        times[times.len() / 2],
        flops / times[times.len() / 2] / 1e6,
        times[0],
        all.join(" ")
    );
}
