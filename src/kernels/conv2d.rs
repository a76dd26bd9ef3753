//! conv2d on the GPU (`shaders/conv2d.wgsl`): the forward with a fused per-channel epilogue
//! (`y = act(acc * out_scale[o] + bias[o])`), the input and weight gradients, and the
//! per-channel sum that gives the bias gradient. Shapes, settings and errors are those of
//! [`crate::reference::conv2d`] (validated with [`Conv2dParams::output_shape`]); results match
//! it up to f32 summation order.
//!
//! # Kernels
//! - **Forward, implicit GEMM** (`forward_gemm`): per group, `Y[OG, N·OH·OW] = W[OG, K] ·
//!   X[K, N·OH·OW]` with `K = C/groups · KH · KW`. The im2col matrix `X` is never
//!   materialized: each workgroup gathers 16-deep slices of it (and of the weight) into
//!   workgroup memory and computes a 64 output channels × 64 output pixels tile, each of its
//!   256 invocations a 4×4 register tile. The epilogue (scale, bias, activation) is applied
//!   before the single store.
//! - **Forward, direct** (`forward_direct`): one invocation per output; any conv (a candidate
//!   for depthwise and small grouped convs, where a 64-channel tile would mostly idle).
//! - **Forward, register-blocked** (`forward_reg`): no workgroup memory, no barriers: each
//!   invocation computes up to 8 output channels × 8 consecutive output pixels in registers,
//!   reading `x` and `w` straight from storage and reusing each loaded input for all its
//!   channels and each weight for all its pixels; 3-wide stride-1 kernel rows get a
//!   specialised inner loop. Its tile is set by override constants (see [`RegTile`]). On
//!   llvmpipe every storage / workgroup-memory load is a per-lane scalar loop and a barrier a
//!   coroutine switch, which is what holds `forward_gemm` back there.
//! - **Forward, register-blocked with subgroups** (`forward_sg`, `shaders/conv2d_subgroup.wgsl`):
//!   for devices with [`wgpu::Features::SUBGROUP`] and groups of at least 8 output channels.
//!   The `forward_reg` scheme with 8 or 16 channels per
//!   invocation, where lane `l` of a subgroup loads the weights of channel `l & 7` (and
//!   `8 + (l & 7)`) and the others take them with `subgroupBroadcast`. A run-time check
//!   (subgroup size and a ballot of lanes 0..7, uniform over the subgroup) falls back to
//!   per-invocation weight loads, so any subgroup size gives the same results. A module of
//!   its own: devices without subgroups never compile it. For 3×3 kernels at stride 1,
//!   dilation 1, `forward_sg_r2` computes two output rows per invocation ([`RegTile::rows`]),
//!   so each input row loaded serves every kernel row of both output rows that reads it
//!   (4 row loads per input channel for 2 output rows instead of 6) and each broadcast weight
//!   both rows; `forward_sg_r4` computes four (6 row loads for 4 output rows).
//! - **Forward, depthwise** (`forward_dw`, [`ConvVariant::Depthwise`]): depthwise 3×3 convs at
//!   stride 1, dilation 1, padding 1 in width, output width a multiple of 4 ([`dw_ok`]; the
//!   MobileNet layer). Such a conv does 2.25 flop per byte, so it is memory-bound: each
//!   invocation computes 4 output rows of one channel plane, walking them left to right a
//!   `vec4` at a time with the current and next `vec4` of its 6 input rows in registers, so
//!   each step loads 6 `vec4`s and stores 4 for 16 outputs (`forward_reg` loads 10 scalars
//!   per kernel row for 8 outputs of one row). The first candidate and the untuned choice
//!   where it applies.
//!
//! # Choosing the forward kernel
//! [`ConvAlgorithm::Auto`] chooses among a bounded set of variants ([`ConvVariant::all`]: the
//! kernels above with their tiles as override constants fixed per variant, never per shape,
//! so a new shape reuses compiled pipelines) by timing: the first conv of a shape class
//! ([`shape_class`]: kernel geometry and power-of-two buckets of channels, output size and
//! work) times its candidates ([`candidates`]) on scratch tensors and keeps the fastest per
//! context, and in the context's tuning file when it has a cache directory
//! ([`crate::gpu::ContextOptions::cache_dir`]). No adapter heuristic is involved; convs below
//! [`TUNE_MIN_MACS`] run the register-blocked kernel untimed ([`untuned_variant`]).
//! - **Backward input** (`backward_input`): a gather, one invocation per `dx` element summing
//!   over the kernel taps and the output channels of its group that read it.
//! - **Backward weight** (`backward_weight`): one workgroup per weight element, splitting the
//!   `N·OH·OW` reduction over 256 invocations and reducing in workgroup memory.
//! - **Channel sum** (`channel_sum`): one workgroup per channel, the same reduction.
//! - **Transposed conv** (`transpose_forward`, [`conv_transpose2d`]): the backward-input
//!   gather (a transposed conv *is* the input gradient of the conv with the same weight),
//!   followed by the epilogue (bias, activation) on the transposed conv's output channel.
//!
//! Every grid is tiled over x and y past the 65,535-workgroups-per-dimension limit.

use bytemuck::{Pod, Zeroable};

use super::{check_output, expect_f32, output, to_u32, WG_CONSTANTS, WORKGROUP_SIZE};
use crate::error::{Error, Result};
use crate::gpu::{Binding, DType, GpuContext, GpuTensor, Kernel, Launch, Shader};
use crate::ops::{Activation, Conv2dParams, ConvTranspose2dParams};

pub(super) static SHADER: Shader = Shader {
    name: "conv2d",
    source: concat!(
        include_str!("../../shaders/lib/float_bits.wgsl"),
        include_str!("../../shaders/lib/activation.wgsl"),
        include_str!("../../shaders/lib/partial_run.wgsl"),
        include_str!("../../shaders/conv2d.wgsl")
    ),
};

const FORWARD_BINDINGS: &[Binding] = &[
    Binding::uniform(0),
    Binding::read(1),
    Binding::read(2),
    Binding::read_write(3),
    Binding::read(4),
    Binding::read(5),
];

/// The subgroup forward (`forward_sg`): a module of its own, since only devices with
/// [`wgpu::Features::SUBGROUP`] can compile it.
pub(super) static SUBGROUP_SHADER: Shader = Shader {
    name: "conv2d_subgroup",
    source: concat!(
        include_str!("../../shaders/lib/float_bits.wgsl"),
        include_str!("../../shaders/lib/activation.wgsl"),
        include_str!("../../shaders/conv2d_subgroup.wgsl")
    ),
};

static FORWARD_SG: Kernel = Kernel {
    shader: &SUBGROUP_SHADER,
    entry_point: "forward_sg",
    bindings: FORWARD_BINDINGS,
};

static FORWARD_SG_R2: Kernel = Kernel {
    shader: &SUBGROUP_SHADER,
    entry_point: "forward_sg_r2",
    bindings: FORWARD_BINDINGS,
};

static FORWARD_SG_R4: Kernel = Kernel {
    shader: &SUBGROUP_SHADER,
    entry_point: "forward_sg_r4",
    bindings: FORWARD_BINDINGS,
};

static FORWARD_GEMM: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "forward_gemm",
    bindings: FORWARD_BINDINGS,
};

static FORWARD_DIRECT: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "forward_direct",
    bindings: FORWARD_BINDINGS,
};

static FORWARD_REG: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "forward_reg",
    bindings: FORWARD_BINDINGS,
};

static FORWARD_DW: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "forward_dw",
    bindings: &[
        Binding::uniform(0),
        Binding::read(2),
        Binding::read(4),
        Binding::read(5),
        Binding::read(7),
        Binding::read_write(8),
        Binding::read_write(9),
    ],
};

/// Invocations per workgroup of `forward_dw` (`DW_WG` in the shader).
const DW_WORKGROUP: usize = 64;

/// Output rows per `forward_dw` invocation (`DW_ROWS` in the shader).
const DW_ROWS: usize = 4;

static BACKWARD_INPUT: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "backward_input",
    bindings: &[
        Binding::uniform(0),
        Binding::read(2),
        Binding::read_write(3),
        Binding::read(6),
    ],
};

static TRANSPOSE_FORWARD: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "transpose_forward",
    bindings: &[
        Binding::uniform(0),
        Binding::read(2),
        Binding::read_write(3),
        Binding::read(4),
        Binding::read(5),
        Binding::read(6),
    ],
};

static BACKWARD_WEIGHT: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "backward_weight",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(3),
        Binding::read(6),
    ],
};

static CHANNEL_SUM: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "channel_sum",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(3),
    ],
};

/// Output channels × output pixels of one `forward_gemm` workgroup tile.
pub const GEMM_TILE: [usize; 2] = [64, 64];

