//! The GPU runtime: recording scopes, a caller's encoder, the buffer pool, per-submission
//! error capture, tensors bound to their context, transfer counters, and the embedder's
//! contract (error-handler choice, `from_buffer` usage checks, `_into` launcher forms).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};
use qfuse::gpu::{DType, EmbedOptions, GpuContext, GpuTensor, UncapturedErrors};
use qfuse::kernels::{self, GpuQParams};
use qfuse::ops::{Activation, Conv2dParams};
use qfuse::quant::{QParams, QuantRange};
use qfuse::Error;

use crate::common;

/// A context of its own (counters and pool not shared with tests running alongside).
fn fresh() -> Option<GpuContext> {
    common::gpu()?;
    Some(GpuContext::new().expect("a second context on the test adapter"))
}

fn ramp(shape: &[usize]) -> ArrayD<f32> {
    let n: usize = shape.iter().product();
    ArrayD::from_shape_vec(
        IxDyn(shape),
        (0..n).map(|i| (i as f32 * 0.37).sin() * 8.0).collect(),
    )
    .unwrap()
}

/// relu6(relu(x) - ...) chain: three launches.
fn chain(ctx: &GpuContext, x: &GpuTensor) -> qfuse::Result<GpuTensor> {
    let a = kernels::activation::activation(ctx, x, Activation::Relu)?;
    let b = kernels::activation::activation(
        ctx,
        &a,
        Activation::LeakyRelu {
            negative_slope: 0.5,
        },
    )?;
    kernels::activation::activation(ctx, &b, Activation::Relu6)
}

fn recording_submits_once_and_matches_immediate() {
    let Some(ctx) = fresh() else { return };
    let x = GpuTensor::upload_f32(&ctx, &ramp(&[3, 50])).unwrap();
    let want = chain(&ctx, &x).unwrap().download_f32(&ctx).unwrap();
    let before = ctx.pool_stats().submissions;
    let y = ctx.record(|| chain(&ctx, &x)).unwrap();
    assert_eq!(
        ctx.pool_stats().submissions - before,
        1,
        "one submission for 3 launches"
    );
    assert_eq!(y.download_f32(&ctx).unwrap(), want);
    // Nested recordings join the outer one.
    let before = ctx.pool_stats().submissions;
    let y = ctx
        .record(|| {
            let a = ctx.record(|| chain(&ctx, &x))?;
            ctx.record(|| chain(&ctx, &a))
        })
        .unwrap();
    assert_eq!(ctx.pool_stats().submissions - before, 1);
    let want2 = chain(&ctx, &GpuTensor::upload_f32(&ctx, &want).unwrap()).unwrap();
    assert_eq!(
        y.download_f32(&ctx).unwrap(),
        want2.download_f32(&ctx).unwrap()
    );
}

fn readback_inside_a_recording_sees_earlier_launches() {
    let Some(ctx) = common::gpu() else { return };
    let host = ramp(&[2, 3, 5]);
    let x = GpuTensor::upload_f32(&ctx, &host).unwrap();
    let (mid, last) = ctx
        .record(|| {
            let a = kernels::activation::activation(&ctx, &x, Activation::Relu)?;
            let mid = a.download_f32(&ctx)?; // flushes what is recorded
            let b = kernels::activation::activation(&ctx, &a, Activation::Relu6)?;
            Ok((mid, b))
        })
        .unwrap();
    assert_eq!(mid, host.mapv(|v| v.max(0.0)));
    assert_eq!(
        last.download_f32(&ctx).unwrap(),
        host.mapv(|v| v.clamp(0.0, 6.0))
    );
}

