//! The roofline: achievable memory bandwidth (`copy_vec4`) and arithmetic throughput
//! (`fma_chains`) of the device, each the best over a sweep of override constants
//! (`shaders/roofline.wgsl`).

use bytemuck::{Pod, Zeroable};
use serde::Serialize;

use super::timing::{measure, Measurement, Reps, Stamps};
use super::Progress;
use crate::error::{Error, Result};
use crate::gpu::{Binding, DType, GpuContext, GpuTensor, Kernel, Launch, Shader};

static SHADER: Shader = Shader {
    name: "roofline",
    source: include_str!("../../shaders/roofline.wgsl"),
};

static COPY: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "copy_vec4",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(2),
    ],
};

static FMA: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "fma_chains",
    bindings: &[Binding::uniform(0), Binding::read_write(2)],
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n4: u32,
    iters: u32,
    a: f32,
    b: f32,
}

/// What [`measure_roofline_with`] sweeps and how long it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct RooflineConfig {
    /// `f32` elements copied per run (rounded down to a multiple of 4; a read and a write of
    /// `4 * copy_elems` bytes each).
    pub copy_elems: usize,
    /// Workgroup sizes tried (those above the device's limits are skipped).
    pub workgroup_sizes: Vec<u32>,
    /// vec4s per invocation tried for the copy (`EPT`).
    pub copy_vec4_per_invocation: Vec<u32>,
    /// vec4 fma chains per invocation tried (`CHAINS`: 2, 4, 8 or 16).
    pub fma_chains: Vec<u32>,
    /// Invocations of the fma kernel (at most `copy_elems / 4`, the output's vec4s).
    pub fma_invocations: usize,
    /// The fma loop's trip count is calibrated so one run takes about this long.
    pub fma_target_ms: f64,
    /// Runs per sweep point.
    pub reps: Reps,
}

impl RooflineConfig {
    /// The full sweep: 16M-element copy (64 MiB each way), workgroups 64/128/256, 1/2/4/8
    /// vec4s per invocation, 2/4/8/16 fma chains.
    pub fn full() -> Self {
        Self {
            copy_elems: 1 << 24,
            workgroup_sizes: vec![64, 128, 256],
            copy_vec4_per_invocation: vec![1, 2, 4, 8],
            fma_chains: vec![2, 4, 8, 16],
            fma_invocations: 1 << 20,
            fma_target_ms: 50.0,
            reps: Reps::FULL,
        }
    }

    /// A short sweep for `--quick`: 4M-element copy, workgroups 64/256, 1/4 vec4s per
    /// invocation, 4/8 fma chains.
    pub fn quick() -> Self {
        Self {
            copy_elems: 1 << 22,
            workgroup_sizes: vec![64, 256],
            copy_vec4_per_invocation: vec![1, 4],
            fma_chains: vec![4, 8],
            fma_invocations: 1 << 18,
            fma_target_ms: 20.0,
            reps: Reps::QUICK,
        }
    }

    /// A tiny sweep (tests): 64K elements, one point each.
    pub fn tiny() -> Self {
        Self {
            copy_elems: 1 << 16,
            workgroup_sizes: vec![64],
            copy_vec4_per_invocation: vec![2],
            fma_chains: vec![4],
            fma_invocations: 1 << 12,
            fma_target_ms: 2.0,
            reps: Reps {
                warmup: 1,
                min_reps: 2,
                max_reps: 2,
                budget_s: 0.0,
            },
        }
    }

    /// Sweep points this configuration runs on `ctx` (for progress bars).
    pub fn steps(&self, ctx: &GpuContext) -> usize {
        let wgs = usable_workgroup_sizes(ctx, &self.workgroup_sizes).len();
        wgs * (self.copy_vec4_per_invocation.len() + self.fma_chains.len())
    }
}

/// One point of a sweep.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SweepPoint {
    /// Workgroup size (`WG`).
    pub workgroup_size: u32,
    /// vec4s per invocation (`EPT`, copy) or vec4 fma chains (`CHAINS`, fma).
    pub per_invocation: u32,
    /// Median submit-to-completion time (ms).
    pub wall_ms: f64,
    /// Median GPU time from timestamps (ms), if available.
    pub gpu_ms: Option<f64>,
    /// GB/s (copy) or GFLOP/s (fma) from the wall time.
    pub rate: f64,
    /// The same from the GPU time.
    pub gpu_rate: Option<f64>,
}