/// The implicit GEMM is a tuning candidate when a group has at least this many output
/// channels (below that its 64-channel tile mostly idles).
pub const GEMM_MIN_CHANNELS_PER_GROUP: usize = 16;

/// Invocations per workgroup of every register-blocked and subgroup variant
/// ([`ConvVariant`]): fixed, so that a new shape reuses the pipelines already compiled.
/// Invocations past the last pixel block leave at once (`forward_reg`) or, in the subgroup
/// kernels, as whole subgroups, so a workgroup larger than the work wastes little.
pub const VARIANT_WORKGROUP: u32 = 64;

/// Convs of fewer multiply-adds than this (`N·O·OH·OW·(C/g)·KH·KW`) run [`untuned_variant`]
/// without tuning under [`ConvAlgorithm::Auto`]: timing candidates (compiling each) would cost
/// more than any of them could save.
pub const TUNE_MIN_MACS: u64 = 1 << 22;

/// Which forward kernel [`conv2d_with_algorithm`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvAlgorithm {
    /// Chosen by timing, once per context and shape class (see [`shape_class`]): the first
    /// conv of a class times each of its candidate variants ([`candidates`]) on scratch
    /// tensors of its shape and keeps the fastest, in memory and, when the context has a
    /// cache directory ([`crate::gpu::ContextOptions::cache_dir`]), in its tuning file, so a
    /// later context on the same adapter starts with it. The scratch runs are submitted on
    /// their own, ahead of anything a recording ([`GpuContext::record`] /
    /// [`GpuContext::encode_into`]) holds, and waited for. Convs below [`TUNE_MIN_MACS`]
    /// run [`untuned_variant`] untimed. Every candidate gives the same results up to
    /// summation order.
    #[default]
    Auto,
    /// The tiled implicit GEMM (`forward_gemm`).
    ImplicitGemm,
    /// One invocation per output (`forward_direct`).
    Direct,
    /// Register-blocked, no workgroup memory (`forward_reg`), with the tile [`RegTile::for_conv`]
    /// picks.
    RegisterBlocked,
    /// `forward_reg` with an explicit tile (tests and tuning; results do not depend on it).
    RegisterBlockedWith(RegTile),
    /// The register-blocked forward with its weights shared through subgroup operations
    /// (`forward_sg` of `shaders/conv2d_subgroup.wgsl`), with the tile
    /// [`RegTile::for_subgroup_conv`] picks. Needs a device with [`wgpu::Features::SUBGROUP`]
    /// ([`GpuContext::has_subgroups`]); correct for any subgroup size.
    Subgroup,
    /// `forward_sg` with an explicit tile: `channels` 8 or 16 (tests and tuning; results do
    /// not depend on it).
    SubgroupWith(RegTile),
    /// One variant of the bounded set [`ConvVariant::all`] (what `Auto` chooses from).
    Variant(ConvVariant),
}

/// One forward kernel with its compile-time tile: the bounded set [`ConvAlgorithm::Auto`]
/// chooses from. Each is one pipeline (override constants fixed per variant, never per shape),
/// so a workload compiles at most [`ConvVariant::all`]`().len()` conv forward pipelines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConvVariant {
    /// `forward_direct`: one invocation per output.
    Direct,
    /// `forward_gemm`: the tiled implicit GEMM in workgroup memory.
    Gemm,
    /// `forward_reg` with `channels` (1, 2, 4 or 8) output channels × 8 pixels per
    /// invocation; `k3`: the 3-tap row loop (applied only where the conv has `KW == 3` at
    /// stride 1, dilation 1 in width).
    Reg {
        /// Output channels per invocation.
        channels: u32,
        /// The 3-tap inner loop.
        k3: bool,
    },
    /// The subgroup kernels: `channels` (8 or 16) × 8 pixels × `rows` (1: `forward_sg`, with
    /// `k3` as for `Reg`; 2: `forward_sg_r2`; 4: `forward_sg_r4`, both for 3×3 kernels at
    /// stride 1, dilation 1 only). Needs [`wgpu::Features::SUBGROUP`].
    Subgroup {
        /// Output channels per invocation.
        channels: u32,
        /// Output rows per invocation.
        rows: u32,
        /// The 3-tap inner loop (rows = 1 only).
        k3: bool,
    },
    /// `forward_dw`: depthwise 3×3 convs (one channel per group) at stride 1, dilation 1,
    /// left / right padding 1, with an output width that is a multiple of 4 ([`dw_ok`]):
    /// 4 output rows per invocation, walked left to right a `vec4` at a time.
    Depthwise,
}

impl ConvVariant {
    /// Every variant: the bound on the conv forward pipelines a context compiles.
    pub fn all() -> Vec<Self> {
        let mut v = vec![Self::Direct, Self::Gemm, Self::Depthwise];
        for channels in [1, 2, 4, 8] {
            for k3 in [false, true] {
                v.push(Self::Reg { channels, k3 });
            }
        }
        for channels in [8, 16] {
            for k3 in [false, true] {
                v.push(Self::Subgroup {
                    channels,
                    rows: 1,
                    k3,
                });
            }
            for rows in [2, 4] {
                v.push(Self::Subgroup {
                    channels,
                    rows,
                    k3: false,
                });
            }
        }
        v
    }

    /// The variant's name, as the tuning file stores it: `direct`, `gemm`, `reg_c8_k3`,
    /// `sg_c16_r1`, `sg_c16_r4`, ...
    pub fn id(self) -> String {
        match self {
            Self::Direct => "direct".into(),
            Self::Gemm => "gemm".into(),
            Self::Reg { channels, k3 } => {
                format!("reg_c{channels}{}", if k3 { "_k3" } else { "" })
            }
            Self::Subgroup { channels, rows, k3 } => {
                format!("sg_c{channels}_r{rows}{}", if k3 { "_k3" } else { "" })
            }
            Self::Depthwise => "dw3_r4".into(),
        }
    }

    /// The variant named `id` (see [`ConvVariant::id`]), if it is one of [`ConvVariant::all`].
    pub fn parse(id: &str) -> Option<Self> {
        Self::all().into_iter().find(|v| v.id() == id)
    }

    /// Whether this variant can run on `ctx` (subgroups) for a conv with weight `w_shape`
    /// `[O, C/groups, KH, KW]`, `params` and output `out` `[N, O, OH, OW]` (two or four rows:
    /// 3×3 at stride 1, dilation 1; the 3-tap loop: `KW == 3` at stride 1, dilation 1 in
    /// width; `Depthwise`: [`dw_ok`]). Every variant that can run gives the same results.
    pub fn applies(
        self,
        ctx: &GpuContext,
        w_shape: &[usize],
        params: &Conv2dParams,
        out: [usize; 4],
    ) -> bool {
        let kernel = [w_shape[2], w_shape[3]];
        match self {
            Self::Direct | Self::Gemm => true,
            Self::Depthwise => dw_ok(w_shape, params, out),
            Self::Reg { k3, .. } => !k3 || tile_k3_ok(kernel[1], params),
            Self::Subgroup { rows, k3, .. } => {
                ctx.has_subgroups()
                    && (!k3 || tile_k3_ok(kernel[1], params))
                    && (rows == 1 || tile_r2_ok(kernel, params))
            }
        }
    }

    /// The override constants of this variant's pipeline (for `Direct`, the 1-D workgroup
    /// size; none for `Gemm`), for the portability test.
    #[cfg(test)]
    pub(crate) fn constants(self) -> Vec<(&'static str, f64)> {
        match self.kernel() {
            ForwardKernel::Gemm | ForwardKernel::Depthwise => vec![],
            ForwardKernel::Direct => WG_CONSTANTS.to_vec(),
            ForwardKernel::Reg(t) => vec![
                ("RB_O", f64::from(t.channels)),
                ("RB_K3", f64::from(u32::from(t.k3_stride1))),
                ("RB_WG", f64::from(t.workgroup)),
            ],
            ForwardKernel::Subgroup(t) => vec![
                ("SG_O", f64::from(t.channels)),
                ("SG_K3", f64::from(u32::from(t.k3_stride1))),
                ("SG_WG", f64::from(t.workgroup)),
            ],
        }
    }

    fn kernel(self) -> ForwardKernel {
        match self {
            Self::Direct => ForwardKernel::Direct,
            Self::Gemm => ForwardKernel::Gemm,
            Self::Depthwise => ForwardKernel::Depthwise,
            Self::Reg { channels, k3 } => ForwardKernel::Reg(RegTile {
                channels,
                k3_stride1: k3,
                workgroup: VARIANT_WORKGROUP,
                rows: 1,
            }),
            Self::Subgroup { channels, rows, k3 } => ForwardKernel::Subgroup(RegTile {
                channels,
                k3_stride1: k3 && rows == 1,
                workgroup: VARIANT_WORKGROUP,
                rows,
            }),
        }
    }
}