/// A repeated step allocates nothing after the first; zeros from reused buffers are zeros,
/// and outputs do not depend on what a reused buffer held.
fn pool_reuses_buffers_and_stale_contents_never_leak() {
    let Some(ctx) = fresh() else { return };
    let host = ramp(&[4, 3, 6, 6]);
    let w = GpuTensor::upload_f32(&ctx, &ramp(&[5, 3, 3, 3])).unwrap();
    let x = GpuTensor::upload_f32(&ctx, &host).unwrap();
    let step = || -> qfuse::Result<ArrayD<f32>> {
        let y = ctx.record(|| {
            let c = kernels::conv2d::conv2d(
                &ctx,
                &x,
                &w,
                &Conv2dParams::default(),
                &kernels::conv2d::ConvEpilogue::none(),
            )?;
            let p = kernels::pool::max_pool2d(&ctx, &c, 2, 2)?;
            kernels::activation::activation(&ctx, &p, Activation::Relu6)
        })?;
        y.download_f32(&ctx)
    };
    let first = step().unwrap();
    let warm = step().unwrap();
    assert_eq!(first, warm);
    let stats = ctx.pool_stats();
    for _ in 0..3 {
        assert_eq!(step().unwrap(), first);
    }
    let after = ctx.pool_stats();
    assert_eq!(
        after.allocations, stats.allocations,
        "{stats:?} -> {after:?}"
    );
    assert!(
        after.reuses >= stats.reuses + 3 * 3,
        "{stats:?} -> {after:?}"
    );
    assert_eq!(after.quarantined_buffers, 0);
    // Fill idle buffers with NaN, then ask for zeros and fresh outputs of those classes.
    let nan = ArrayD::from_elem(IxDyn(&[4, 5, 4, 4]), f32::NAN);
    drop(GpuTensor::upload_f32(&ctx, &nan).unwrap());
    let z = GpuTensor::zeros(&ctx, &[4, 5, 4, 4], DType::F32).unwrap();
    assert!(z.download_f32(&ctx).unwrap().iter().all(|&v| v == 0.0));
    let z = ctx
        .record(|| {
            drop(GpuTensor::upload_f32(&ctx, &nan)?);
            GpuTensor::zeros(&ctx, &[4, 5, 4, 4], DType::F32)
        })
        .unwrap();
    assert!(z.download_f32(&ctx).unwrap().iter().all(|&v| v == 0.0));
    drop(z);
    drop(GpuTensor::upload_f32(&ctx, &nan).unwrap());
    assert_eq!(step().unwrap(), first);
    // Trimming drops the idle buffers.
    let freed = ctx.trim_pool();
    assert!(freed > 0);
    assert_eq!(ctx.pool_stats().idle_bytes, 0);
    assert_eq!(step().unwrap(), first);
}

fn tensors_of_another_context_are_refused() {
    let Some(ctx) = common::gpu() else { return };
    // Another instance, another device.
    let other = GpuContext::new().unwrap();
    assert_ne!(ctx.id(), other.id());
    let host = ramp(&[2, 8]);
    let mine = GpuTensor::upload_f32(&ctx, &host).unwrap();
    let theirs = GpuTensor::upload_f32(&other, &host).unwrap();
    assert_eq!(theirs.context_id(), other.id());
    let is_mismatch = |e: Error, what: &str| match e {
        Error::ContextMismatch {
            what: ref w,
            ref tensor_context,
            ref context,
        } => {
            assert_eq!(w, what);
            assert!(tensor_context.contains(&other.id().to_string()), "{e}");
            assert!(context.contains(&ctx.id().to_string()), "{e}");
        }
        e => panic!("expected ContextMismatch, got {e:?}"),
    };
    let e = kernels::activation::activation(&ctx, &theirs, Activation::Relu).unwrap_err();
    is_mismatch(e, "activation input");
    let w = GpuTensor::upload_f32(&other, &ramp(&[3, 8])).unwrap();
    let e = kernels::linear::linear(&ctx, &mine, &w, None).unwrap_err();
    is_mismatch(e, "linear weight");
    let qp = GpuQParams::upload(&other, &QParams::per_tensor(0.1, 0)).unwrap();
    let e = kernels::fake_quant::fake_quant(&ctx, &mine, &qp, QuantRange::INT8).unwrap_err();
    is_mismatch(e, "qparams");
    let e = theirs.download_f32(&ctx).unwrap_err();
    is_mismatch(e, "downloaded tensor");
    // An output of another context in an `_into` form.
    let out = GpuTensor::zeros(&other, &[2, 8], DType::F32).unwrap();
    let e = kernels::activation::activation_into(&ctx, &mine, Activation::Relu, &out).unwrap_err();
    is_mismatch(e, "activation output");
    // Each still works on its own context.
    let y = kernels::activation::activation(&other, &theirs, Activation::Relu).unwrap();
    assert_eq!(y.download_f32(&other).unwrap(), host.mapv(|v| v.max(0.0)));
}