/// What the device achieves: the best copy bandwidth and fma throughput over the sweep.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Roofline {
    /// `adapter name (backend)`.
    pub adapter: String,
    /// Best copy bandwidth, GB/s (10⁹ bytes: read + write), from submit-to-completion time.
    pub copy_gbps: f64,
    /// Best fma throughput, GFLOP/s (an fma is 2 flops), from submit-to-completion time.
    pub fma_gflops: f64,
    /// Best copy bandwidth from GPU timestamps, if available.
    pub copy_gpu_gbps: Option<f64>,
    /// Best fma throughput from GPU timestamps, if available.
    pub fma_gpu_gflops: Option<f64>,
    /// The copy point behind `copy_gbps`.
    pub copy_best: SweepPoint,
    /// The fma point behind `fma_gflops`.
    pub fma_best: SweepPoint,
    /// Bytes one copy run moves (read + write).
    pub copy_bytes: u64,
    /// Flops one fma run does.
    pub fma_flops: u64,
    /// Every copy point tried.
    pub copy_sweep: Vec<SweepPoint>,
    /// Every fma point tried.
    pub fma_sweep: Vec<SweepPoint>,
    /// How many times [`crate::bench::run_suite`] measured the best copy point again (between
    /// its sections, and interleaved with each memory-bound kernel); the figures above are the
    /// best of the sweep and all those measurements.
    pub rechecks: usize,
}

fn usable_workgroup_sizes(ctx: &GpuContext, sizes: &[u32]) -> Vec<u32> {
    let l = ctx.limits();
    let max = l
        .max_compute_invocations_per_workgroup
        .min(l.max_compute_workgroup_size_x);
    sizes
        .iter()
        .copied()
        .filter(|&s| s > 0 && s <= max)
        .collect()
}

fn rate(amount: f64, ms: f64) -> f64 {
    amount / (ms.max(1e-9) * 1e-3) * 1e-9
}

fn point(wg: u32, per: u32, m: Measurement, amount: f64) -> SweepPoint {
    SweepPoint {
        workgroup_size: wg,
        per_invocation: per,
        wall_ms: m.wall_ms,
        gpu_ms: m.gpu_ms,
        rate: rate(amount, m.wall_ms),
        gpu_rate: m.gpu_ms.map(|g| rate(amount, g)),
    }
}

fn best(points: &[SweepPoint]) -> Option<SweepPoint> {
    points
        .iter()
        .copied()
        .max_by(|a, b| a.rate.total_cmp(&b.rate))
}

fn best_gpu(points: &[SweepPoint]) -> Option<f64> {
    points
        .iter()
        .filter_map(|p| p.gpu_rate)
        .max_by(f64::total_cmp)
}

/// [`measure_roofline_with`] with [`RooflineConfig::quick`] or [`RooflineConfig::full`].
pub fn measure_roofline(ctx: &GpuContext, quick: bool) -> Result<Roofline> {
    let cfg = if quick {
        RooflineConfig::quick()
    } else {
        RooflineConfig::full()
    };
    measure_roofline_with(ctx, &cfg, &mut |_| {})
}