/// Output pixels (consecutive, of one output row) per `forward_reg` invocation.
pub const REG_PIXELS: usize = 8;

/// The tile of the register-blocked forward kernel (`forward_reg`): its override constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegTile {
    /// Output channels per invocation: 1, 2, 4 or 8 (`RB_O`).
    pub channels: u32,
    /// Use the inner loop specialised for 3-wide kernel rows at stride 1, dilation 1 (`RB_K3`);
    /// only valid when the conv has `KW == 3`, `stride_w == 1`, `dilation_w == 1` (otherwise
    /// the generic loop runs).
    pub k3_stride1: bool,
    /// Invocations per workgroup (`RB_WG` / `SG_WG`), 1 to 256.
    pub workgroup: u32,
    /// Output rows per invocation: 1, or 2 or 4 for the subgroup kernel on 3×3 kernels at
    /// stride 1, dilation 1 in both dimensions (`forward_sg_r2` / `forward_sg_r4`: each loaded
    /// input row serves every output row that reads it; ignored, i.e. 1, for other convs).
    /// `forward_reg` takes 1 only.
    pub rows: u32,
}

/// `forward_reg`'s channels per invocation for `og` output channels per group: the most of
/// 8, 4, 2, 1 not above `og`.
fn reg_channels(og: usize) -> u32 {
    match og {
        8.. => 8,
        4..=7 => 4,
        2 | 3 => 2,
        _ => 1,
    }
}

impl RegTile {
    /// The tile for a conv with `og` output channels per group, kernel width `kw` and these
    /// settings: the most channels (8, 4, 2, 1) not above `og`, the 3-tap path where it
    /// applies, and [`VARIANT_WORKGROUP`] invocations per workgroup (the tile of
    /// [`ConvVariant::Reg`]).
    pub fn for_conv(og: usize, kw: usize, params: &Conv2dParams) -> Self {
        Self {
            channels: reg_channels(og),
            k3_stride1: tile_k3_ok(kw, params),
            workgroup: VARIANT_WORKGROUP,
            rows: 1,
        }
    }

    /// The tile of the subgroup forward (`forward_sg` / `_r2` / `_r4`) for a conv with `og`
    /// output channels per group, kernel `[KH, KW]`, these settings and output
    /// `[N, O, OH, OW]`, without timing: 16 channels when `og >= 16`, else 8; the 3-tap path
    /// where it applies (used by one-row kernels only); for 3×3 kernels at stride 1, dilation 1, 4 output rows per invocation
    /// when `OH >= 8`, 2 when `OH` is 2 to 7; [`VARIANT_WORKGROUP`] invocations per workgroup.
    /// ([`ConvAlgorithm::Auto`] times these against each other instead.)
    pub fn for_subgroup_conv(
        og: usize,
        kernel: [usize; 2],
        params: &Conv2dParams,
        out: [usize; 4],
    ) -> Self {
        let rows = match out[2] {
            _ if !tile_r2_ok(kernel, params) => 1,
            8.. => 4,
            2.. => 2,
            _ => 1,
        };
        Self {
            channels: if og >= 16 { 16 } else { 8 },
            k3_stride1: tile_k3_ok(kernel[1], params),
            workgroup: VARIANT_WORKGROUP,
            rows: rows as u32,
        }
    }
}

/// The candidates [`ConvAlgorithm::Auto`] times for a conv on `ctx` with weight `w_shape`
/// `[O, C/groups, KH, KW]`, `params` and output `out`, in order of preference (the first is
/// what runs where no timing is possible): `forward_dw` where it applies ([`dw_ok`]); with
/// subgroups and at least 8 output channels per group, the subgroup kernels (four and two rows
/// for 3×3 stride-1 convs, then one row) with 16 channels (8 below 16 channels per group); the
/// register-blocked kernel (channels as [`RegTile::for_conv`]); the implicit GEMM from
/// [`GEMM_MIN_CHANNELS_PER_GROUP`] channels per group; the direct kernel below 8.
pub fn candidates(
    ctx: &GpuContext,
    w_shape: &[usize],
    params: &Conv2dParams,
    out: [usize; 4],
) -> Vec<ConvVariant> {
    let og = out[1] / params.groups.max(1);
    let kernel = [w_shape[2], w_shape[3]];
    let k3 = tile_k3_ok(kernel[1], params);
    let mut v = Vec::new();
    if dw_ok(w_shape, params, out) {
        v.push(ConvVariant::Depthwise);
    }
    if ctx.has_subgroups() && og >= 8 {
        let channels = if og >= 16 { 16 } else { 8 };
        if tile_r2_ok(kernel, params) {
            for rows in [4, 2] {
                v.push(ConvVariant::Subgroup {
                    channels,
                    rows,
                    k3: false,
                });
            }
        }
        v.push(ConvVariant::Subgroup {
            channels,
            rows: 1,
            k3,
        });
    }
    v.push(ConvVariant::Reg {
        channels: reg_channels(og),
        k3,
    });
    if og >= GEMM_MIN_CHANNELS_PER_GROUP {
        v.push(ConvVariant::Gemm);
    }
    if og < 8 {
        v.push(ConvVariant::Direct);
    }
    v
}

/// What [`ConvAlgorithm::Auto`] runs, untimed, for convs below [`TUNE_MIN_MACS`] with weight
/// `w_shape`, `params` and output `out`: `forward_dw` where it applies ([`dw_ok`]: it loads a
/// `vec4` per input row for 16 outputs where the others load scalars), else the
/// register-blocked kernel with the channels of [`RegTile::for_conv`] and the 3-tap loop where
/// it applies — the same on every adapter, good on all of them for small work (one output per
/// invocation, `forward_direct`, is several times slower on a CPU adapter for depthwise
/// convs), and among the cheapest variants to compile.
pub fn untuned_variant(w_shape: &[usize], params: &Conv2dParams, out: [usize; 4]) -> ConvVariant {
    if dw_ok(w_shape, params, out) {
        return ConvVariant::Depthwise;
    }
    ConvVariant::Reg {
        channels: reg_channels(out[1] / params.groups.max(1)),
        k3: tile_k3_ok(w_shape[3], params),
    }
}

/// Whether `forward_dw` ([`ConvVariant::Depthwise`]) runs a conv with weight `w_shape`
/// `[O, C/groups, KH, KW]`, `params` and output `out`: one input and one output channel per
/// group, a 3×3 kernel at stride 1 and dilation 1, padding 1 left and right (so the output
/// is as wide as the input) and an output width that is a positive multiple of 4 (rows of
/// whole `vec4`s).
pub fn dw_ok(w_shape: &[usize], params: &Conv2dParams, out: [usize; 4]) -> bool {
    let pads = params.pads([w_shape[2], w_shape[3]]);
    w_shape[1] == 1
        && out[1] == params.groups
        && w_shape[2] == 3
        && w_shape[3] == 3
        && params.stride == [1, 1]
        && params.dilation == [1, 1]
        && pads.is_ok_and(|p| p.begin[1] == 1 && p.end[1] == 1)
        && out[3] > 0
        && out[3].is_multiple_of(4)
}

/// `v` rounded down to a power of two, at most `cap` (0 stays 0).
fn pow2_bucket(v: usize, cap: usize) -> usize {
    if v == 0 {
        0
    } else {
        (1usize << v.ilog2()).min(cap)
    }
}

/// The multiply-adds of a conv with output `out` and weight `[O, C/g, KH, KW]` (saturating).
fn conv_macs(out: [usize; 4], w_shape: &[usize]) -> u64 {
    out.iter()
        .chain(&w_shape[1..])
        .fold(1u64, |acc, &d| acc.saturating_mul(d as u64))
}

/// The shape class of a conv (what [`ConvAlgorithm::Auto`] tunes once): the kernel geometry
/// (`k3x3s1`: 3×3 at stride 1, dilation 1, where the multi-row kernels apply; `k3row`: 3 wide
/// at stride 1, dilation 1 in width; `gen`: anything else), then output channels per group,
/// input channels per group, output height and width, each rounded down to a power of two
/// (capped at 16, 64, 64 and 64), and the multiply-adds rounded down to a power of four:
/// e.g. `k3x3s1-og16-cg64-oh32-ow32-m2^28`. Shapes of a class differ by less than 2× in each
/// of these, so the kernel timed fastest on one is the kernel for all.
///
/// Errors: those of [`Conv2dParams::output_shape`].
pub fn shape_class(x_shape: &[usize], w_shape: &[usize], params: &Conv2dParams) -> Result<String> {
    let out = params.output_shape(x_shape, w_shape)?;
    Ok(class_of(w_shape, params, out))
}

