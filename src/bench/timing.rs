//! Timing: submit-to-completion wall time (encode, submit, wait for the device), and GPU time
//! from timestamp queries when the device has [`wgpu::Features::TIMESTAMP_QUERY`].

use std::time::Instant;

use crate::error::{Error, Result};
use crate::gpu::GpuContext;

/// How many times to run a kernel: `warmup` untimed runs, then timed runs until at least
/// `min_reps` ran and either `max_reps` ran or `budget_s` seconds were spent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reps {
    /// Untimed runs first (pipeline compilation, first-use buffer initialization, caches).
    pub warmup: usize,
    /// Fewest timed runs.
    pub min_reps: usize,
    /// Most timed runs.
    pub max_reps: usize,
    /// Stop adding timed runs (past `min_reps`) once they took this long in total.
    pub budget_s: f64,
}

impl Reps {
    /// Few runs, for `--quick`.
    pub const QUICK: Self = Self {
        warmup: 1,
        min_reps: 3,
        max_reps: 7,
        budget_s: 0.15,
    };
    /// The full suite's runs.
    pub const FULL: Self = Self {
        warmup: 2,
        min_reps: 5,
        max_reps: 25,
        budget_s: 1.0,
    };
}

/// The median times of one kernel (or chain of kernels).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measurement {
    /// Median submit-to-completion wall time: encode, submit, wait for the device (ms).
    pub wall_ms: f64,
    /// Median GPU time between a timestamp written before the first submission and one
    /// written after the last (ms); `None` without `TIMESTAMP_QUERY`.
    pub gpu_ms: Option<f64>,
    /// Timed runs behind each median.
    pub reps: usize,
}

/// The median of `v` (0 for an empty slice).
pub(crate) fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

/// A two-entry timestamp query set and its resolve buffer. A timestamp is written by an empty
/// compute pass in its own submission before the work (beginning of pass) and after it (end
/// of pass); on Vulkan both are bottom-of-pipe writes, so the difference spans the device
/// time from the first of the work's submissions to the end of the last.
pub(crate) struct Stamps {
    query_set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    period_ns: f64,
}

impl Stamps {
    /// `None` when the context has no timestamp queries.
    pub(crate) fn new(ctx: &GpuContext) -> Result<Option<Self>> {
        if !ctx.has_timestamps() {
            return Ok(None);
        }
        let (query_set, resolve) = ctx.scoped("creating a timestamp query set", || {
            let query_set = ctx.device().create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("qfuse bench timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            });
            let resolve = ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("qfuse bench timestamps"),
                size: 16,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            (query_set, resolve)
        })?;
        Ok(Some(Self {
            query_set,
            resolve,
            period_ns: f64::from(ctx.queue().get_timestamp_period()),
        }))
    }

    /// Submits an empty compute pass writing timestamp 0 (`begin`) or timestamp 1 and the
    /// resolve of both (`!begin`).
    fn mark(&self, ctx: &GpuContext, begin: bool) -> Result<()> {
        ctx.scoped("writing a timestamp", || {
            let mut encoder =
                ctx.device()
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                        label: Some("qfuse bench timestamp"),
                    });
            {
                let _pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("qfuse bench timestamp"),
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: &self.query_set,
                        beginning_of_pass_write_index: begin.then_some(0),
                        end_of_pass_write_index: (!begin).then_some(1),
                    }),
                });
            }
            if !begin {
                encoder.resolve_query_set(&self.query_set, 0..2, &self.resolve, 0);
            }
            ctx.queue().submit([encoder.finish()]);
        })
    }

    /// The last resolved interval in milliseconds.
    fn elapsed_ms(&self, ctx: &GpuContext) -> Result<f64> {
        let bytes = ctx.read_buffer(&self.resolve, 16)?;
        let word = |i: usize| -> Result<u64> {
            bytes
                .get(8 * i..8 * i + 8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_le_bytes)
                .ok_or_else(|| Error::Gpu("short timestamp readback".to_string()))
        };
        let (t0, t1) = (word(0)?, word(1)?);
        Ok(t1.wrapping_sub(t0) as f64 * self.period_ns * 1e-6)
    }
}