/// Measures the roofline: every (workgroup size, vec4s per invocation) point of the copy and
/// every (workgroup size, chains) point of the fma kernel, keeping the best of each.
/// `progress` is called after each point.
///
/// Errors: [`Error::InvalidArgument`] for an empty sweep or fewer than 4 elements; GPU errors.
pub fn measure_roofline_with(
    ctx: &GpuContext,
    cfg: &RooflineConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Roofline> {
    let stamps = Stamps::new(ctx)?;
    Ok(sweep(ctx, cfg, stamps.as_ref(), progress)?.0)
}

/// The roofline kernels' buffers and calibrated sizes, kept to measure the best points again
/// later ([`Rig::recheck`]).
pub(crate) struct Rig {
    src: GpuTensor,
    dst: GpuTensor,
    n4: usize,
    n4_u32: u32,
    threads: usize,
    iters: u32,
    reps: Reps,
}

impl Rig {
    fn copy(
        &self,
        ctx: &GpuContext,
        stamps: Option<&Stamps>,
        wg: u32,
        ept: u32,
    ) -> Result<Measurement> {
        let uniform = ctx.params(&Params {
            n4: self.n4_u32,
            iters: 0,
            a: 0.0,
            b: 0.0,
        })?;
        let constants = [("WG", f64::from(wg)), ("EPT", f64::from(ept))];
        let workgroups = ctx.grid_1d(self.n4.div_ceil(ept as usize), wg)?;
        measure(ctx, stamps, &self.reps, &mut || {
            ctx.run(&[Launch {
                kernel: &COPY,
                constants: &constants,
                buffers: &[&uniform, self.src.buffer(), self.dst.buffer()],
                workgroups,
            }])
            .map(|_| ())
        })
    }

    fn fma(
        &self,
        ctx: &GpuContext,
        stamps: Option<&Stamps>,
        reps: &Reps,
        wg: u32,
        chains: u32,
        iters: u32,
    ) -> Result<Measurement> {
        let uniform = ctx.params(&Params {
            n4: self.n4_u32,
            iters,
            a: 0.999,
            b: 0.001,
        })?;
        let constants = [("WG", f64::from(wg)), ("CHAINS", f64::from(chains))];
        let workgroups = ctx.grid_1d(self.threads, wg)?;
        measure(ctx, stamps, reps, &mut || {
            ctx.run(&[Launch {
                kernel: &FMA,
                constants: &constants,
                buffers: &[&uniform, self.dst.buffer()],
                workgroups,
            }])
            .map(|_| ())
        })
    }

    /// Flops of one fma run with `chains` chains.
    fn fma_flops(&self, chains: u32) -> u64 {
        self.threads as u64 * u64::from(self.iters) * u64::from(chains) * 8
    }

    /// A closure launching the best copy point once (encode and submit only), to time
    /// interleaved with a memory-bound kernel; feed its measurement to [`absorb_copy`].
    pub(crate) fn copy_run<'a>(
        &'a self,
        ctx: &'a GpuContext,
        r: &Roofline,
    ) -> Result<impl FnMut() -> Result<()> + 'a> {
        self.copy_run_n4(ctx, r, self.n4)
    }

    /// Like [`Rig::copy_run`], copying only the first `n4` vec4s (at most the rig's own):
    /// a copy of the same bytes as a small kernel, to show the device's cost per call.
    pub(crate) fn copy_run_n4<'a>(
        &'a self,
        ctx: &'a GpuContext,
        r: &Roofline,
        n4: usize,
    ) -> Result<impl FnMut() -> Result<()> + 'a> {
        let (wg, ept) = (r.copy_best.workgroup_size, r.copy_best.per_invocation);
        let n4 = n4.clamp(1, self.n4);
        let uniform = ctx.params(&Params {
            n4: self.n4_u32.min(u32::try_from(n4).unwrap_or(u32::MAX)),
            iters: 0,
            a: 0.0,
            b: 0.0,
        })?;
        let constants = [("WG", f64::from(wg)), ("EPT", f64::from(ept))];
        let workgroups = ctx.grid_1d(n4.div_ceil(ept.max(1) as usize), wg)?;
        Ok(move || {
            ctx.run(&[Launch {
                kernel: &COPY,
                constants: &constants,
                buffers: &[&uniform, self.src.buffer(), self.dst.buffer()],
                workgroups,
            }])
            .map(|_| ())
        })
    }

    /// Measures the best copy and fma points again and raises the roofline where they now run
    /// faster, so a roofline first measured while the host was busy does not stay low (the
    /// suite calls this between its sections).
    pub(crate) fn recheck(
        &self,
        ctx: &GpuContext,
        stamps: Option<&Stamps>,
        r: &mut Roofline,
    ) -> Result<()> {
        let c = r.copy_best;
        let m = self.copy(ctx, stamps, c.workgroup_size, c.per_invocation)?;
        absorb_copy(r, m);
        let f = r.fma_best;
        let m = self.fma(
            ctx,
            stamps,
            &self.reps,
            f.workgroup_size,
            f.per_invocation,
            self.iters,
        )?;
        let p = point(f.workgroup_size, f.per_invocation, m, r.fma_flops as f64);
        if p.rate > r.fma_gflops {
            r.fma_gflops = p.rate;
            r.fma_best = p;
        }
        if let Some(g) = p.gpu_rate {
            r.fma_gpu_gflops = Some(r.fma_gpu_gflops.map_or(g, |old| old.max(g)));
        }
        Ok(())
    }
}

/// Raises the roofline's copy figures with a new measurement of its best copy point (from
/// [`Rig::recheck`] or a [`Rig::copy_run`] timed interleaved with a kernel); returns the
/// measurement's (wall, GPU) rates.
pub(crate) fn absorb_copy(r: &mut Roofline, m: Measurement) -> (f64, Option<f64>) {
    let c = r.copy_best;
    let p = point(c.workgroup_size, c.per_invocation, m, r.copy_bytes as f64);
    if p.rate > r.copy_gbps {
        r.copy_gbps = p.rate;
        r.copy_best = p;
    }
    if let Some(g) = p.gpu_rate {
        r.copy_gpu_gbps = Some(r.copy_gpu_gbps.map_or(g, |old| old.max(g)));
    }
    r.rechecks += 1;
    (p.rate, p.gpu_rate)
}