fn class_of(w_shape: &[usize], params: &Conv2dParams, out: [usize; 4]) -> String {
    let kernel = [w_shape[2], w_shape[3]];
    let geometry = if tile_r2_ok(kernel, params) {
        "k3x3s1"
    } else if tile_k3_ok(kernel[1], params) {
        "k3row"
    } else {
        "gen"
    };
    let og = out[1] / params.groups.max(1);
    let macs = conv_macs(out, w_shape);
    let m = if macs == 0 { 0 } else { macs.ilog2() & !1 };
    format!(
        "{geometry}-og{}-cg{}-oh{}-ow{}-m2^{m}",
        pow2_bucket(og, 16),
        pow2_bucket(w_shape[1], 64),
        pow2_bucket(out[2], 64),
        pow2_bucket(out[3], 64),
    )
}

/// The tuning-table key of a shape class.
fn tuning_key(class: &str) -> String {
    format!("conv2d/{class}")
}

/// The variant [`ConvAlgorithm::Auto`] has chosen on `ctx` for a conv of input `x_shape`,
/// weight `w_shape` and `params`: `Some` once the conv's class was tuned on this context (or
/// read from its cache directory), [`untuned_variant`] below [`TUNE_MIN_MACS`], else `None`
/// (tuned at the first such conv).
///
/// Errors: those of [`Conv2dParams::output_shape`].
pub fn tuned_variant(
    ctx: &GpuContext,
    x_shape: &[usize],
    w_shape: &[usize],
    params: &Conv2dParams,
) -> Result<Option<ConvVariant>> {
    let out = params.output_shape(x_shape, w_shape)?;
    Ok(cached_variant(ctx, w_shape, params, out))
}

/// The untimed choice below the threshold, or the usable cached decision.
fn cached_variant(
    ctx: &GpuContext,
    w_shape: &[usize],
    params: &Conv2dParams,
    out: [usize; 4],
) -> Option<ConvVariant> {
    if conv_macs(out, w_shape) < TUNE_MIN_MACS {
        return Some(untuned_variant(w_shape, params, out));
    }
    ctx.tuned(&tuning_key(&class_of(w_shape, params, out)))
        .and_then(|id| ConvVariant::parse(&id))
        .filter(|v| v.applies(ctx, w_shape, params, out))
}

/// What the conv applies to each output before storing it:
/// `y = act(acc * out_scale[o] + bias[o])`.
#[derive(Debug, Clone, Copy)]
pub struct ConvEpilogue<'a> {
    /// Per-output-channel multiplier of the accumulator (the QAT divide-back uses 1/s); None = 1.
    pub out_scale: Option<&'a GpuTensor>,
    /// Per-output-channel bias added after the multiplier; None = 0.
    pub bias: Option<&'a GpuTensor>,
    /// Activation applied last.
    pub activation: Activation,
}

impl ConvEpilogue<'_> {
    /// The identity epilogue: no multiplier, no bias, no activation (`y = acc`).
    pub fn none() -> Self {
        Self {
            out_scale: None,
            bias: None,
            activation: Activation::None,
        }
    }
}

impl Default for ConvEpilogue<'_> {
    fn default() -> Self {
        Self::none()
    }
}

/// The uniform of `conv2d.wgsl` (same field order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
struct Params {
    n: u32,
    c: u32,
    h: u32,
    w: u32,
    o: u32,
    kh: u32,
    kw: u32,
    groups: u32,
    oh: u32,
    ow: u32,
    cg: u32,
    og: u32,
    stride_h: u32,
    stride_w: u32,
    pad_h: u32,
    pad_w: u32,
    dil_h: u32,
    dil_w: u32,
    k: u32,
    npix: u32,
    ptiles: u32,
    mtiles: u32,
    count: u32,
    act: u32,
    has_scale: u32,
    has_bias: u32,
    slope: f32,
    /// `forward_dw`: 1 writes the statistics partials of its output (binding 9).
    stats: u32,
}

impl Params {
    /// The geometry of a conv of input `x` `[N, C, H, W]` and weight `w` `[O, C/g, KH, KW]`
    /// with output `out`, after [`Conv2dParams::output_shape`] accepted them.
    fn new(x: &[usize], w: &[usize], out: [usize; 4], p: &Conv2dParams) -> Result<Self> {
        // Every flat index the shader forms stays below one of these element counts, and every
        // signed coordinate below the padded extent.
        let x_len: usize = x.iter().product();
        let w_len: usize = w.iter().product();
        let y_len: usize = out.iter().product();
        to_u32(x_len, "conv2d input element count")?;
        to_u32(w_len, "conv2d weight element count")?;
        to_u32(y_len, "conv2d output element count")?;
        // The padding per side, from the geometry function the CPU reference uses, and the
        // shared check of the signed coordinates the shader forms.
        let pads = p.pads([w[2], w[3]])?;
        p.check_kernel_coordinates("conv2d", x, w, out, &pads, 0)?;
        let u = |v: usize, what: &str| to_u32(v, what);
        let g = p.groups;
        Ok(Self {
            n: u(x[0], "conv2d batch")?,
            c: u(x[1], "conv2d input channels")?,
            h: u(x[2], "conv2d input height")?,
            w: u(x[3], "conv2d input width")?,
            o: u(w[0], "conv2d output channels")?,
            kh: u(w[2], "conv2d kernel height")?,
            kw: u(w[3], "conv2d kernel width")?,
            groups: u(g, "conv2d groups")?,
            oh: u(out[2], "conv2d output height")?,
            ow: u(out[3], "conv2d output width")?,
            cg: u(x[1] / g, "conv2d input channels per group")?,
            og: u(w[0] / g, "conv2d output channels per group")?,
            stride_h: u(p.stride[0], "conv2d stride")?,
            stride_w: u(p.stride[1], "conv2d stride")?,
            pad_h: u(pads.begin[0], "conv2d padding")?,
            pad_w: u(pads.begin[1], "conv2d padding")?,
            dil_h: u(p.dilation[0], "conv2d dilation")?,
            dil_w: u(p.dilation[1], "conv2d dilation")?,
            k: u(w[1] * w[2] * w[3], "conv2d reduction length")?,
            npix: u(out[0] * out[2] * out[3], "conv2d output pixels")?,
            ..Self::default()
        })
    }
}

fn activation_code(act: Activation) -> u32 {
    super::activation::code(act)
}

fn check_shape4(what: &str, t: &GpuTensor) -> Result<[usize; 4]> {
    <[usize; 4]>::try_from(t.shape()).map_err(|_| {
        Error::invalid(format!(
            "{what} must be NCHW (rank 4), got shape {:?}",
            t.shape()
        ))
    })
}

fn check_per_channel(what: &str, o: usize, t: Option<&GpuTensor>) -> Result<()> {
    if let Some(t) = t {
        if t.shape() != [o] {
            return Err(Error::shape(what, &[o], t.shape()));
        }
        expect_f32(what, t)?;
    }
    Ok(())
}

/// 2-D convolution of `x` `[N, C, H, W]` with weight `w` `[O, C/groups, KH, KW]` (stride,
/// zero padding, dilation, groups incl. depthwise), returning `[N, O, OH, OW]` with the
/// epilogue applied: `y = act(acc * out_scale[o] + bias[o])`. With `ConvEpilogue { bias:
/// Some(b), ..ConvEpilogue::none() }` it is [`crate::reference::conv2d::conv2d`] with bias `b`.
/// Runs [`ConvAlgorithm::Auto`]; see [`conv2d_with_algorithm`].
///
/// Errors: those of [`Conv2dParams::output_shape`] and an epilogue bias or scale that is not
/// `[O]` ([`Error::ShapeMismatch`], context `conv2d bias` / `conv2d out_scale`), with the CPU
/// reference's messages; tensors that are not `f32`; sizes a kernel cannot index.
pub fn conv2d(
    ctx: &GpuContext,
    x: &GpuTensor,
    w: &GpuTensor,
    params: &Conv2dParams,
    epilogue: &ConvEpilogue,
) -> Result<GpuTensor> {
    conv2d_with_algorithm(ctx, x, w, params, epilogue, ConvAlgorithm::Auto)
}

/// [`conv2d`] with an explicit choice of forward kernel (both give the same results up to
/// summation order; this exists for tests and benchmarks).
pub fn conv2d_with_algorithm(
    ctx: &GpuContext,
    x: &GpuTensor,
    w: &GpuTensor,
    params: &Conv2dParams,
    epilogue: &ConvEpilogue,
    algorithm: ConvAlgorithm,
) -> Result<GpuTensor> {
    conv2d_impl(ctx, x, w, params, epilogue, algorithm, None)
}

