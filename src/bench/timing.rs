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

/// Times `run` (which must only encode and submit): `reps.warmup` untimed runs, then the
/// median submit-to-completion wall time over the timed runs; then, with `stamps`, as many
/// runs again bracketed by timestamps (so the wall times carry no timestamp overhead) for the
/// median GPU time.
pub(crate) fn measure(
    ctx: &GpuContext,
    stamps: Option<&Stamps>,
    reps: &Reps,
    run: &mut dyn FnMut() -> Result<()>,
) -> Result<Measurement> {
    for _ in 0..reps.warmup {
        run()?;
        ctx.wait()?;
    }
    let mut wall = Vec::new();
    let mut spent = 0.0;
    while wall.len() < reps.min_reps.max(1) || (wall.len() < reps.max_reps && spent < reps.budget_s)
    {
        ctx.wait()?;
        let start = Instant::now();
        run()?;
        ctx.wait()?;
        let s = start.elapsed().as_secs_f64();
        spent += s;
        wall.push(s * 1e3);
    }
    let n = wall.len();
    let gpu_ms = match stamps {
        Some(stamps) => {
            let mut gpu = Vec::with_capacity(n);
            for _ in 0..n {
                ctx.wait()?;
                stamps.mark(ctx, true)?;
                run()?;
                stamps.mark(ctx, false)?;
                ctx.wait()?;
                gpu.push(stamps.elapsed_ms(ctx)?);
            }
            Some(median(&mut gpu))
        }
        None => None,
    };
    Ok(Measurement {
        wall_ms: median(&mut wall),
        gpu_ms,
        reps: n,
    })
}