fn transfer_counters_count_both_ways() {
    let Some(ctx) = fresh() else { return };
    let before = ctx.transfer_stats();
    let x = GpuTensor::upload_f32(&ctx, &ramp(&[10])).unwrap();
    let y = ctx.record(|| chain(&ctx, &x)).unwrap();
    let _ = y.download_f32(&ctx).unwrap();
    let d = ctx.transfer_stats().since(&before);
    assert_eq!((d.uploads, d.upload_bytes), (1, 40));
    assert_eq!((d.downloads, d.download_bytes), (1, 40));
    assert_eq!(d.transfers(), 2);
    assert_eq!(d.param_writes, 3, "one parameter block per launch");
}

fn encode_into_a_callers_encoder_submits_nothing() {
    let Some(ctx) = fresh() else { return };
    let host = ramp(&[3, 7]);
    let x = GpuTensor::upload_f32(&ctx, &host).unwrap();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    let before = ctx.pool_stats().submissions;
    let y = ctx
        .encode_into(&mut encoder, || {
            let a = kernels::activation::activation(&ctx, &x, Activation::Relu)?;
            // No readback while the caller's encoder is open.
            let e = a.download_f32(&ctx).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
            // No nested recording of another kind.
            let mut other = ctx.device().create_command_encoder(&Default::default());
            assert!(ctx.encode_into(&mut other, || Ok(())).is_err());
            kernels::activation::activation(&ctx, &a, Activation::Relu6)
        })
        .unwrap();
    assert_eq!(
        ctx.pool_stats().submissions,
        before,
        "qfuse submitted nothing"
    );
    assert!(ctx.pool_stats().quarantined_buffers == 0);
    ctx.queue().submit([encoder.finish()]);
    assert_eq!(
        y.download_f32(&ctx).unwrap(),
        host.mapv(|v| v.clamp(0.0, 6.0))
    );
    // The intermediate freed inside went back to the pool once the work was done.
    ctx.wait().unwrap();
    let idle = ctx.pool_stats().idle_buffers;
    assert!(idle > 0);
}

/// A validation error inside a recording is an `Error::Gpu` at its end, not a panic.
fn errors_are_caught_per_recording() {
    // A context of its own: a recording on the shared one by a test on another thread would
    // make this `record` run unbatched, without the recording's error scopes.
    let Some(ctx) = fresh() else { return };
    let e = ctx
        .record(|| {
            let _bad = ctx.device().create_buffer(&qfuse::wgpu::BufferDescriptor {
                label: Some("invalid on purpose"),
                size: 16,
                usage: qfuse::wgpu::BufferUsages::MAP_READ | qfuse::wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            });
            Ok(())
        })
        .unwrap_err();
    assert!(matches!(e, Error::Gpu(_)), "{e:?}");
    assert!(ctx.take_uncaptured_error().is_none());
    // The context still works.
    let x = GpuTensor::upload_f32(&ctx, &ramp(&[4])).unwrap();
    assert!(ctx.record(|| chain(&ctx, &x)).is_ok());
}