/// [`conv2d`] writing into `y` (an `f32` tensor of the output shape with its own buffer,
/// see [`super::check_output`]).
pub fn conv2d_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    w: &GpuTensor,
    params: &Conv2dParams,
    epilogue: &ConvEpilogue,
    y: &GpuTensor,
) -> Result<()> {
    conv2d_impl(ctx, x, w, params, epilogue, ConvAlgorithm::Auto, Some(y)).map(drop)
}

/// [`conv2d_with_algorithm`] writing into `y` (as [`conv2d_into`]).
pub fn conv2d_with_algorithm_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    w: &GpuTensor,
    params: &Conv2dParams,
    epilogue: &ConvEpilogue,
    algorithm: ConvAlgorithm,
    y: &GpuTensor,
) -> Result<()> {
    conv2d_impl(ctx, x, w, params, epilogue, algorithm, Some(y)).map(drop)
}

/// [`conv2d_with_algorithm`] writing into `y` when given.
pub(crate) fn conv2d_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    w: &GpuTensor,
    params: &Conv2dParams,
    epilogue: &ConvEpilogue,
    algorithm: ConvAlgorithm,
    given: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    conv2d_run(ctx, x, w, params, epilogue, algorithm, given, None)
}

/// Statistics partials per channel that [`conv2d_dw_stats_into`] writes for a conv with
/// output `out` `[N, O, OH, OW]`: one per `forward_dw` invocation of the channel,
/// `N·ceil(OH/4)`, each a contiguous run of the channel's values, in order.
pub(crate) fn dw_stats_parts(out: [usize; 4]) -> usize {
    out[0] * out[2].div_ceil(DW_ROWS)
}

/// A depthwise conv ([`ConvVariant::Depthwise`], where [`dw_ok`]) into `y` that also writes
/// the statistics partials of `y` into `partials` (`[3, O, dw_stats_parts]`: count, mean and
/// M2 of each invocation's outputs, the layout `kernels::batch_norm` combines): a BatchNorm
/// after the conv needs no statistics pass over `y`. The conv is the variant's (the
/// statistics are an epilogue, not another algorithm).
///
/// Errors: those of [`conv2d_with_algorithm_into`] with [`ConvVariant::Depthwise`]; unfit
/// `partials` (checked as an output).
pub(crate) fn conv2d_dw_stats_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    w: &GpuTensor,
    params: &Conv2dParams,
    epilogue: &ConvEpilogue,
    y: &GpuTensor,
    partials: &GpuTensor,
) -> Result<()> {
    let algorithm = ConvAlgorithm::Variant(ConvVariant::Depthwise);
    conv2d_run(
        ctx,
        x,
        w,
        params,
        epilogue,
        algorithm,
        Some(y),
        Some(partials),
    )
    .map(drop)
}

#[allow(clippy::too_many_arguments)]
fn conv2d_run(
    ctx: &GpuContext,
    x: &GpuTensor,
    w: &GpuTensor,
    params: &Conv2dParams,
    epilogue: &ConvEpilogue,
    algorithm: ConvAlgorithm,
    given: Option<&GpuTensor>,
    stats: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    check_epilogue_context(ctx, "conv2d", x, w, epilogue)?;
    let out = params.output_shape(x.shape(), w.shape())?;
    let o = out[1];
    check_per_channel("conv2d bias", o, epilogue.bias)?;
    check_per_channel("conv2d out_scale", o, epilogue.out_scale)?;
    expect_f32("conv2d input", x)?;
    expect_f32("conv2d weight", w)?;
    let mut p = Params::new(x.shape(), w.shape(), out, params)?;
    p.act = activation_code(epilogue.activation);
    p.slope = super::activation::slope(epilogue.activation);
    p.has_scale = u32::from(epilogue.out_scale.is_some());
    p.has_bias = u32::from(epilogue.bias.is_some());
    let kernel_choice = forward_kernel(ctx, algorithm, x.shape(), w.shape(), params, out)?;
    let inputs = epilogue_inputs(x, w, epilogue);
    let y = output(ctx, "conv2d output", given, &out, DType::F32, &inputs)?;
    // Absent epilogue tensors are never read; any bound buffer will do.
    let scale = epilogue.out_scale.unwrap_or(w).buffer();
    let bias = epilogue.bias.unwrap_or(w).buffer();
    let plan = plan_forward(ctx, kernel_choice, &mut p, w.shape(), params, out)?;
    // The statistics epilogue: forward_dw only (the only kernel that writes binding 9).
    let stats = match stats {
        Some(t) => {
            if !std::ptr::eq(plan.kernel, &FORWARD_DW) {
                return Err(Error::invalid(
                    "conv2d statistics partials: only the depthwise kernel writes them",
                ));
            }
            let mut taken = inputs.clone();
            taken.push(&y);
            let shape = [3, o, dw_stats_parts(out)];
            let what = "conv2d statistics partials";
            check_output(ctx, what, t, &shape, DType::F32, &taken)?;
            p.stats = 1;
            t.clone()
        }
        // forward_dw binds a buffer of its own it does not write; the others bind nothing.
        None if std::ptr::eq(plan.kernel, &FORWARD_DW) => super::batch_norm::dummy(ctx)?,
        None => y.clone(),
    };
    let uniform = ctx.params(&p)?;
    let buffers = [
        x.buffer(),
        w.buffer(),
        y.buffer(),
        scale,
        bias,
        stats.buffer(),
    ];
    ctx.run(&[Launch {
        kernel: plan.kernel,
        constants: &plan.constants,
        buffers: &plan.buffers(&uniform, buffers),
        workgroups: plan.workgroups,
    }])?;
    Ok(y)
}

/// One forward launch: the entry point, its override constants and its grid.
struct ForwardPlan {
    kernel: &'static Kernel,
    constants: Vec<(&'static str, f64)>,
    workgroups: [u32; 3],
}

impl ForwardPlan {
    /// The launch's buffers in its kernel's binding order: parameters, input, weight, output,
    /// epilogue scale and bias (`forward_dw` binds x and y as `vec4` arrays, after the others,
    /// then its statistics partials: a buffer of their own, written only with `stats` = 1).
    fn buffers<'a>(
        &self,
        uniform: &'a wgpu::Buffer,
        [x, w, y, scale, bias, stats]: [&'a wgpu::Buffer; 6],
    ) -> Vec<&'a wgpu::Buffer> {
        if std::ptr::eq(self.kernel, &FORWARD_DW) {
            vec![uniform, w, scale, bias, x, y, stats]
        } else {
            vec![uniform, x, w, y, scale, bias]
        }
    }
}