/// The sweep behind [`measure_roofline_with`], also returning the [`Rig`].
pub(crate) fn sweep(
    ctx: &GpuContext,
    cfg: &RooflineConfig,
    stamps: Option<&Stamps>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(Roofline, Rig)> {
    let wgs = usable_workgroup_sizes(ctx, &cfg.workgroup_sizes);
    let n4 = cfg.copy_elems / 4;
    if wgs.is_empty()
        || cfg.copy_vec4_per_invocation.is_empty()
        || cfg.fma_chains.is_empty()
        || n4 == 0
        || cfg.fma_invocations == 0
    {
        return Err(Error::invalid(format!(
            "roofline sweep needs workgroup sizes within the device limits, vec4s per \
             invocation, fma chains and at least 4 elements; got {cfg:?}"
        )));
    }
    if let Some(&c) = cfg.fma_chains.iter().find(|c| ![2, 4, 8, 16].contains(*c)) {
        return Err(Error::invalid(format!(
            "fma chains must be 2, 4, 8 or 16, got {c}"
        )));
    }
    let total = cfg.steps(ctx);
    let mut done = 0;
    let src_data: Vec<f32> = (0..4 * n4).map(|i| (i % 1021) as f32 * 0.5).collect();
    let src = GpuTensor::from_slice_f32(ctx, &src_data, &[4 * n4])?;
    drop(src_data);
    let dst = GpuTensor::zeros(ctx, &[4 * n4], DType::F32)?;
    let n4_u32 = u32::try_from(n4)
        .map_err(|_| Error::invalid(format!("roofline copy of {n4} vec4s is too large")))?;
    let mut rig = Rig {
        src,
        dst,
        n4,
        n4_u32,
        threads: cfg.fma_invocations.min(u32::MAX as usize),
        iters: 16,
        reps: cfg.reps,
    };
    let copy_bytes = 2 * 16 * n4 as u64;

    // Copy sweep.
    let mut copy_sweep = Vec::new();
    for &wg in &wgs {
        for &ept in &cfg.copy_vec4_per_invocation {
            let ept = ept.max(1);
            let m = rig.copy(ctx, stamps, wg, ept)?;
            copy_sweep.push(point(wg, ept, m, copy_bytes as f64));
            done += 1;
            progress(&Progress {
                done,
                total,
                label: format!("roofline copy wg={wg} ept={ept}"),
            });
        }
    }

    // Fma sweep: calibrate the trip count once (first workgroup size, most chains) so one run
    // takes about `fma_target_ms`.
    let max_chains = cfg.fma_chains.iter().copied().max().unwrap_or(8);
    let once = Reps {
        warmup: 1,
        min_reps: 1,
        max_reps: 1,
        budget_s: 0.0,
    };
    for _ in 0..8 {
        let m = rig.fma(ctx, None, &once, wgs[0], max_chains, rig.iters)?;
        let ratio = cfg.fma_target_ms / m.wall_ms.max(1e-3);
        if (0.5..=2.0).contains(&ratio) {
            break;
        }
        rig.iters = (f64::from(rig.iters) * ratio).clamp(1.0, (1u32 << 24) as f64) as u32;
    }
    let mut fma_sweep = Vec::new();
    for &wg in &wgs {
        for &chains in &cfg.fma_chains {
            let m = rig.fma(ctx, stamps, &cfg.reps, wg, chains, rig.iters)?;
            fma_sweep.push(point(wg, chains, m, rig.fma_flops(chains) as f64));
            done += 1;
            progress(&Progress {
                done,
                total,
                label: format!("roofline fma wg={wg} chains={chains}"),
            });
        }
    }
    let copy_best = best(&copy_sweep).ok_or_else(|| Error::invalid("empty copy sweep"))?;
    let fma_best = best(&fma_sweep).ok_or_else(|| Error::invalid("empty fma sweep"))?;
    let roofline = Roofline {
        adapter: ctx.name(),
        copy_gbps: copy_best.rate,
        fma_gflops: fma_best.rate,
        copy_gpu_gbps: best_gpu(&copy_sweep),
        fma_gpu_gflops: best_gpu(&fma_sweep),
        copy_best,
        fma_best,
        copy_bytes,
        fma_flops: rig.fma_flops(fma_best.per_invocation),
        copy_sweep,
        fma_sweep,
        rechecks: 0,
    };
    Ok((roofline, rig))
}