fn from_buffer_names_the_missing_usage() {
    let Some(ctx) = common::gpu() else { return };
    let make = |usage| {
        ctx.device().create_buffer(&qfuse::wgpu::BufferDescriptor {
            label: Some("caller's"),
            size: 64,
            usage,
            mapped_at_creation: false,
        })
    };
    use qfuse::wgpu::BufferUsages as U;
    let e = GpuTensor::from_buffer(&ctx, make(U::COPY_SRC | U::COPY_DST), &[4], DType::F32)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::MissingBufferUsage {
                missing: "STORAGE",
                ..
            }
        ),
        "{e}"
    );
    let e = GpuTensor::from_buffer(&ctx, make(U::STORAGE), &[32], DType::F32).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    // STORAGE only: kernels can write it, but it cannot be downloaded.
    let out = GpuTensor::from_buffer(&ctx, make(U::STORAGE), &[4], DType::F32).unwrap();
    let x = GpuTensor::upload_f32(&ctx, &ramp(&[4])).unwrap();
    kernels::activation::activation_into(&ctx, &x, Activation::Relu, &out).unwrap();
    let e = out.download_f32(&ctx).unwrap_err();
    assert!(
        matches!(
            e,
            Error::MissingBufferUsage {
                missing: "COPY_SRC",
                ..
            }
        ),
        "{e}"
    );
    // With COPY_SRC too, the caller's buffer holds the result, and stays the caller's.
    let buffer = make(U::STORAGE | U::COPY_SRC);
    let out = GpuTensor::from_buffer(&ctx, buffer.clone(), &[4], DType::F32).unwrap();
    kernels::activation::activation_into(&ctx, &x, Activation::Relu, &out).unwrap();
    assert_eq!(
        out.download_f32(&ctx).unwrap(),
        ramp(&[4]).mapv(|v| v.max(0.0))
    );
    let idle = ctx.pool_stats().idle_buffers;
    drop(out);
    assert_eq!(
        ctx.pool_stats().idle_buffers,
        idle,
        "a caller's buffer is not pooled"
    );
}

/// `_into` forms check their output with one shared check.
fn into_forms_check_the_callers_output() {
    let Some(ctx) = common::gpu() else { return };
    let x = GpuTensor::upload_f32(&ctx, &ramp(&[2, 3])).unwrap();
    let wrong_shape = GpuTensor::zeros(&ctx, &[3, 2], DType::F32).unwrap();
    let e =
        kernels::activation::activation_into(&ctx, &x, Activation::Relu, &wrong_shape).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    let wrong_type = GpuTensor::zeros(&ctx, &[2, 3], DType::U32).unwrap();
    let e = kernels::pool::log_softmax_into(&ctx, &x, &wrong_type).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument(ref m) if m.contains("F32")),
        "{e}"
    );
    let e = kernels::activation::activation_into(&ctx, &x, Activation::Relu, &x).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument(ref m) if m.contains("share")),
        "{e}"
    );
    let w = GpuTensor::upload_f32(&ctx, &ramp(&[4, 3])).unwrap();
    let y = GpuTensor::zeros(&ctx, &[2, 4], DType::F32).unwrap();
    kernels::linear::linear_act_into(&ctx, &x, &w, None, Activation::None, &y).unwrap();
    assert_eq!(
        y.download_f32(&ctx).unwrap(),
        kernels::linear::linear(&ctx, &x, &w, None)
            .unwrap()
            .download_f32(&ctx)
            .unwrap()
    );
}