/// The launch of forward kernel `choice` for weight `w_shape`, `params` and output `out`,
/// filling the tiling fields of `p`.
fn plan_forward(
    ctx: &GpuContext,
    choice: ForwardKernel,
    p: &mut Params,
    w_shape: &[usize],
    params: &Conv2dParams,
    out: [usize; 4],
) -> Result<ForwardPlan> {
    let og = out[1] / params.groups;
    let kw = w_shape[3];
    let kernel_hw = [w_shape[2], kw];
    Ok(match choice {
        ForwardKernel::Gemm => {
            let npix = out[0] * out[2] * out[3];
            let ptiles = npix.div_ceil(GEMM_TILE[1]);
            let mtiles = og.div_ceil(GEMM_TILE[0]);
            let tiles = ptiles * mtiles * params.groups;
            p.ptiles = to_u32(ptiles, "conv2d pixel tiles")?;
            p.mtiles = to_u32(mtiles, "conv2d channel tiles")?;
            p.count = to_u32(tiles, "conv2d tiles")?;
            ForwardPlan {
                kernel: &FORWARD_GEMM,
                constants: vec![],
                workgroups: ctx.grid_1d(tiles, 1)?,
            }
        }
        ForwardKernel::Depthwise => {
            if !dw_ok(w_shape, params, out) {
                return Err(Error::invalid(format!(
                    "conv2d forward_dw: runs depthwise 3x3 convs at stride 1, dilation 1, \
                     padding 1 in width and an output width that is a multiple of 4, got \
                     weight {w_shape:?}, {params:?}, output {out:?}"
                )));
            }
            let items = out[0] * out[1] * out[2].div_ceil(DW_ROWS);
            p.count = to_u32(items, "conv2d depthwise row blocks")?;
            ForwardPlan {
                kernel: &FORWARD_DW,
                constants: vec![],
                workgroups: ctx.grid_1d(items, DW_WORKGROUP as u32)?,
            }
        }
        ForwardKernel::Direct => {
            let n: usize = out.iter().product();
            p.count = to_u32(n, "conv2d output element count")?;
            ForwardPlan {
                kernel: &FORWARD_DIRECT,
                constants: WG_CONSTANTS.to_vec(),
                workgroups: ctx.grid_1d(n, WORKGROUP_SIZE)?,
            }
        }
        ForwardKernel::Reg(tile) => {
            // Invocations: one per 8-pixel block of an output row.
            let blocks = out[0] * out[2] * out[3].div_ceil(REG_PIXELS);
            let ptiles = blocks.div_ceil(tile.workgroup as usize);
            let mtiles = og.div_ceil(tile.channels as usize);
            let tiles = ptiles * mtiles * params.groups;
            // Every invocation index (pixel tile * RB_WG + lane) stays below u32::MAX.
            to_u32(ptiles * tile.workgroup as usize, "conv2d pixel blocks")?;
            p.ptiles = to_u32(ptiles, "conv2d pixel tiles")?;
            p.mtiles = to_u32(mtiles, "conv2d channel tiles")?;
            p.count = to_u32(tiles, "conv2d tiles")?;
            ForwardPlan {
                kernel: &FORWARD_REG,
                constants: vec![
                    ("RB_O", f64::from(tile.channels)),
                    (
                        "RB_K3",
                        f64::from(u32::from(tile.k3_stride1 && tile_k3_ok(kw, params))),
                    ),
                    ("RB_WG", f64::from(tile.workgroup)),
                ],
                workgroups: ctx.grid_1d(tiles, 1)?,
            }
        }
        ForwardKernel::Subgroup(tile) => {
            // Output rows per invocation: 2 or 4 only for 3x3, stride 1, dilation 1.
            let rows = if tile_r2_ok(kernel_hw, params) {
                tile.rows as usize
            } else {
                1
            };
            // Invocations: one per 8-pixel block of an output row, or of `rows` rows.
            let blocks = out[0] * out[2].div_ceil(rows) * out[3].div_ceil(REG_PIXELS);
            let ptiles = blocks.div_ceil(tile.workgroup as usize);
            let mtiles = og.div_ceil(tile.channels as usize);
            let tiles = ptiles * mtiles * params.groups;
            // Every invocation index (pixel tile * SG_WG + lane) stays below u32::MAX.
            to_u32(ptiles * tile.workgroup as usize, "conv2d pixel blocks")?;
            p.ptiles = to_u32(ptiles, "conv2d pixel tiles")?;
            p.mtiles = to_u32(mtiles, "conv2d channel tiles")?;
            p.count = to_u32(tiles, "conv2d tiles")?;
            ForwardPlan {
                kernel: match rows {
                    4 => &FORWARD_SG_R4,
                    2 => &FORWARD_SG_R2,
                    _ => &FORWARD_SG,
                },
                constants: vec![
                    ("SG_O", f64::from(tile.channels)),
                    (
                        "SG_K3",
                        f64::from(u32::from(
                            rows == 1 && tile.k3_stride1 && tile_k3_ok(kw, params),
                        )),
                    ),
                    ("SG_WG", f64::from(tile.workgroup)),
                ],
                workgroups: ctx.grid_1d(tiles, 1)?,
            }
        }
    })
}

/// Which forward kernel (and tile) [`ConvAlgorithm::Auto`] runs on `ctx` for a conv of
/// input `x_shape` `[N, C, H, W]`, weight `w_shape` `[O, C/groups, KH, KW]` and `params`, in
/// words, without tuning: the variant chosen for its class (`forward_sg_r4 (...), tuned`),
/// `forward_reg (...), below the tuning threshold`, or `not tuned yet on this context
/// (candidates: ...)`.
///
/// Errors: those of [`Conv2dParams::output_shape`].
pub fn auto_forward_kernel(
    ctx: &GpuContext,
    x_shape: &[usize],
    w_shape: &[usize],
    params: &Conv2dParams,
) -> Result<String> {
    let out = params.output_shape(x_shape, w_shape)?;
    if conv_macs(out, w_shape) < TUNE_MIN_MACS {
        let v = untuned_variant(w_shape, params, out);
        return Ok(format!(
            "{}, below the tuning threshold",
            describe_kernel(v.kernel())
        ));
    }
    let class = class_of(w_shape, params, out);
    Ok(match cached_variant(ctx, w_shape, params, out) {
        Some(v) => format!("{}, tuned for class {class}", describe_kernel(v.kernel())),
        None => {
            let names: Vec<String> = candidates(ctx, w_shape, params, out)
                .into_iter()
                .map(ConvVariant::id)
                .collect();
            format!(
                "class {class}, not tuned yet on this context (candidates: {})",
                names.join(", ")
            )
        }
    })
}

/// A forward kernel in words.
fn describe_kernel(k: ForwardKernel) -> String {
    match k {
        ForwardKernel::Gemm => "forward_gemm (tiled implicit GEMM)".to_string(),
        ForwardKernel::Direct => "forward_direct (one invocation per output)".to_string(),
        ForwardKernel::Depthwise => {
            "forward_dw (depthwise 3x3: 4 rows per invocation, vec4 row walk)".to_string()
        }
        ForwardKernel::Reg(t) => format!(
            "forward_reg (register-blocked: {} channels x {REG_PIXELS} pixels{}, workgroup {})",
            t.channels,
            if t.k3_stride1 { ", 3-tap rows" } else { "" },
            t.workgroup
        ),
        ForwardKernel::Subgroup(t) => format!(
            "{} (subgroup-shared weights: {} channels x {REG_PIXELS} pixels x {} row(s){}, \
             workgroup {})",
            match t.rows {
                4 => "forward_sg_r4",
                2 => "forward_sg_r2",
                _ => "forward_sg",
            },
            t.channels,
            t.rows,
            if t.k3_stride1 { ", 3-tap rows" } else { "" },
            t.workgroup
        ),
    }
}

/// The forward kernel `algorithm` runs for input `x_shape`, weight `w_shape`, `params` and
/// output `out` (the one home of [`ConvAlgorithm::Auto`]'s choice; it tunes the conv's class
/// when that was not done on `ctx`).
fn forward_kernel(
    ctx: &GpuContext,
    algorithm: ConvAlgorithm,
    x_shape: &[usize],
    w_shape: &[usize],
    params: &Conv2dParams,
    out: [usize; 4],
) -> Result<ForwardKernel> {
    let og = out[1] / params.groups;
    let kw = w_shape[3];
    let kernel_hw = [w_shape[2], kw];
    Ok(match algorithm {
        ConvAlgorithm::Auto => auto_variant(ctx, x_shape, w_shape, params, out)?.kernel(),
        ConvAlgorithm::Direct => ForwardKernel::Direct,
        ConvAlgorithm::ImplicitGemm => ForwardKernel::Gemm,
        ConvAlgorithm::RegisterBlocked => ForwardKernel::Reg(RegTile::for_conv(og, kw, params)),
        ConvAlgorithm::RegisterBlockedWith(tile) => ForwardKernel::Reg(check_tile(tile)?),
        ConvAlgorithm::Subgroup => {
            check_subgroups(ctx)?;
            ForwardKernel::Subgroup(RegTile::for_subgroup_conv(og, kernel_hw, params, out))
        }
        ConvAlgorithm::SubgroupWith(tile) => {
            check_subgroups(ctx)?;
            ForwardKernel::Subgroup(check_subgroup_tile(tile)?)
        }
        ConvAlgorithm::Variant(v) => {
            if matches!(v, ConvVariant::Subgroup { .. }) {
                check_subgroups(ctx)?;
            }
            match v.kernel() {
                ForwardKernel::Reg(t) => ForwardKernel::Reg(check_tile(t)?),
                ForwardKernel::Subgroup(t) => ForwardKernel::Subgroup(check_subgroup_tile(t)?),
                k => k,
            }
        }
    })
}

/// [`ConvAlgorithm::Auto`]'s variant: below [`TUNE_MIN_MACS`] [`untuned_variant`]; else the decision for
/// the conv's class, made now by timing the candidates if there is none.
fn auto_variant(
    ctx: &GpuContext,
    x_shape: &[usize],
    w_shape: &[usize],
    params: &Conv2dParams,
    out: [usize; 4],
) -> Result<ConvVariant> {
    if let Some(v) = cached_variant(ctx, w_shape, params, out) {
        return Ok(v);
    }
    let cands = candidates(ctx, w_shape, params, out);
    let first = cands[0];
    if cands.len() == 1 || cfg!(target_arch = "wasm32") {
        return Ok(first);
    }
    let chosen = time_candidates(ctx, &cands, x_shape, w_shape, params, out)?;
    ctx.set_tuned(&tuning_key(&class_of(w_shape, params, out)), &chosen.id());
    Ok(chosen)
}

