//! Kernel timing from GPU timestamps: while [`GpuContext::begin_kernel_timing`] is active,
//! every compute pass [`GpuContext::run`] encodes carries a timestamp at its beginning and
//! its end; [`GpuContext::end_kernel_timing`] resolves them and sums the passes' durations —
//! the device time of the kernels alone, without the gaps between submissions that a
//! first-to-last timestamp span includes. Benchmarks compare it with wall time to show the
//! host overhead of a chain of kernels (encoding, submission, synchronization).

use crate::error::{Error, Result};
use crate::gpu::GpuContext;

/// What [`GpuContext::end_kernel_timing`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KernelTiming {
    /// Compute passes timed.
    pub passes: u32,
    /// Passes encoded after the query set was full (not timed; 0 when the capacity given to
    /// [`GpuContext::begin_kernel_timing`] was enough).
    pub untimed: u32,
    /// The sum of the timed passes' GPU durations, in milliseconds.
    pub gpu_ms: f64,
}

/// One timed compute pass ([`GpuContext::end_kernel_timing_passes`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PassTiming {
    /// The entry points the pass ran, in order, as `shader::entry_point` joined by `+`.
    pub kernels: String,
    /// The pass's GPU duration, in milliseconds.
    pub gpu_ms: f64,
}

/// The active timing: a query set of two timestamps per pass.
pub(crate) struct Profiler {
    pub(crate) query_set: wgpu::QuerySet,
    capacity: u32,
    next: u32,
    untimed: u32,
    labels: Vec<String>,
}

impl Profiler {
    /// The timestamp writes of the next pass, which runs `label`'s kernels, or `None` when
    /// the query set is full.
    pub(crate) fn next_writes(&mut self, label: impl FnOnce() -> String) -> Option<(u32, u32)> {
        if self.next < self.capacity {
            let i = self.next;
            self.next += 1;
            self.labels.push(label());
            Some((2 * i, 2 * i + 1))
        } else {
            self.untimed += 1;
            None
        }
    }
}

/// The most passes one timing may hold: two timestamps each, and wgpu allows 4,096 queries
/// per query set.
pub const MAX_TIMED_PASSES: u32 = 2048;

impl GpuContext {
    /// Starts timing kernels: up to `max_passes` compute passes encoded from now on (by any
    /// launcher, inside or outside a recording) each get a beginning and an end timestamp.
    /// Finish with [`GpuContext::end_kernel_timing`].
    ///
    /// Errors: [`Error::InvalidArgument`] without timestamp queries
    /// ([`GpuContext::has_timestamps`]), for `max_passes` of 0 or above
    /// [`MAX_TIMED_PASSES`], or when a timing is already active.
    pub fn begin_kernel_timing(&self, max_passes: u32) -> Result<()> {
        if !self.has_timestamps() {
            return Err(Error::invalid(
                "kernel timing needs timestamp queries, which this device does not offer",
            ));
        }
        if max_passes == 0 || max_passes > MAX_TIMED_PASSES {
            return Err(Error::invalid(format!(
                "kernel timing: max_passes must be in 1..={MAX_TIMED_PASSES}, got {max_passes}"
            )));
        }
        let mut slot = crate::gpu::runtime::lock(&self.profiler);
        if slot.is_some() {
            return Err(Error::invalid("kernel timing is already active"));
        }
        let query_set = self.scoped("creating a timestamp query set", || {
            self.device().create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("qfuse kernel timing"),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * max_passes,
            })
        })?;
        *slot = Some(Profiler {
            query_set,
            capacity: max_passes,
            next: 0,
            untimed: 0,
            labels: Vec::new(),
        });
        Ok(())
    }

    /// Ends the timing started by [`GpuContext::begin_kernel_timing`]: waits for the GPU,
    /// resolves the timestamps and returns the sum of the passes' durations. The timestamp
    /// readback counts as one download in [`GpuContext::transfer_stats`]: count transfers and
    /// time kernels in separate runs.
    ///
    /// Errors: [`Error::InvalidArgument`] when no timing is active; GPU errors.
    pub fn end_kernel_timing(&self) -> Result<KernelTiming> {
        let (passes, untimed) = self.resolve_kernel_timing()?;
        Ok(KernelTiming {
            passes: passes.len() as u32,
            untimed,
            gpu_ms: passes.iter().map(|p| p.gpu_ms).sum(),
        })
    }

    /// [`GpuContext::end_kernel_timing`] pass by pass: each timed compute pass (one per
    /// [`GpuContext::run`], a recording's launches included) with the kernels it ran, in
    /// the order they were encoded — where a chain of kernels spends its device time.
    ///
    /// Errors: those of [`GpuContext::end_kernel_timing`].
    pub fn end_kernel_timing_passes(&self) -> Result<Vec<PassTiming>> {
        Ok(self.resolve_kernel_timing()?.0)
    }

    /// Ends the active timing: every timed pass with its duration, and the untimed count.
    fn resolve_kernel_timing(&self) -> Result<(Vec<PassTiming>, u32)> {
        // Everything encoded so far (a recording included) is submitted and finished first.
        self.wait()?;
        let profiler = crate::gpu::runtime::lock(&self.profiler)
            .take()
            .ok_or_else(|| Error::invalid("kernel timing is not active"))?;
        let passes = profiler.next;
        if passes == 0 {
            return Ok((Vec::new(), profiler.untimed));
        }
        let bytes = 16 * u64::from(passes);
        let resolve = self.scoped("resolving kernel timestamps", || {
            let resolve = self.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("qfuse kernel timing"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let mut encoder =
                self.device()
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                        label: Some("qfuse kernel timing"),
                    });
            encoder.resolve_query_set(&profiler.query_set, 0..2 * passes, &resolve, 0);
            self.queue().submit([encoder.finish()]);
            resolve
        })?;
        let raw = self.read_buffer(&resolve, bytes)?;
        let period_ns = f64::from(self.queue().get_timestamp_period());
        let stamps: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let timed = stamps
            .chunks_exact(2)
            .zip(profiler.labels)
            .map(|(p, kernels)| PassTiming {
                kernels,
                gpu_ms: p[1].saturating_sub(p[0]) as f64 * period_ns * 1e-6,
            })
            .collect();
        Ok((timed, profiler.untimed))
    }
}