/// `from_device` leaves the engine's handler alone; `Chain` calls it after recording.
fn embedder_chooses_the_uncaptured_error_handler() {
    let Some(_) = common::gpu() else { return };
    let own = GpuContext::new().unwrap();
    let (device, queue) = (own.device().clone(), own.queue().clone());
    let seen = Arc::new(AtomicUsize::new(0));
    let engine = {
        let seen = Arc::clone(&seen);
        Arc::new(move |_e: qfuse::wgpu::Error| {
            seen.fetch_add(1, Ordering::SeqCst);
        })
    };
    let provoke = |d: &qfuse::wgpu::Device| {
        let _ = d.create_buffer(&qfuse::wgpu::BufferDescriptor {
            label: Some("invalid on purpose"),
            size: 16,
            usage: qfuse::wgpu::BufferUsages::MAP_READ | qfuse::wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
    };
    device.on_uncaptured_error(engine.clone());
    let kept = GpuContext::from_device(device.clone(), queue.clone()).unwrap();
    provoke(&device);
    assert_eq!(seen.load(Ordering::SeqCst), 1, "the engine's handler stays");
    assert!(kept.take_uncaptured_error().is_none());
    let chained = GpuContext::from_device_with(
        device.clone(),
        queue,
        EmbedOptions {
            uncaptured_errors: UncapturedErrors::Chain(engine),
            ..Default::default()
        },
    )
    .unwrap();
    provoke(&device);
    assert_eq!(
        seen.load(Ordering::SeqCst),
        2,
        "chained to the engine's handler"
    );
    assert!(chained.take_uncaptured_error().is_some());
    // qfuse's own work never reaches the handler, whatever the choice.
    let x = GpuTensor::upload_f32(&kept, &ramp(&[4])).unwrap();
    let _ = chain(&kept, &x).unwrap().download_f32(&kept).unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 2);
}

/// Kernel timing: every pass of a chain is timestamped (inside a recording too), the sum is
/// positive and at most the wall time; misuse is refused.
fn kernel_timing_sums_every_pass() {
    // A context of its own: timing covers every pass encoded on a context, and other tests
    // run in parallel on the shared one.
    let Some(ctx) = fresh() else { return };
    assert!(ctx.end_kernel_timing().is_err(), "not active");
    if !ctx.has_timestamps() {
        assert!(ctx.begin_kernel_timing(8).is_err());
        return;
    }
    assert!(ctx.begin_kernel_timing(0).is_err());
    assert!(ctx
        .begin_kernel_timing(qfuse::gpu::MAX_TIMED_PASSES + 1)
        .is_err());
    let x = GpuTensor::from_slice_f32(&ctx, &vec![0.5; 1 << 16], &[1 << 16]).unwrap();
    ctx.begin_kernel_timing(3).unwrap();
    assert!(ctx.begin_kernel_timing(3).is_err(), "already active");
    let t = std::time::Instant::now();
    ctx.record(|| {
        let mut y = x.clone();
        for _ in 0..4 {
            y = kernels::activation::activation(&ctx, &y, Activation::Relu6)?;
        }
        Ok(y)
    })
    .unwrap();
    let timing = ctx.end_kernel_timing().unwrap();
    let wall = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!((timing.passes, timing.untimed), (3, 1), "{timing:?}");
    assert!(
        timing.gpu_ms > 0.0 && timing.gpu_ms <= wall,
        "{timing:?}, wall {wall} ms"
    );
    // Timing again works; passes outside a timing carry no timestamps.
    kernels::activation::activation(&ctx, &x, Activation::Relu).unwrap();
    ctx.begin_kernel_timing(8).unwrap();
    kernels::activation::activation(&ctx, &x, Activation::Relu).unwrap();
    assert_eq!(ctx.end_kernel_timing().unwrap().passes, 1);
    // Pass by pass: each pass named by its kernels, in order, the same sum.
    assert!(ctx.end_kernel_timing_passes().is_err(), "not active");
    ctx.begin_kernel_timing(8).unwrap();
    let y = kernels::activation::activation(&ctx, &x, Activation::Relu).unwrap();
    let qp = GpuQParams::upload(&ctx, &QParams::per_tensor(0.1, 0)).unwrap();
    kernels::fake_quant::fake_quant(&ctx, &y, &qp, QuantRange::INT8).unwrap();
    let passes = ctx.end_kernel_timing_passes().unwrap();
    let names: Vec<&str> = passes.iter().map(|p| p.kernels.as_str()).collect();
    assert_eq!(names.len(), 2, "{passes:?}");
    assert!(names[0].starts_with("activation::"), "{passes:?}");
    assert!(names[1].starts_with("fake_quant::"), "{passes:?}");
    assert!(passes.iter().all(|p| p.gpu_ms > 0.0), "{passes:?}");
}

crate::qfuse_tests! {
    kernel_timing_sums_every_pass: gpu,
    recording_submits_once_and_matches_immediate: gpu,
    readback_inside_a_recording_sees_earlier_launches: gpu,
    pool_reuses_buffers_and_stale_contents_never_leak: gpu,
    tensors_of_another_context_are_refused: gpu,
    transfer_counters_count_both_ways: gpu,
    encode_into_a_callers_encoder_submits_nothing: gpu,
    errors_are_caught_per_recording: gpu,
    from_buffer_names_the_missing_usage: gpu,
    into_forms_check_the_callers_output: gpu,
    embedder_chooses_the_uncaptured_error_handler: gpu,
}