/// The fastest of `cands` on scratch tensors of the conv's shapes (zeros, no epilogue). Each
/// pipeline is compiled first by an empty dispatch (its workgroups all exit: CPU adapters
/// compile at the first dispatch, so compilation stays out of the times); then rounds of one
/// run per candidate, interleaved so that a change of host load affects all alike: after the
/// first round candidates slower than twice the best drop out; up to three rounds, two when
/// the best run takes over 50 ms; each candidate's best run counts.
fn time_candidates(
    ctx: &GpuContext,
    cands: &[ConvVariant],
    x_shape: &[usize],
    w_shape: &[usize],
    params: &Conv2dParams,
    out: [usize; 4],
) -> Result<ConvVariant> {
    let x = GpuTensor::uninit(ctx, x_shape, DType::F32)?;
    let w = GpuTensor::uninit(ctx, w_shape, DType::F32)?;
    let y = GpuTensor::uninit(ctx, &out, DType::F32)?;
    let stats = super::batch_norm::dummy(ctx)?;
    let mut runs = Vec::with_capacity(cands.len());
    for &v in cands {
        let mut p = Params::new(x_shape, w_shape, out, params)?;
        let plan = plan_forward(ctx, v.kernel(), &mut p, w_shape, params, out)?;
        let uniform = ctx.params(&p)?;
        let empty = ctx.params(&Params { count: 0, ..p })?;
        runs.push((v, plan, uniform, empty, f64::INFINITY));
    }
    let launch = |plan: &ForwardPlan, uniform: &wgpu::Buffer, workgroups| {
        let buffers = plan.buffers(
            uniform,
            [
                x.buffer(),
                w.buffer(),
                y.buffer(),
                w.buffer(),
                w.buffer(),
                stats.buffer(),
            ],
        );
        let l = [Launch {
            kernel: plan.kernel,
            constants: &plan.constants,
            buffers: &buffers,
            workgroups,
        }];
        let t = std::time::Instant::now();
        // Clears the scratch inputs each time (pooled buffers hold old data, which could be
        // denormal and slow a CPU adapter down); the clear is cheap next to the conv.
        ctx.run_detached(&[x.buffer(), w.buffer()], &l)
            .map(|()| t.elapsed().as_secs_f64())
    };
    for (_, plan, _, empty, _) in &runs {
        launch(plan, empty, [1, 1, 1])?;
    }
    for round in 0..3 {
        for run in runs.iter_mut() {
            let t = launch(&run.1, &run.2, run.1.workgroups)?;
            run.4 = run.4.min(t);
        }
        let best = runs.iter().map(|r| r.4).fold(f64::INFINITY, f64::min);
        if round == 0 {
            runs.retain(|r| r.4 <= 2.0 * best);
        }
        if round == 1 && best > 0.05 {
            break;
        }
    }
    Ok(runs
        .iter()
        .min_by(|a, b| a.4.total_cmp(&b.4))
        .map_or(cands[0], |r| r.0))
}

/// Checks that the input, weight and epilogue tensors were made on `ctx`.
fn check_epilogue_context(
    ctx: &GpuContext,
    op: &str,
    x: &GpuTensor,
    w: &GpuTensor,
    epilogue: &ConvEpilogue,
) -> Result<()> {
    ctx.check_tensor(&format!("{op} input"), x)?;
    ctx.check_tensor(&format!("{op} weight"), w)?;
    if let Some(b) = epilogue.bias {
        ctx.check_tensor(&format!("{op} bias"), b)?;
    }
    if let Some(s) = epilogue.out_scale {
        ctx.check_tensor(&format!("{op} out_scale"), s)?;
    }
    Ok(())
}

/// The tensors a conv launch reads (an output must not share their buffers).
fn epilogue_inputs<'a>(
    x: &'a GpuTensor,
    w: &'a GpuTensor,
    epilogue: &ConvEpilogue<'a>,
) -> Vec<&'a GpuTensor> {
    let mut v = vec![x, w];
    v.extend(epilogue.bias);
    v.extend(epilogue.out_scale);
    v
}

/// The forward kernel one [`conv2d_with_algorithm`] call runs.
#[derive(Debug, Clone, Copy)]
enum ForwardKernel {
    Gemm,
    Direct,
    Depthwise,
    Reg(RegTile),
    Subgroup(RegTile),
}

/// `Err(InvalidArgument)` unless the device can compile subgroup shaders.
fn check_subgroups(ctx: &GpuContext) -> Result<()> {
    if !ctx.has_subgroups() {
        return Err(Error::invalid(format!(
            "conv2d subgroup forward: the device of {} was not created with \
             wgpu::Features::SUBGROUP",
            ctx.name()
        )));
    }
    Ok(())
}

/// `Err(InvalidArgument)` unless `tile` is one `forward_sg` can run.
fn check_subgroup_tile(tile: RegTile) -> Result<RegTile> {
    if ![8, 16].contains(&tile.channels)
        || !(1..=256).contains(&tile.workgroup)
        || ![1, 2, 4].contains(&tile.rows)
    {
        return Err(Error::invalid(format!(
            "conv2d subgroup tile: channels must be 8 or 16, the workgroup 1 to 256 and the \
             rows 1, 2 or 4, got {tile:?}"
        )));
    }
    Ok(tile)
}

/// Whether `ctx` runs on a CPU adapter (lavapipe / llvmpipe, SwiftShader, WARP). The conv2d
/// forward no longer uses it (its kernel is chosen by timing); the linear layer's launcher
/// and `qfuse info` do.
pub fn is_cpu_adapter(ctx: &GpuContext) -> bool {
    ctx.adapter_info().device_type == wgpu::DeviceType::Cpu
}

/// Whether the 3-tap inner loop of `forward_reg` applies to a conv of kernel width `kw`.
fn tile_k3_ok(kw: usize, params: &Conv2dParams) -> bool {
    kw == 3 && params.stride[1] == 1 && params.dilation[1] == 1
}

/// `Err(InvalidArgument)` unless `tile` is one `forward_reg` can run.
fn check_tile(tile: RegTile) -> Result<RegTile> {
    if ![1, 2, 4, 8].contains(&tile.channels)
        || !(1..=256).contains(&tile.workgroup)
        || tile.rows != 1
    {
        return Err(Error::invalid(format!(
            "conv2d register tile: channels must be 1, 2, 4 or 8, the workgroup 1 to 256 and \
             the rows 1, got {tile:?}"
        )));
    }
    Ok(tile)
}

/// Whether the two-row subgroup kernel (`forward_sg_r2`) applies to a conv with kernel
/// `[KH, KW]`: 3×3, stride 1 and dilation 1 in both dimensions.
fn tile_r2_ok(kernel: [usize; 2], params: &Conv2dParams) -> bool {
    kernel == [3, 3] && params.stride == [1, 1] && params.dilation == [1, 1]
}

/// `Err(ShapeMismatch)` (the CPU's message) unless `dy` has the forward output shape.
fn check_dy(out: [usize; 4], dy: &GpuTensor) -> Result<()> {
    if dy.shape() != out {
        return Err(Error::shape(
            "conv2d_backward dy (forward output shape)",
            &out,
            dy.shape(),
        ));
    }
    expect_f32("conv2d_backward dy", dy)
}

/// Gradient of [`conv2d`] (without epilogue) with respect to its input: `dx` of shape
/// `x_shape` for upstream `dy` `[N, O, OH, OW]` and weight `w` (the `dx` of
/// [`crate::reference::conv2d::conv2d_backward`]).
///
/// Errors: those of [`Conv2dParams::output_shape`] for `x_shape` and `w`, and
/// [`Error::ShapeMismatch`] when `dy` is not the forward output shape (the CPU's messages).
pub fn conv2d_backward_input(
    ctx: &GpuContext,
    dy: &GpuTensor,
    w: &GpuTensor,
    params: &Conv2dParams,
    x_shape: [usize; 4],
) -> Result<GpuTensor> {
    conv2d_backward_input_impl(ctx, dy, w, params, x_shape, None)
}

/// [`conv2d_backward_input`] writing into `dx` (an `f32` tensor of shape `x_shape` with its
/// own buffer, see [`super::check_output`]).
pub fn conv2d_backward_input_into(
    ctx: &GpuContext,
    dy: &GpuTensor,
    w: &GpuTensor,
    params: &Conv2dParams,
    x_shape: [usize; 4],
    dx: &GpuTensor,
) -> Result<()> {
    conv2d_backward_input_impl(ctx, dy, w, params, x_shape, Some(dx)).map(drop)
}