/// Runs at least this long (ms, judged by the last warm-up run) take their GPU timestamps in
/// the timed runs themselves: the end-of-work timestamp adds one tiny submission (tens of µs)
/// to a run of at least this length. Shorter runs are timed with timestamps in runs of their
/// own, so their wall times carry no timestamp work.
const COMBINED_MS: f64 = 25.0;

/// Times `run` (which must only encode and submit): `reps.warmup` untimed runs, then the
/// median submit-to-completion wall time over the timed runs. With `stamps`, also the median
/// GPU time: for runs of [`COMBINED_MS`] or more from the same runs, else from as many runs
/// again, each bracketed by timestamps.
pub(crate) fn measure(
    ctx: &GpuContext,
    stamps: Option<&Stamps>,
    reps: &Reps,
    run: &mut dyn FnMut() -> Result<()>,
) -> Result<Measurement> {
    let mut out = measure_interleaved(ctx, stamps, reps, &mut [run])?;
    out.pop()
        .ok_or_else(|| Error::Gpu("no measurement".to_string()))
}

/// One timed run of `run`: submit-to-completion wall time (ms) and, with `stamps`, the GPU
/// time (ms) between timestamps written before and after it.
fn timed_run(
    ctx: &GpuContext,
    stamps: Option<&Stamps>,
    run: &mut dyn FnMut() -> Result<()>,
) -> Result<(f64, Option<f64>)> {
    ctx.wait()?;
    if let Some(stamps) = stamps {
        stamps.mark(ctx, true)?;
        ctx.wait()?;
    }
    let start = Instant::now();
    run()?;
    if let Some(stamps) = stamps {
        stamps.mark(ctx, false)?;
    }
    ctx.wait()?;
    let wall = start.elapsed().as_secs_f64() * 1e3;
    let gpu = match stamps {
        Some(stamps) => Some(stamps.elapsed_ms(ctx)?),
        None => None,
    };
    Ok((wall, gpu))
}

/// [`measure`] for several runs at once, interleaved (a, b, a, b, ...), so that each sees the
/// same conditions (host load on a CPU adapter, clocks): the way fused and unfused chains are
/// compared. Every run gets the same number of timed runs.
pub(crate) fn measure_interleaved(
    ctx: &GpuContext,
    stamps: Option<&Stamps>,
    reps: &Reps,
    runs: &mut [&mut dyn FnMut() -> Result<()>],
) -> Result<Vec<Measurement>> {
    let k = runs.len();
    let mut last_ms = vec![0.0; k];
    for _ in 0..reps.warmup {
        for (run, last) in runs.iter_mut().zip(&mut last_ms) {
            *last = timed_run(ctx, None, *run)?.0;
        }
    }
    let long = reps.warmup > 0 && last_ms.iter().all(|&t| t >= COMBINED_MS);
    let combined = stamps.filter(|_| long);
    let mut wall = vec![Vec::new(); k];
    let mut gpu = vec![Vec::new(); k];
    let mut spent = 0.0;
    let mut n = 0;
    while n < reps.min_reps.max(1) || (n < reps.max_reps && spent < reps.budget_s) {
        for (i, run) in runs.iter_mut().enumerate() {
            let (w, g) = timed_run(ctx, combined, *run)?;
            spent += w * 1e-3;
            wall[i].push(w);
            gpu[i].extend(g);
        }
        n += 1;
    }
    if let (Some(stamps), None) = (stamps, combined) {
        for _ in 0..n {
            for (i, run) in runs.iter_mut().enumerate() {
                gpu[i].extend(timed_run(ctx, Some(stamps), *run)?.1);
            }
        }
    }
    Ok(wall
        .into_iter()
        .zip(gpu)
        .map(|(mut w, mut g)| Measurement {
            wall_ms: median(&mut w),
            gpu_ms: stamps.map(|_| median(&mut g)),
            reps: n,
        })
        .collect())
}