fn conv2d_backward_input_impl(
    ctx: &GpuContext,
    dy: &GpuTensor,
    w: &GpuTensor,
    params: &Conv2dParams,
    x_shape: [usize; 4],
    given: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    ctx.check_tensors(&[("conv2d_backward dy", dy), ("conv2d weight", w)])?;
    let out = params.output_shape(&x_shape, w.shape())?;
    check_dy(out, dy)?;
    expect_f32("conv2d weight", w)?;
    let mut p = Params::new(&x_shape, w.shape(), out, params)?;
    let dx = output(
        ctx,
        "conv2d_backward dx",
        given,
        &x_shape,
        DType::F32,
        &[dy, w],
    )?;
    p.count = to_u32(dx.len(), "conv2d input element count")?;
    let uniform = ctx.params(&p)?;
    ctx.run(&[Launch {
        kernel: &BACKWARD_INPUT,
        constants: WG_CONSTANTS,
        buffers: &[&uniform, w.buffer(), dx.buffer(), dy.buffer()],
        workgroups: ctx.grid_1d(dx.len(), WORKGROUP_SIZE)?,
    }])?;
    Ok(dx)
}

/// 2-D transposed convolution (`torch.nn.functional.conv_transpose2d`) of `x` `[N, Cin, H, W]`
/// with weight `w` `[Cin, Cout/groups, KH, KW]`, returning `[N, Cout, OH, OW]` (see
/// [`ConvTranspose2dParams::output_shape`]) with the epilogue applied per output channel:
/// `y = act(acc * out_scale[c] + bias[c])`. It is the input gradient of the conv2d with the
/// same weight and settings, computed by the same gather (one invocation per output element);
/// the output size, including `output_padding`, comes from the settings. Mirrors
/// [`crate::reference::conv2d::conv_transpose2d`] up to summation order.
///
/// Errors: those of [`ConvTranspose2dParams::output_shape`]; an epilogue bias or scale that is
/// not `[Cout]` ([`Error::ShapeMismatch`], context `conv_transpose2d bias` /
/// `conv_transpose2d out_scale`); tensors that are not `f32`; sizes a kernel cannot index.
pub fn conv_transpose2d(
    ctx: &GpuContext,
    x: &GpuTensor,
    w: &GpuTensor,
    params: &ConvTranspose2dParams,
    epilogue: &ConvEpilogue,
) -> Result<GpuTensor> {
    conv_transpose2d_impl(ctx, x, w, params, epilogue, None)
}

/// [`conv_transpose2d`] writing into `y` (an `f32` tensor of the output shape with its own
/// buffer, see [`super::check_output`]).
pub fn conv_transpose2d_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    w: &GpuTensor,
    params: &ConvTranspose2dParams,
    epilogue: &ConvEpilogue,
    y: &GpuTensor,
) -> Result<()> {
    conv_transpose2d_impl(ctx, x, w, params, epilogue, Some(y)).map(drop)
}

fn conv_transpose2d_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    w: &GpuTensor,
    params: &ConvTranspose2dParams,
    epilogue: &ConvEpilogue,
    given: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    check_epilogue_context(ctx, "conv_transpose2d", x, w, epilogue)?;
    let out = params.output_shape(x.shape(), w.shape())?;
    let cout = out[1];
    check_per_channel("conv_transpose2d bias", cout, epilogue.bias)?;
    check_per_channel("conv_transpose2d out_scale", cout, epilogue.out_scale)?;
    expect_f32("conv_transpose2d input", x)?;
    expect_f32("conv_transpose2d weight", w)?;
    let xs = x.shape();
    // The equivalent conv: input `out` ([N, Cout, OH, OW]), weight [Cin, Cout/g, KH, KW],
    // output `x` ([N, Cin, H, W]).
    let mut p = Params::new(
        &out,
        w.shape(),
        [xs[0], xs[1], xs[2], xs[3]],
        &params.as_conv(),
    )?;
    p.act = activation_code(epilogue.activation);
    p.slope = super::activation::slope(epilogue.activation);
    p.has_scale = u32::from(epilogue.out_scale.is_some());
    p.has_bias = u32::from(epilogue.bias.is_some());
    let inputs = epilogue_inputs(x, w, epilogue);
    let y = output(
        ctx,
        "conv_transpose2d output",
        given,
        &out,
        DType::F32,
        &inputs,
    )?;
    p.count = to_u32(y.len(), "conv_transpose2d output element count")?;
    let scale = epilogue.out_scale.unwrap_or(w).buffer();
    let bias = epilogue.bias.unwrap_or(w).buffer();
    let uniform = ctx.params(&p)?;
    ctx.run(&[Launch {
        kernel: &TRANSPOSE_FORWARD,
        constants: WG_CONSTANTS,
        buffers: &[&uniform, w.buffer(), y.buffer(), scale, bias, x.buffer()],
        workgroups: ctx.grid_1d(y.len(), WORKGROUP_SIZE)?,
    }])?;
    Ok(y)
}

/// Gradient of [`conv2d`] (without epilogue) with respect to its weight: `dweight` of shape
/// `w_shape` for input `x` and upstream `dy` (the `dweight` of
/// [`crate::reference::conv2d::conv2d_backward`]).
///
/// Errors: those of [`Conv2dParams::output_shape`] for `x` and `w_shape`, and
/// [`Error::ShapeMismatch`] when `dy` is not the forward output shape (the CPU's messages).
pub fn conv2d_backward_weight(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    params: &Conv2dParams,
    w_shape: [usize; 4],
) -> Result<GpuTensor> {
    conv2d_backward_weight_impl(ctx, x, dy, params, w_shape, None)
}

/// [`conv2d_backward_weight`] writing into `dw` (an `f32` tensor of shape `w_shape` with its
/// own buffer, see [`super::check_output`]).
pub fn conv2d_backward_weight_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    params: &Conv2dParams,
    w_shape: [usize; 4],
    dw: &GpuTensor,
) -> Result<()> {
    conv2d_backward_weight_impl(ctx, x, dy, params, w_shape, Some(dw)).map(drop)
}

fn conv2d_backward_weight_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    params: &Conv2dParams,
    w_shape: [usize; 4],
    given: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    ctx.check_tensors(&[("conv2d input", x), ("conv2d_backward dy", dy)])?;
    let out = params.output_shape(x.shape(), &w_shape)?;
    check_dy(out, dy)?;
    expect_f32("conv2d input", x)?;
    let mut p = Params::new(x.shape(), &w_shape, out, params)?;
    let dw = output(
        ctx,
        "conv2d_backward dweight",
        given,
        &w_shape,
        DType::F32,
        &[x, dy],
    )?;
    p.count = to_u32(dw.len(), "conv2d weight element count")?;
    let uniform = ctx.params(&p)?;
    ctx.run(&[Launch {
        kernel: &BACKWARD_WEIGHT,
        constants: &[],
        buffers: &[&uniform, x.buffer(), dw.buffer(), dy.buffer()],
        workgroups: ctx.grid_1d(dw.len(), 1)?,
    }])?;
    Ok(dw)
}

/// Sum over N, H, W per channel of an NCHW tensor (the conv bias gradient).
///
/// Errors: [`Error::InvalidArgument`] unless `t` is a rank-4 `f32` tensor.
pub fn channel_sum(ctx: &GpuContext, t: &GpuTensor) -> Result<GpuTensor> {
    channel_sum_impl(ctx, t, None)
}

/// [`channel_sum`] writing into `sums` (an `f32` tensor `[C]` with its own buffer, see
/// [`super::check_output`]).
pub fn channel_sum_into(ctx: &GpuContext, t: &GpuTensor, sums: &GpuTensor) -> Result<()> {
    channel_sum_impl(ctx, t, Some(sums)).map(drop)
}

fn channel_sum_impl(
    ctx: &GpuContext,
    t: &GpuTensor,
    given: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    ctx.check_tensor("channel_sum input", t)?;
    let [n, c, h, w] = check_shape4("channel_sum input", t)?;
    expect_f32("channel_sum input", t)?;
    let p = Params {
        n: to_u32(n, "channel_sum batch")?,
        c: to_u32(c, "channel_sum channels")?,
        h: to_u32(h, "channel_sum height")?,
        w: to_u32(w, "channel_sum width")?,
        count: to_u32(c, "channel_sum channels")?,
        ..Params::default()
    };
    to_u32(t.len(), "channel_sum element count")?;
    let sums = output(ctx, "channel_sum output", given, &[c], DType::F32, &[t])?;
    let uniform = ctx.params(&p)?;
    ctx.run(&[Launch {
        kernel: &CHANNEL_SUM,
        constants: &[],
        buffers: &[&uniform, t.buffer(), sums.buffer()],
        workgroups: ctx.grid_1d(c, 1)?,
    }])?;
    Ok(sums)
}
