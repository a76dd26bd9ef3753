//! Integer (deployed int8) kernels on the GPU (`shaders/int8.wgsl`,
//! `shaders/int8_conv.wgsl`, `shaders/lib/requant.wgsl`), bit-exact with
//! [`crate::reference::int8`]: quantize / dequantize, conv2d and linear with i32 accumulation
//! over packed codes and a fixed-point requantization epilogue, max pooling on codes, and the
//! TFLite integer add.
//!
//! **Layout.** Codes live in a [`GpuInt8Tensor`]: a tensor seen as `[outer, C, inner]`
//! (`C` = dim 1; a rank-1 tensor is `[1, C, 1]`, a scalar `[1, 1, 1]`) is stored as `u32`
//! words `[outer, ceil(C / 4), inner]`, four consecutive channels per word (channel `4q + j`
//! in bits `8j..8j + 8`, two's complement), padding lanes 0. NCHW activations are
//! `[N, ceil(C/4), H, W]` words, `[N, in]` linear inputs `[N, ceil(in/4)]`.
//!
//! **Conv2d / linear.** Weights are packed on the host ([`GpuConv2dInt8::new`],
//! [`GpuLinearInt8::new`]) to `[O, NQ, KH, KW]` words aligned with the input's channel words
//! (so any `groups`, depthwise included, works: lanes outside an output channel's group are 0),
//! and the input zero point is folded into the bias, `bias' = bias − x_zp · Σw` (wrapping
//! i32). Each invocation computes 4 output channels (one output word) × 4 output columns
//! (conv) or × 4 rows (linear) as `bias' + Σ dot4(x word, w word)`; a padding tap adds
//! `x_zp · Σ(lanes of w)` instead, so it contributes `(x_zp − x_zp) · w = 0` like the
//! reference. The dot product of four packed lanes is WGSL's `dot4I8Packed` or a portable
//! `extractBits` unpack ([`Int8Dot`], chosen per context with [`GpuContext::int8_dot`] or
//! per call with the `_with` forms); they are two separate shader modules, so the portable
//! one never mentions `dot4I8Packed`.
//!
//! **Dense conv fast path.** When the four channels of every output word read the same input
//! words (`groups = 1`, and grouped convs whose groups keep words aligned), each tap's four
//! input words are read (and, on the portable path, unpacked) once for the four channels;
//! with stride 1 and dilation 1 the next tap along a row reuses three of them and reads one.
//! A padding tap reads `x_zp`'s low byte in every lane (plus a correction when `x_zp` lies
//! outside `[-128, 127]`), which adds the same `x_zp · Σ(lanes of w)`. Weight words and
//! requantization rows are padded to whole output words so the channel loop is always 4.
//!
//! **Dense conv in exact f32** (`shaders/int8_conv_f.wgsl`, [`Int8ConvVariant::Float`]): for
//! `groups = 1` and an input zero point in `[-128, 127]`, the products of the codes are exact
//! in f32 (at most 2¹⁴), and so is every partial sum of at most 1024 of them (at most 2²⁴);
//! the f32 accumulators are flushed into i32 ones every `floor(256 / (KH·KW))` channel words,
//! so the codes are bit-exact. Tiles as the f32 subgroup conv's (8 or 16 channels × 8 columns
//! × 1, 2 or 4 rows, weights shared by subgroup broadcast where the device has subgroups).
//! Each weight word is loaded (or broadcast) once per channel word and its four channels
//! unpacked by four calls with constant lane numbers: with four times fewer loads per fma
//! than the f32 conv it runs 1.2–1.7× faster than that conv on lavapipe (README).
//! [`GpuConv2dInt8::forward`] times the variants that apply once per context and shape class
//! ([`GpuConv2dInt8::variant_for`]); `forward_with` runs the dot-product kernel.
//!
//! **Depthwise 3×3 at stride 1** (one channel per group, any padding): `conv2d_dw`, where an
//! output word's four channels read the input word of the same four channels, lane by lane.
//! Each invocation walks 4 output rows left to right a pixel (word) at a time with the last
//! three unpacked words of its 6 input rows in registers: one load per input row per step, 9
//! `vec4<i32>` multiply-adds per output word, the float requantization on four lanes at once
//! (exact where every accumulator is below 2²⁴, the per-lane function otherwise). It has no
//! dot products, so both [`Int8Dot`] paths run it; the generic kernel had each channel read
//! its own words with one live lane in four.
//!
//! **Requantization** is `shaders/lib/requant.wgsl`: gemmlowp's
//! `SaturatingRoundingDoublingHighMul` with the 64-bit product built from 16-bit limbs of
//! the magnitudes (WGSL has no i64), `RoundingDivideByPOT`, the saturating left shift and the
//! saturating zero-point add of [`crate::quant::requant`].
//!
//! Launchers validate with the CPU reference's checks and messages, record their dispatches
//! and return without waiting for the GPU, except that a NaN in [`quantize`]'s input can only
//! be reported after a download ([`GpuQuantized::check`]).

use bytemuck::{Pod, Zeroable};
use ndarray::{Array1, Array2, Array4, ArrayD, IxDyn};

use super::{expect_f32, output, to_u32, GpuQParams, WG_CONSTANTS, WORKGROUP_SIZE};
use crate::error::{Error, Result};
use crate::gpu::{Binding, DType, GpuContext, GpuTensor, Int8Dot, Kernel, Launch, Shader};
use crate::ops::Conv2dParams;
use crate::quant::{AddRequant, QuantRange, Requant, RequantMode};

pub(super) static ELEMENTWISE: Shader = Shader {
    name: "int8",
    source: concat!(
        include_str!("../../shaders/lib/float_bits.wgsl"),
        include_str!("../../shaders/lib/requant.wgsl"),
        include_str!("../../shaders/int8.wgsl")
    ),
};

pub(super) static CONV_PORTABLE: Shader = Shader {
    name: "int8_conv",
    source: concat!(
        include_str!("../../shaders/lib/requant.wgsl"),
        include_str!("../../shaders/lib/dot4_portable.wgsl"),
        include_str!("../../shaders/int8_conv.wgsl")
    ),
};

pub(super) static CONV_PACKED: Shader = Shader {
    name: "int8_conv_dot4packed",
    source: concat!(
        include_str!("../../shaders/lib/requant.wgsl"),
        include_str!("../../shaders/lib/dot4_packed.wgsl"),
        include_str!("../../shaders/int8_conv.wgsl")
    ),
};

/// The dense conv in exact f32 arithmetic (`int8_conv_f.wgsl`), weights shared through
/// subgroup broadcasts: needs [`wgpu::Features::SUBGROUP`].
pub(super) static CONV_F_SUBGROUP: Shader = Shader {
    name: "int8_conv_f_subgroup",
    source: concat!(
        include_str!("../../shaders/lib/requant.wgsl"),
        include_str!("../../shaders/lib/share_subgroup.wgsl"),
        include_str!("../../shaders/int8_conv_f.wgsl")
    ),
};

/// `int8_conv_f.wgsl` without subgroups: every invocation loads its own weights.
pub(super) static CONV_F_PORTABLE: Shader = Shader {
    name: "int8_conv_f",
    source: concat!(
        include_str!("../../shaders/lib/requant.wgsl"),
        include_str!("../../shaders/lib/share_portable.wgsl"),
        include_str!("../../shaders/int8_conv_f.wgsl")
    ),
};

static QUANTIZE: Kernel = Kernel {
    shader: &ELEMENTWISE,
    entry_point: "quantize",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read(2),
        Binding::read_write(5),
        Binding::read_write(7),
    ],
};

static DEQUANTIZE: Kernel = Kernel {
    shader: &ELEMENTWISE,
    entry_point: "dequantize",
    bindings: &[
        Binding::uniform(0),
        Binding::read(2),
        Binding::read(3),
        Binding::read_write(6),
    ],
};

static MAX_POOL2D: Kernel = Kernel {
    shader: &ELEMENTWISE,
    entry_point: "max_pool2d",
    bindings: &[
        Binding::uniform(0),
        Binding::read(3),
        Binding::read_write(5),
    ],
};

static ADD: Kernel = Kernel {
    shader: &ELEMENTWISE,
    entry_point: "add",
    bindings: &[
        Binding::uniform(0),
        Binding::read(3),
        Binding::read(4),
        Binding::read_write(5),
        Binding::uniform(8),
    ],
};

static REPACK: Kernel = Kernel {
    shader: &ELEMENTWISE,
    entry_point: "repack",
    bindings: &[
        Binding::uniform(0),
        Binding::read(3),
        Binding::read_write(5),
    ],
};

static REQUANT_PROBE: Kernel = Kernel {
    shader: &ELEMENTWISE,
    entry_point: "requant_probe",
    bindings: &[
        Binding::uniform(0),
        Binding::read(9),
        Binding::read_write(10),
    ],
};

static FLOAT_PROBE: Kernel = Kernel {
    shader: &ELEMENTWISE,
    entry_point: "float_probe",
    bindings: &[
        Binding::uniform(0),
        Binding::read(9),
        Binding::read_write(10),
    ],
};

const CONV_BINDINGS: &[Binding] = &[
    Binding::uniform(0),
    Binding::read(1),
    Binding::read(2),
    Binding::read(3),
    Binding::read_write(4),
];

static CONV2D_PORTABLE: Kernel = Kernel {
    shader: &CONV_PORTABLE,
    entry_point: "conv2d",
    bindings: CONV_BINDINGS,
};
static CONV2D_PACKED: Kernel = Kernel {
    shader: &CONV_PACKED,
    entry_point: "conv2d",
    bindings: CONV_BINDINGS,
};
/// The depthwise 3×3 conv (`conv2d_dw`): no dot products, so the portable module serves both
/// paths.
static CONV2D_DW: Kernel = Kernel {
    shader: &CONV_PORTABLE,
    entry_point: "conv2d_dw",
    bindings: CONV_BINDINGS,
};
static LINEAR_PORTABLE: Kernel = Kernel {
    shader: &CONV_PORTABLE,
    entry_point: "linear",
    bindings: CONV_BINDINGS,
};
static LINEAR_PACKED: Kernel = Kernel {
    shader: &CONV_PACKED,
    entry_point: "linear",
    bindings: CONV_BINDINGS,
};

static CONV2D_F_SUBGROUP: Kernel = Kernel {
    shader: &CONV_F_SUBGROUP,
    entry_point: "conv2d_f",
    bindings: CONV_BINDINGS,
};
static CONV2D_F_PORTABLE: Kernel = Kernel {
    shader: &CONV_F_PORTABLE,
    entry_point: "conv2d_f",
    bindings: CONV_BINDINGS,
};

/// Output columns per `conv2d_f` invocation.
const F_PIXELS: usize = 8;
/// Invocations per `conv2d_f` workgroup (`F_WG`), fixed for every variant.
const F_WORKGROUP: u32 = 64;
/// `conv2d_f` flushes its f32 accumulators every `floor(F_TAPS / (KH·KW))` channel words
/// (4 channels each): at most `4 · F_TAPS` = 1024 products of at most 2¹⁴ each, so every f32
/// partial sum is an integer of magnitude at most 2²⁴ (exact). Kernels of more taps run the
/// dot-product kernel.
const F_TAPS: usize = 256;

/// Workgroup size of the conv2d / linear kernels.
const CONV_WG: u32 = 64;
const CONV_CONSTANTS: &[(&str, f64)] = &[("WG", CONV_WG as f64)];
/// Output columns per conv2d invocation (`PX` in the shader).
const PX: usize = 4;
/// Rows per linear invocation.
const RB: usize = 4;
/// Output rows per `conv2d_dw` invocation (`DW_ROWS` in the shader).
const DW_ROWS: usize = 4;

/// The uniform of `int8.wgsl` (same field order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
struct Params {
    count: u32,
    c: u32,
    cq: u32,
    inner: u32,
    qinner: u32,
    qchannels: u32,
    quant_min: i32,
    quant_max: i32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kernel: u32,
    stride: u32,
    in_c: u32,
    in_inner: u32,
}

/// `AddParams` of `lib/requant.wgsl` (same field order), 64 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
struct AddParams {
    a_zp: i32,
    b_zp: i32,
    a_mult: i32,
    a_shift: i32,
    b_mult: i32,
    b_shift: i32,
    out_mult: i32,
    out_shift: i32,
    out_zp: i32,
    lo: i32,
    hi: i32,
    /// 1: the f32 form ([`RequantMode::Float`]), 0: fixed point.
    float_mode: i32,
    /// [`AddRequant::code_offset`].
    code_offset: i32,
    a_ratio: f32,
    b_ratio: f32,
    /// [`AddRequant::float_offset`], computed here once.
    float_offset: f32,
}

/// The uniform of `int8_conv.wgsl` (same field order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
struct ConvParams {
    n: u32,
    c: u32,
    cq: u32,
    h: u32,
    w: u32,
    o: u32,
    oq: u32,
    oh: u32,
    ow: u32,
    kh: u32,
    kw: u32,
    sh: u32,
    sw: u32,
    ph: u32,
    pw: u32,
    dh: u32,
    dw: u32,
    nq: u32,
    owb: u32,
    count: u32,
    x_zp: i32,
    out_zp: i32,
    lo: i32,
    hi: i32,
    mode: u32,
    zp_word: u32,
    zp_rest: i32,
    shared_q: u32,
}

/// `[outer, C, inner]`: how a shape is seen by the packed layout (channel axis 1; rank 1 is
/// `[1, C, 1]`, rank 0 `[1, 1, 1]`).
pub fn packed_dims(shape: &[usize]) -> [usize; 3] {
    match shape {
        [] => [1, 1, 1],
        [c] => [1, *c, 1],
        [outer, c, rest @ ..] => [*outer, *c, rest.iter().product()],
    }
}

/// Number of `u32` words of a packed tensor of `shape`: `outer · ceil(C / 4) · inner`.
pub fn packed_words(shape: &[usize]) -> usize {
    let [outer, c, inner] = packed_dims(shape);
    outer * c.div_ceil(4) * inner
}

/// Packs codes into the channel-quad layout of [`GpuInt8Tensor`] (padding lanes 0).
pub fn pack_codes(codes: &ArrayD<i8>) -> Vec<u32> {
    let [outer, c, inner] = packed_dims(codes.shape());
    let cq = c.div_ceil(4);
    let mut words = vec![0u32; outer * cq * inner];
    for (e, &v) in codes.as_standard_layout().iter().enumerate() {
        let i = e % inner;
        let ch = (e / inner) % c;
        let o = e / (inner * c);
        words[(o * cq + ch / 4) * inner + i] |= u32::from(v as u8) << (8 * (ch % 4));
    }
    words
}

/// Unpacks channel-quad words (as [`pack_codes`] writes them) into codes of `shape`.
///
/// Errors: [`Error::ShapeMismatch`] when `words` does not hold [`packed_words`]`(shape)`.
pub fn unpack_codes(words: &[u32], shape: &[usize]) -> Result<ArrayD<i8>> {
    let expected = packed_words(shape);
    if words.len() != expected {
        return Err(Error::shape(
            "packed int8 words",
            &[expected],
            &[words.len()],
        ));
    }
    let [_, c, inner] = packed_dims(shape);
    let cq = c.div_ceil(4);
    let n: usize = shape.iter().product();
    let codes: Vec<i8> = (0..n)
        .map(|e| {
            let i = e % inner;
            let ch = (e / inner) % c;
            let o = e / (inner * c);
            (words[(o * cq + ch / 4) * inner + i] >> (8 * (ch % 4))) as u8 as i8
        })
        .collect();
    ArrayD::from_shape_vec(IxDyn(shape), codes).map_err(|e| Error::invalid(e.to_string()))
}

/// 8-bit codes on the GPU, four channels per `u32` word (see the [module docs](self)): a
/// `u32` [`GpuTensor`] of shape `[outer, ceil(C / 4), inner]` and the logical shape.
#[derive(Debug, Clone)]
pub struct GpuInt8Tensor {
    words: GpuTensor,
    shape: Vec<usize>,
}

impl GpuInt8Tensor {
    /// Packs and uploads host codes.
    pub fn upload(ctx: &GpuContext, codes: &ArrayD<i8>) -> Result<Self> {
        let shape = codes.shape().to_vec();
        let words = GpuTensor::from_slice_u32(ctx, &pack_codes(codes), &word_shape(&shape))?;
        Ok(Self { words, shape })
    }

    /// An all-zero tensor of logical shape `shape`.
    pub fn zeros(ctx: &GpuContext, shape: &[usize]) -> Result<Self> {
        Ok(Self {
            words: GpuTensor::zeros(ctx, &word_shape(shape), DType::U32)?,
            shape: shape.to_vec(),
        })
    }

    /// Wraps packed words (a `u32` tensor of [`packed_words`]`(shape)` elements, any shape).
    ///
    /// Errors: [`Error::InvalidArgument`] for another dtype, [`Error::ShapeMismatch`] for
    /// another element count.
    pub fn from_words(words: GpuTensor, shape: &[usize]) -> Result<Self> {
        if words.dtype() != DType::U32 {
            return Err(Error::invalid(format!(
                "packed int8 words must be a u32 tensor, got {:?}",
                words.dtype()
            )));
        }
        let expected = packed_words(shape);
        if words.len() != expected {
            return Err(Error::shape(
                format!("packed int8 words of a tensor of shape {shape:?}"),
                &[expected],
                &[words.len()],
            ));
        }
        let words = words.reshape(&word_shape(shape))?;
        Ok(Self {
            words,
            shape: shape.to_vec(),
        })
    }

    /// The logical shape (of the codes).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The packed words, a `u32` tensor `[outer, ceil(C / 4), inner]`.
    pub fn words(&self) -> &GpuTensor {
        &self.words
    }

    /// Number of codes.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// `true` when the tensor has no codes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same words seen with another logical shape that packs identically (same `outer`,
    /// `C` and `inner`), e.g. `[N, C, 1, 1]` as `[N, C]`.
    ///
    /// Errors: [`Error::ShapeMismatch`] when the packed views differ.
    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        let same_len = shape.iter().product::<usize>() == self.len();
        if !same_len || packed_dims(shape) != packed_dims(&self.shape) {
            return Err(Error::shape(
                "GpuInt8Tensor::reshape (the packed [outer, C, inner] view must not change)",
                &self.shape,
                shape,
            ));
        }
        Ok(Self {
            words: self.words.clone(),
            shape: shape.to_vec(),
        })
    }

    /// Downloads and unpacks the codes, blocking until the GPU is done.
    pub fn download(&self, ctx: &GpuContext) -> Result<ArrayD<i8>> {
        let words = self.words.download_u32(ctx)?;
        let words: Vec<u32> = words.iter().copied().collect();
        unpack_codes(&words, &self.shape)
    }
}

/// The codes output of an int8 launcher: the caller's `given` tensor (its `_into` form) of
/// logical shape `shape` after [`super::check_output`] on its words, else a new one from the
/// pool (every int8 kernel writes whole words).
pub(super) fn int8_output(
    ctx: &GpuContext,
    what: &str,
    given: Option<&GpuInt8Tensor>,
    shape: &[usize],
    inputs: &[&GpuTensor],
) -> Result<GpuInt8Tensor> {
    match given {
        Some(out) => {
            if out.shape() != shape {
                return Err(Error::shape(what, shape, out.shape()));
            }
            super::check_output(
                ctx,
                what,
                &out.words,
                &word_shape(shape),
                DType::U32,
                inputs,
            )?;
            Ok(out.clone())
        }
        None => Ok(GpuInt8Tensor {
            words: GpuTensor::uninit(ctx, &word_shape(shape), DType::U32)?,
            shape: shape.to_vec(),
        }),
    }
}

fn word_shape(shape: &[usize]) -> Vec<usize> {
    let [outer, c, inner] = packed_dims(shape);
    vec![outer, c.div_ceil(4), inner]
}

/// What [`quantize`] returns: the codes and a one-word status written by the kernel (the
/// smallest flat index of a NaN input, `u32::MAX` when there is none).
#[derive(Debug, Clone)]
pub struct GpuQuantized {
    /// The codes (a NaN element's code is 0).
    pub codes: GpuInt8Tensor,
    /// `[1]` `u32`: the first NaN's flat (row-major) index, or `u32::MAX`.
    pub nan_index: GpuTensor,
}

impl GpuQuantized {
    /// Downloads the status (waiting for the GPU).
    ///
    /// Errors: [`Error::InvalidArgument`] naming the first NaN element, as the CPU reference.
    pub fn check(&self, ctx: &GpuContext) -> Result<()> {
        let status = self.nan_index.download_u32(ctx)?;
        match status.iter().next() {
            Some(&i) if i != u32::MAX => Err(Error::invalid(format!(
                "cannot quantize NaN (element {i}) to an integer code"
            ))),
            _ => Ok(()),
        }
    }

    /// [`GpuQuantized::check`], then the codes.
    ///
    /// Errors: as [`GpuQuantized::check`].
    pub fn into_checked(self, ctx: &GpuContext) -> Result<GpuInt8Tensor> {
        self.check(ctx)?;
        Ok(self.codes)
    }
}

/// The `(inner, channels)` of qparams for elements of `shape`: the channel of flat element
/// `e` is `(e / inner) % channels`.
fn qparam_layout(qp: &GpuQParams, shape: &[usize]) -> (usize, usize) {
    let inner = qp
        .axis()
        .map_or(1, |a| shape[a + 1..].iter().product::<usize>());
    (inner.max(1), qp.channels())
}

/// Quantizes an `f32` tensor to codes, per tensor or per channel
/// ([`crate::reference::int8::quantize`], bit-exact):
/// `clamp(round_ties_even(x · (1/scale)) + zp, qmin, qmax)`.
///
/// A NaN input cannot be rejected before the kernel runs: the kernel records the first one,
/// and [`GpuQuantized::check`] turns it into the reference's [`Error::InvalidArgument`].
///
/// Errors: a range outside `[-128, 127]`, qparams that do not fit `x`
/// ([`GpuQParams::validate`]), an input that is not `f32`.
pub fn quantize(
    ctx: &GpuContext,
    x: &GpuTensor,
    qp: &GpuQParams,
    range: QuantRange,
) -> Result<GpuQuantized> {
    quantize_impl(ctx, x, qp, range, None)
}

/// [`quantize`] writing into `out` (codes of `x`'s shape and a `[1]` `u32` status, each with
/// its own buffer, see [`super::check_output`]), for instance the result of a first call
/// reused; the status is reset before the kernel runs.
pub fn quantize_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    qp: &GpuQParams,
    range: QuantRange,
    out: &GpuQuantized,
) -> Result<()> {
    quantize_impl(ctx, x, qp, range, Some(out)).map(drop)
}

fn quantize_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    qp: &GpuQParams,
    range: QuantRange,
    given: Option<&GpuQuantized>,
) -> Result<GpuQuantized> {
    ctx.check_tensors(&[("quantize input", x), ("qparams", qp.tensor())])?;
    range.check_int8_codes()?;
    qp.validate(x.shape(), range)?;
    expect_f32("quantize input", x)?;
    to_u32(x.len(), "quantize element count")?;
    let inputs = [x, qp.tensor()];
    let codes = int8_output(
        ctx,
        "quantize codes",
        given.map(|g| &g.codes),
        x.shape(),
        &inputs,
    )?;
    let inputs = [x, qp.tensor(), &codes.words];
    let nan_index = output(
        ctx,
        "quantize status",
        given.map(|g| &g.nan_index),
        &[1],
        DType::U32,
        &inputs,
    )?;
    // The status starts at "no NaN" (written like kernel parameters, before the launch).
    ctx.write_before_next_launch(nan_index.buffer(), &u32::MAX.to_le_bytes());
    let [_, c, inner] = packed_dims(x.shape());
    let (qinner, qchannels) = qparam_layout(qp, x.shape());
    let words = codes.words.len();
    let p = Params {
        count: to_u32(words, "quantize word count")?,
        c: to_u32(c, "quantize channels")?,
        cq: to_u32(c.div_ceil(4), "quantize channel words")?,
        inner: to_u32(inner.max(1), "quantize inner size")?,
        qinner: to_u32(qinner, "quantize qparam inner size")?,
        qchannels: to_u32(qchannels, "quantize qparam channels")?,
        quant_min: range.quant_min,
        quant_max: range.quant_max,
        ..Params::default()
    };
    if words > 0 {
        let uniform = ctx.params(&p)?;
        ctx.run(&[Launch {
            kernel: &QUANTIZE,
            constants: WG_CONSTANTS,
            buffers: &[
                &uniform,
                x.buffer(),
                qp.tensor().buffer(),
                codes.words.buffer(),
                nan_index.buffer(),
            ],
            workgroups: ctx.grid_1d(words, WORKGROUP_SIZE)?,
        }])?;
    }
    Ok(GpuQuantized { codes, nan_index })
}

/// Dequantizes codes to `f32`: `(q − zp) · scale`, per tensor or per channel
/// ([`crate::reference::int8::dequantize`], bit-exact).
///
/// Errors: qparams that do not fit `q`'s shape.
pub fn dequantize(ctx: &GpuContext, q: &GpuInt8Tensor, qp: &GpuQParams) -> Result<GpuTensor> {
    dequantize_impl(ctx, q, qp, None)
}

/// [`dequantize`] writing into `out` (an `f32` tensor of `q`'s shape with its own buffer,
/// see [`super::check_output`]).
pub fn dequantize_into(
    ctx: &GpuContext,
    q: &GpuInt8Tensor,
    qp: &GpuQParams,
    out: &GpuTensor,
) -> Result<()> {
    dequantize_impl(ctx, q, qp, Some(out)).map(drop)
}

fn dequantize_impl(
    ctx: &GpuContext,
    q: &GpuInt8Tensor,
    qp: &GpuQParams,
    given: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    ctx.check_tensors(&[("dequantize codes", &q.words), ("qparams", qp.tensor())])?;
    qp.validate(q.shape(), QuantRange::new(-128, 127)?)?;
    let n = q.len();
    to_u32(n, "dequantize element count")?;
    let inputs = [&q.words, qp.tensor()];
    let y = output(
        ctx,
        "dequantize output",
        given,
        q.shape(),
        DType::F32,
        &inputs,
    )?;
    if n == 0 {
        return Ok(y);
    }
    let [_, c, inner] = packed_dims(q.shape());
    let (qinner, qchannels) = qparam_layout(qp, q.shape());
    let p = Params {
        count: to_u32(n, "dequantize element count")?,
        c: to_u32(c, "dequantize channels")?,
        cq: to_u32(c.div_ceil(4), "dequantize channel words")?,
        inner: to_u32(inner, "dequantize inner size")?,
        qinner: to_u32(qinner, "dequantize qparam inner size")?,
        qchannels: to_u32(qchannels, "dequantize qparam channels")?,
        ..Params::default()
    };
    let uniform = ctx.params(&p)?;
    ctx.run(&[Launch {
        kernel: &DEQUANTIZE,
        constants: WG_CONSTANTS,
        buffers: &[&uniform, qp.tensor().buffer(), q.words.buffer(), y.buffer()],
        workgroups: ctx.grid_1d(n, WORKGROUP_SIZE)?,
    }])?;
    Ok(y)
}

/// 2-D max pooling on codes (square `kernel` and `stride`, no padding, floor mode),
/// [`crate::reference::int8::max_pool2d_int8`]: the output keeps the input's quantization.
/// Four channels per invocation (lane-wise max of the packed words).
///
/// Errors: the reference's (zero kernel or stride, kernel larger than the input), and
/// [`Error::InvalidArgument`] for an input that is not rank 4.
pub fn max_pool2d_int8(
    ctx: &GpuContext,
    x: &GpuInt8Tensor,
    kernel: usize,
    stride: usize,
) -> Result<GpuInt8Tensor> {
    max_pool2d_int8_impl(ctx, x, kernel, stride, None)
}

/// [`max_pool2d_int8`] writing into `out` (codes of the output shape with their own buffer,
/// see [`super::check_output`]).
pub fn max_pool2d_int8_into(
    ctx: &GpuContext,
    x: &GpuInt8Tensor,
    kernel: usize,
    stride: usize,
    out: &GpuInt8Tensor,
) -> Result<()> {
    max_pool2d_int8_impl(ctx, x, kernel, stride, Some(out)).map(drop)
}

fn max_pool2d_int8_impl(
    ctx: &GpuContext,
    x: &GpuInt8Tensor,
    kernel: usize,
    stride: usize,
    given: Option<&GpuInt8Tensor>,
) -> Result<GpuInt8Tensor> {
    ctx.check_tensor("max_pool2d input", &x.words)?;
    let [n, c, h, w] = <[usize; 4]>::try_from(x.shape()).map_err(|_| {
        Error::invalid(format!(
            "max_pool2d input must be NCHW (rank 4), got shape {:?}",
            x.shape()
        ))
    })?;
    let (oh, ow) = crate::ops::max_pool2d_output(h, w, kernel, stride)?;
    to_u32(x.words.len(), "max_pool2d input word count")?;
    let y = int8_output(
        ctx,
        "max_pool2d output",
        given,
        &[n, c, oh, ow],
        &[&x.words],
    )?;
    let words = y.words.len();
    if words == 0 {
        return Ok(y);
    }
    let p = Params {
        count: to_u32(words, "max_pool2d output word count")?,
        h: to_u32(h, "max_pool2d height")?,
        w: to_u32(w, "max_pool2d width")?,
        oh: to_u32(oh, "max_pool2d output height")?,
        ow: to_u32(ow, "max_pool2d output width")?,
        kernel: to_u32(kernel, "max_pool2d kernel")?,
        stride: to_u32(stride, "max_pool2d stride")?,
        ..Params::default()
    };
    let uniform = ctx.params(&p)?;
    ctx.run(&[Launch {
        kernel: &MAX_POOL2D,
        constants: WG_CONSTANTS,
        buffers: &[&uniform, x.words.buffer(), y.words.buffer()],
        workgroups: ctx.grid_1d(words, WORKGROUP_SIZE)?,
    }])?;
    Ok(y)
}

/// Quantized elementwise add with a fused clamp ([`crate::reference::int8::add_int8`]:
/// [`AddRequant::apply`], MLAS's f32 form or TFLite's integer add), four codes per
/// invocation.
///
/// Errors: [`Error::ShapeMismatch`] when `a` and `b` differ in shape; an invalid `add`.
pub fn add_int8(
    ctx: &GpuContext,
    a: &GpuInt8Tensor,
    b: &GpuInt8Tensor,
    add: &AddRequant,
) -> Result<GpuInt8Tensor> {
    add_int8_impl(ctx, a, b, add, None)
}

/// [`add_int8`] writing into `out` (codes of `a`'s shape with their own buffer, see
/// [`super::check_output`]).
pub fn add_int8_into(
    ctx: &GpuContext,
    a: &GpuInt8Tensor,
    b: &GpuInt8Tensor,
    add: &AddRequant,
    out: &GpuInt8Tensor,
) -> Result<()> {
    add_int8_impl(ctx, a, b, add, Some(out)).map(drop)
}

fn add_int8_impl(
    ctx: &GpuContext,
    a: &GpuInt8Tensor,
    b: &GpuInt8Tensor,
    add: &AddRequant,
    given: Option<&GpuInt8Tensor>,
) -> Result<GpuInt8Tensor> {
    ctx.check_tensors(&[("quantized add a", &a.words), ("quantized add b", &b.words)])?;
    if a.shape() != b.shape() {
        return Err(Error::shape("quantized add", a.shape(), b.shape()));
    }
    add.validate()?;
    let y = int8_output(
        ctx,
        "quantized add output",
        given,
        a.shape(),
        &[&a.words, &b.words],
    )?;
    let words = y.words.len();
    if words == 0 {
        return Ok(y);
    }
    let [_, c, inner] = packed_dims(a.shape());
    let p = Params {
        count: to_u32(words, "quantized add word count")?,
        c: to_u32(c, "quantized add channels")?,
        cq: to_u32(c.div_ceil(4), "quantized add channel words")?,
        inner: to_u32(inner, "quantized add inner size")?,
        ..Params::default()
    };
    let ap = AddParams {
        a_zp: add.a_zero_point,
        b_zp: add.b_zero_point,
        a_mult: add.a_multiplier.multiplier,
        a_shift: add.a_multiplier.shift,
        b_mult: add.b_multiplier.multiplier,
        b_shift: add.b_multiplier.shift,
        out_mult: add.out_multiplier.multiplier,
        out_shift: add.out_multiplier.shift,
        out_zp: add.out_zero_point,
        lo: add.clamp_min,
        hi: add.clamp_max,
        float_mode: i32::from(add.mode == RequantMode::Float),
        code_offset: add.code_offset(),
        a_ratio: add.a_ratio,
        b_ratio: add.b_ratio,
        float_offset: add.float_offset(),
    };
    let uniform = ctx.params(&p)?;
    let add_uniform = ctx.params(&ap)?;
    ctx.run(&[Launch {
        kernel: &ADD,
        constants: WG_CONSTANTS,
        buffers: &[
            &uniform,
            a.words.buffer(),
            b.words.buffer(),
            y.words.buffer(),
            &add_uniform,
        ],
        workgroups: ctx.grid_1d(words, WORKGROUP_SIZE)?,
    }])?;
    Ok(y)
}

/// The same codes (row-major) seen with another logical shape of the same element count,
/// repacked on the device when the channel-quad packing differs (`int8.wgsl`'s `repack`: one
/// output word per invocation), or sharing the words when it does not
/// ([`GpuInt8Tensor::reshape`]). Flattening NCHW codes `[N, C, H, W]` (words
/// `[N, ceil(C/4), H, W]`) to `[N, C·H·W]` (words `[N, ceil(C·H·W/4)]`) is the common case
/// ([`flatten_int8`]).
///
/// Errors: [`Error::ShapeMismatch`] when the element counts differ.
pub fn repack_int8(ctx: &GpuContext, x: &GpuInt8Tensor, shape: &[usize]) -> Result<GpuInt8Tensor> {
    repack_int8_impl(ctx, x, shape, None)
}

/// [`repack_int8`] writing into `out` (codes of logical shape `shape` with their own
/// buffer, see [`super::check_output`]); the codes are copied by the kernel even when the
/// packing is the same.
pub fn repack_int8_into(
    ctx: &GpuContext,
    x: &GpuInt8Tensor,
    shape: &[usize],
    out: &GpuInt8Tensor,
) -> Result<()> {
    repack_int8_impl(ctx, x, shape, Some(out)).map(drop)
}

fn repack_int8_impl(
    ctx: &GpuContext,
    x: &GpuInt8Tensor,
    shape: &[usize],
    given: Option<&GpuInt8Tensor>,
) -> Result<GpuInt8Tensor> {
    ctx.check_tensor("int8 repack input", &x.words)?;
    if shape.iter().product::<usize>() != x.len() {
        return Err(Error::shape(
            "int8 repack (element counts must match)",
            x.shape(),
            shape,
        ));
    }
    if given.is_none() && packed_dims(shape) == packed_dims(x.shape()) {
        return x.reshape(shape);
    }
    let y = int8_output(ctx, "int8 repack output", given, shape, &[&x.words])?;
    let words = y.words.len();
    if words == 0 {
        return Ok(y);
    }
    to_u32(x.len(), "int8 repack element count")?;
    to_u32(x.words.len(), "int8 repack input word count")?;
    let [_, c, inner] = packed_dims(shape);
    let [_, in_c, in_inner] = packed_dims(x.shape());
    let p = Params {
        count: to_u32(words, "int8 repack word count")?,
        c: to_u32(c, "int8 repack channels")?,
        cq: to_u32(c.div_ceil(4), "int8 repack channel words")?,
        inner: to_u32(inner, "int8 repack inner size")?,
        in_c: to_u32(in_c, "int8 repack input channels")?,
        in_inner: to_u32(in_inner, "int8 repack input inner size")?,
        ..Params::default()
    };
    let uniform = ctx.params(&p)?;
    ctx.run(&[Launch {
        kernel: &REPACK,
        constants: WG_CONSTANTS,
        buffers: &[&uniform, x.words.buffer(), y.words.buffer()],
        workgroups: ctx.grid_1d(words, WORKGROUP_SIZE)?,
    }])?;
    Ok(y)
}

/// `torch.flatten(x, 1)` on codes: `[N, ...]` → `[N, prod(...)]`, repacked on the device
/// ([`repack_int8`]), as [`crate::deploy::IntModel::forward`]'s flatten reshapes host codes.
///
/// Errors: [`Error::InvalidArgument`] for a rank-0 input (the CPU path's message).
pub fn flatten_int8(ctx: &GpuContext, x: &GpuInt8Tensor) -> Result<GpuInt8Tensor> {
    repack_int8(ctx, x, &crate::ops::flatten_shape(x.shape())?)
}

/// [`flatten_int8`] writing into `out` (codes `[N, prod(...)]` with their own buffer, see
/// [`super::check_output`]).
pub fn flatten_int8_into(ctx: &GpuContext, x: &GpuInt8Tensor, out: &GpuInt8Tensor) -> Result<()> {
    repack_int8_into(ctx, x, &crate::ops::flatten_shape(x.shape())?, out)
}

/// Evaluates the WGSL fixed-point functions of `shaders/lib/requant.wgsl` on the GPU, for
/// checking them against [`crate::quant::requant`]: for each `[x, m, shift, exponent]` it
/// returns `[srdhm(x, m), rdbp(x, exponent), mbqm(x, m, shift), sat_add(x, m)]`, the WGSL
/// counterparts of `saturating_rounding_doubling_high_mul(x, m)`,
/// `rounding_divide_by_pot(x, exponent)` (exponent clamped to `[0, 31]`),
/// `FixedPointMultiplier { multiplier: m, shift }.apply(x)` and `x.saturating_add(m)`.
/// Blocks until the results are downloaded.
///
/// Errors: [`Error::Gpu`] from the device; [`Error::InvalidArgument`] for too many items.
pub fn requant_probe(ctx: &GpuContext, items: &[[i32; 4]]) -> Result<Vec<[i32; 4]>> {
    run_probe(ctx, &REQUANT_PROBE, items)
}

/// Evaluates the f32 requantization of `shaders/lib/requant.wgsl` on the GPU: for each
/// `(acc, scale, out_zp)` returns `(bits of acc as f32, code)`, the WGSL counterparts of
/// `(acc as f32).to_bits()` and [`Requant::apply`] in [`RequantMode::Float`] with clamp
/// `[-128, 127]`. Blocks until the results are downloaded.
///
/// Errors: [`Error::Gpu`] from the device; [`Error::InvalidArgument`] for too many items.
pub fn float_requant_probe(ctx: &GpuContext, items: &[(i32, f32, i32)]) -> Result<Vec<(u32, i32)>> {
    let packed: Vec<[i32; 4]> = items
        .iter()
        .map(|&(acc, scale, zp)| [acc, scale.to_bits() as i32, zp, 0])
        .collect();
    Ok(run_probe(ctx, &FLOAT_PROBE, &packed)?
        .into_iter()
        .map(|r| (r[0] as u32, r[1]))
        .collect())
}

fn run_probe(ctx: &GpuContext, kernel: &Kernel, items: &[[i32; 4]]) -> Result<Vec<[i32; 4]>> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let flat: Vec<i32> = items.iter().flatten().copied().collect();
    let input = GpuTensor::upload_i32(
        ctx,
        &ArrayD::from_shape_vec(IxDyn(&[items.len(), 4]), flat)
            .map_err(|e| Error::invalid(e.to_string()))?,
    )?;
    let out = GpuTensor::zeros(ctx, &[items.len(), 4], DType::I32)?;
    let p = Params {
        count: to_u32(items.len(), "requantization probe items")?,
        ..Params::default()
    };
    let uniform = ctx.params(&p)?;
    ctx.run(&[Launch {
        kernel,
        constants: WG_CONSTANTS,
        buffers: &[&uniform, input.buffer(), out.buffer()],
        workgroups: ctx.grid_1d(items.len(), WORKGROUP_SIZE)?,
    }])?;
    let got = out.download_i32(ctx)?;
    let got: Vec<i32> = got.iter().copied().collect();
    Ok(got
        .chunks_exact(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect())
}

/// The per-output-channel rows of the conv / linear kernels, two `vec4<i32>` each:
/// `(bias', multiplier, shift, first_q)` with `bias' = bias − x_zp · Σw` in wrapping i32, and
/// `(f32 bits of the scale, 0, 0, 0)`.
fn requant_rows(
    bias: Option<&Array1<i32>>,
    wsum: &[i32],
    first_q: &[usize],
    x_zero_point: i32,
    rq: &Requant,
) -> Result<Vec<i32>> {
    let mut rows = Vec::with_capacity(4 * wsum.len());
    for (o, (&s, &fq)) in wsum.iter().zip(first_q).enumerate() {
        let b = bias.map_or(0, |b| b[o]);
        let m = rq.multiplier(o);
        rows.extend([
            b.wrapping_sub(x_zero_point.wrapping_mul(s)),
            m.multiplier,
            m.shift,
            i32::try_from(fq).map_err(|_| Error::invalid("conv2d int8: too many channels"))?,
            rq.scale(o).to_bits() as i32,
            0,
            0,
            0,
        ]);
    }
    Ok(rows)
}

fn upload_rows(ctx: &GpuContext, rows: Vec<i32>) -> Result<GpuTensor> {
    let o = rows.len() / 8;
    GpuTensor::upload_i32(
        ctx,
        &ArrayD::from_shape_vec(IxDyn(&[o, 8]), rows).map_err(|e| Error::invalid(e.to_string()))?,
    )
}

/// `mode` of `int8_conv.wgsl`'s uniform.
fn mode_code(mode: RequantMode) -> u32 {
    match mode {
        RequantMode::FixedPoint => 0,
        RequantMode::Float => 1,
    }
}

fn conv_kernel(ctx: &GpuContext, dot: Int8Dot, linear: bool) -> Result<&'static Kernel> {
    ctx.check_int8_dot(dot)?;
    Ok(match (dot, linear) {
        (Int8Dot::Portable, false) => &CONV2D_PORTABLE,
        (Int8Dot::Packed, false) => &CONV2D_PACKED,
        (Int8Dot::Portable, true) => &LINEAR_PORTABLE,
        (Int8Dot::Packed, true) => &LINEAR_PACKED,
    })
}

/// One integer conv2d forward kernel of the bounded set [`GpuConv2dInt8::forward`] chooses from
/// by timing (once per context and shape class, like the f32 conv's
/// [`super::conv2d::ConvAlgorithm::Auto`]). Every variant that applies gives the same
/// (bit-exact) codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Int8ConvVariant {
    /// `conv2d` of `int8_conv.wgsl`: 4 output channels × 4 columns per invocation, i32 dot
    /// products of packed words on the given path (any conv; depthwise 3×3 at stride 1 runs
    /// `conv2d_dw`).
    Dot(Int8Dot),
    /// `conv2d_f` of `int8_conv_f.wgsl`: the products of codes in exact f32 (flushed into i32
    /// accumulators every 1024 products), `channels` (8 or 16) output channels × 8 columns ×
    /// `rows` (1, 2 or 4) rows per invocation. Dense convs only (`groups = 1`, input zero point
    /// in `[-128, 127]`, at most 256 kernel taps).
    Float {
        /// Output channels per invocation: 8 or 16.
        channels: u32,
        /// Output rows per invocation: 1, or 2 or 4 with `k3`.
        rows: u32,
        /// The 3×3 stride-1 row loop (each input row loaded once for every kernel row that
        /// reads it); only for 3×3 kernels at stride 1, dilation 1.
        k3: bool,
        /// Weights loaded by one subgroup lane and broadcast (needs
        /// [`wgpu::Features::SUBGROUP`]); else every invocation loads its own.
        subgroups: bool,
    },
}

impl Int8ConvVariant {
    /// Every variant: the bound on the int8 conv pipelines a context compiles (two
    /// dot-product modules, and 16 `conv2d_f` pipelines over two modules).
    pub fn all() -> Vec<Self> {
        let mut v = vec![Self::Dot(Int8Dot::Portable), Self::Dot(Int8Dot::Packed)];
        for subgroups in [true, false] {
            for channels in [8, 16] {
                for (rows, k3) in [(4, true), (2, true), (1, true), (1, false)] {
                    v.push(Self::Float {
                        channels,
                        rows,
                        k3,
                        subgroups,
                    });
                }
            }
        }
        v
    }

    /// The variant's name, as the tuning file stores it: `dot_portable`, `dot_packed`,
    /// `f32_c16_r4_k3_sg`, `f32_c8_r1`, ...
    pub fn id(self) -> String {
        match self {
            Self::Dot(Int8Dot::Portable) => "dot_portable".into(),
            Self::Dot(Int8Dot::Packed) => "dot_packed".into(),
            Self::Float {
                channels,
                rows,
                k3,
                subgroups,
            } => format!(
                "f32_c{channels}_r{rows}{}{}",
                if k3 { "_k3" } else { "" },
                if subgroups { "_sg" } else { "" }
            ),
        }
    }

    /// The variant named `id` (see [`Int8ConvVariant::id`]), if it is one of
    /// [`Int8ConvVariant::all`].
    pub fn parse(id: &str) -> Option<Self> {
        Self::all().into_iter().find(|v| v.id() == id)
    }

    /// The override constants of a `Float` variant's pipeline (`Dot`: the workgroup size).
    pub(crate) fn constants(self) -> Vec<(&'static str, f64)> {
        match self {
            Self::Dot(_) => CONV_CONSTANTS.to_vec(),
            Self::Float {
                channels, rows, k3, ..
            } => vec![
                ("F_O", f64::from(channels)),
                ("F_ROWS", f64::from(rows)),
                ("F_K3", f64::from(u32::from(k3))),
                ("F_WG", f64::from(F_WORKGROUP)),
            ],
        }
    }

    /// A well-formed tile (the set of [`Int8ConvVariant::all`]).
    fn valid(self) -> bool {
        match self {
            Self::Dot(_) => true,
            Self::Float {
                channels, rows, k3, ..
            } => matches!(channels, 8 | 16) && (rows == 1 || (k3 && matches!(rows, 2 | 4))),
        }
    }
}

/// A 3×3 kernel at stride 1 and dilation 1 (where `conv2d_f`'s row loop applies).
fn k3x3s1(kernel: [usize; 2], params: &Conv2dParams) -> bool {
    kernel == [3, 3] && params.stride == [1, 1] && params.dilation == [1, 1]
}

/// What one int8 conv launch runs.
struct Int8Plan {
    kernel: &'static Kernel,
    constants: Vec<(&'static str, f64)>,
    params: ConvParams,
    workgroups: [u32; 3],
}

/// An integer conv2d layer prepared for the GPU: packed weights (`[O, NQ, KH, KW]` words
/// aligned with the input's channel words), and per output channel the folded bias
/// `bias − x_zp · Σw`, multiplier and shift ([`crate::reference::int8::conv2d_int8`]).
#[derive(Debug, Clone)]
pub struct GpuConv2dInt8 {
    weight: GpuTensor,
    rows: GpuTensor,
    weight_shape: [usize; 4],
    nq: usize,
    shared_q: bool,
    /// One input and one output channel per group and a 3×3 kernel: with stride 1 and
    /// dilation 1, `conv2d_dw` runs it.
    depthwise3: bool,
    /// `conv2d_f` applies: `groups = 1`, `x_zp` in `[-128, 127]`, at most [`F_TAPS`] taps.
    float_ok: bool,
    params: Conv2dParams,
    x_zero_point: i32,
    out_zero_point: i32,
    clamp: (i32, i32),
    mode: RequantMode,
}

impl GpuConv2dInt8 {
    /// Packs and uploads symmetric weight codes `[O, C/groups, KH, KW]`, an optional i32
    /// bias `[O]` and the requantization, for inputs with zero point `x_zero_point`.
    ///
    /// Errors: the reference's checks that need no input (groups, stride and dilation
    /// positive, groups dividing `O`, bias `[O]`, a valid `requant`).
    pub fn new(
        ctx: &GpuContext,
        x_zero_point: i32,
        weight: &Array4<i8>,
        bias: Option<&Array1<i32>>,
        params: &Conv2dParams,
        requant: &Requant,
    ) -> Result<Self> {
        let (o, cg, kh, kw) = weight.dim();
        if params.groups == 0 || params.stride.contains(&0) || params.dilation.contains(&0) {
            return Err(Error::invalid(format!(
                "conv2d stride, dilation and groups must be positive, got {params:?}"
            )));
        }
        if !o.is_multiple_of(params.groups) {
            return Err(Error::invalid(format!(
                "conv2d groups = {} must divide output channels {o}",
                params.groups
            )));
        }
        if let Some(b) = bias {
            if b.len() != o {
                return Err(Error::shape("quantized conv2d bias", &[o], b.shape()));
            }
        }
        requant.validate(o)?;
        let og = o / params.groups;
        let first_q: Vec<usize> = (0..o).map(|oc| (oc / og) * cg / 4).collect();
        let nq = if cg == 0 {
            0
        } else {
            (0..params.groups)
                .map(|g| (g * cg + cg - 1) / 4 - g * cg / 4 + 1)
                .max()
                .unwrap_or(0)
        };
        let taps = kh * kw;
        // Padded to whole output words (zero weights and rows past O): the kernel's channel
        // loop is always 4 long.
        let op = 4 * o.div_ceil(4);
        let mut words = vec![0u32; op * nq * taps];
        let mut wsum = vec![0i32; o];
        let ws = weight.as_standard_layout();
        let ws: Vec<i8> = ws.iter().copied().collect();
        for oc in 0..o {
            let c0 = (oc / og) * cg;
            for ci in 0..cg {
                let ch = c0 + ci;
                let t = ch / 4 - first_q[oc];
                for tap in 0..taps {
                    let v = ws[(oc * cg + ci) * taps + tap];
                    wsum[oc] = wsum[oc].wrapping_add(i32::from(v));
                    words[(oc * nq + t) * taps + tap] |= u32::from(v as u8) << (8 * (ch % 4));
                }
            }
        }
        let mut rows = requant_rows(bias, &wsum, &first_q, x_zero_point, requant)?;
        rows.resize(8 * op, 0);
        // The dense fast path: the channels of every output word read the same input words.
        let shared_q = first_q.chunks(4).all(|w| w.iter().all(|&q| q == w[0]));
        let weight_words = GpuTensor::from_slice_u32(ctx, &words, &[op, nq, kh, kw])?;
        Ok(Self {
            weight: weight_words,
            rows: upload_rows(ctx, rows)?,
            weight_shape: [o, cg, kh, kw],
            nq,
            shared_q,
            depthwise3: cg == 1 && og == 1 && kh == 3 && kw == 3,
            float_ok: params.groups == 1 && (-128..=127).contains(&x_zero_point) && taps <= F_TAPS,
            params: *params,
            x_zero_point,
            out_zero_point: requant.out_zero_point,
            clamp: (requant.clamp_min, requant.clamp_max),
            mode: requant.mode,
        })
    }

    /// The weight shape `[O, C/groups, KH, KW]`.
    pub fn weight_shape(&self) -> [usize; 4] {
        self.weight_shape
    }

    /// Runs the layer on codes `x` `[N, C, H, W]`, returning codes `[N, O, OH, OW]`, with the
    /// kernel [`GpuConv2dInt8::variant_for`] chooses (timed once per context and shape class).
    ///
    /// Errors: the reference's geometry errors ([`Conv2dParams::output_shape`]).
    pub fn forward(&self, ctx: &GpuContext, x: &GpuInt8Tensor) -> Result<GpuInt8Tensor> {
        self.forward_impl(ctx, x, None, None)
    }

    /// [`GpuConv2dInt8::forward`] on the dot-product kernel ([`Int8ConvVariant::Dot`]) with an
    /// explicit dot-product path.
    ///
    /// Errors: those of [`GpuConv2dInt8::forward`], and [`Error::InvalidArgument`] for
    /// [`Int8Dot::Packed`] where it is not available.
    pub fn forward_with(
        &self,
        ctx: &GpuContext,
        x: &GpuInt8Tensor,
        dot: Int8Dot,
    ) -> Result<GpuInt8Tensor> {
        self.forward_impl(ctx, x, Some(Int8ConvVariant::Dot(dot)), None)
    }

    /// [`GpuConv2dInt8::forward`] with an explicit kernel variant (tests, benchmarks; every
    /// variant that applies gives the same codes).
    ///
    /// Errors: those of [`GpuConv2dInt8::forward`], and [`Error::InvalidArgument`] for a
    /// variant that does not apply to this layer on `ctx` ([`GpuConv2dInt8::applies`]).
    pub fn forward_variant(
        &self,
        ctx: &GpuContext,
        x: &GpuInt8Tensor,
        variant: Int8ConvVariant,
    ) -> Result<GpuInt8Tensor> {
        self.forward_impl(ctx, x, Some(variant), None)
    }

    /// [`GpuConv2dInt8::forward_with`] writing into `out` (as [`GpuConv2dInt8::forward_into`]).
    ///
    /// Errors: those of [`GpuConv2dInt8::forward_into`], and [`Error::InvalidArgument`] for
    /// [`Int8Dot::Packed`] where it is not available.
    pub fn forward_with_into(
        &self,
        ctx: &GpuContext,
        x: &GpuInt8Tensor,
        dot: Int8Dot,
        out: &GpuInt8Tensor,
    ) -> Result<()> {
        self.forward_impl(ctx, x, Some(Int8ConvVariant::Dot(dot)), Some(out))
            .map(drop)
    }

    /// [`GpuConv2dInt8::forward`] writing into `out` (codes `[N, O, OH, OW]` with their own
    /// buffer, see [`super::check_output`]).
    pub fn forward_into(
        &self,
        ctx: &GpuContext,
        x: &GpuInt8Tensor,
        out: &GpuInt8Tensor,
    ) -> Result<()> {
        self.forward_impl(ctx, x, None, Some(out)).map(drop)
    }

    /// Whether `variant` can run this layer on `ctx` (every one that can gives the same codes):
    /// `Dot(Packed)` where the packed dot product is available; `Float` for dense layers
    /// (`groups = 1`, input zero point in `[-128, 127]`, at most 256 kernel taps), with
    /// subgroups only where the device has them, the row loop (`k3`, and 2 or 4 rows) only for
    /// 3×3 kernels at stride 1, dilation 1.
    pub fn applies(&self, ctx: &GpuContext, variant: Int8ConvVariant) -> bool {
        let [_, _, kh, kw] = self.weight_shape;
        variant.valid()
            && match variant {
                Int8ConvVariant::Dot(dot) => ctx.check_int8_dot(dot).is_ok(),
                Int8ConvVariant::Float { k3, subgroups, .. } => {
                    self.float_ok
                        && (!subgroups || ctx.has_subgroups())
                        && (!k3 || k3x3s1([kh, kw], &self.params))
                }
            }
    }

    /// The candidates the tuner times for this layer on `ctx`, in order of preference: for
    /// dense layers the `conv2d_f` tiles (16 and 8 channels from 16 output channels, else 8
    /// only; 4, 2 and 1 rows for 3×3 stride-1 kernels, else the per-tap loop; with subgroups
    /// where the device has them), then the dot-product kernel on the context's path
    /// ([`GpuContext::int8_dot`]) and on the other where it is available.
    pub fn candidates(&self, ctx: &GpuContext) -> Vec<Int8ConvVariant> {
        let mut v = Vec::new();
        let [o, _, kh, kw] = self.weight_shape;
        let channels: &[u32] = if o >= 16 { &[16, 8] } else { &[8] };
        let subgroups = ctx.has_subgroups();
        let tiles: &[(u32, bool)] = if k3x3s1([kh, kw], &self.params) {
            &[(4, true), (2, true), (1, true)]
        } else {
            &[(1, false)]
        };
        for &channels in channels {
            for &(rows, k3) in tiles {
                v.push(Int8ConvVariant::Float {
                    channels,
                    rows,
                    k3,
                    subgroups,
                });
            }
        }
        v.push(Int8ConvVariant::Dot(ctx.int8_dot()));
        for dot in [Int8Dot::Portable, Int8Dot::Packed] {
            if dot != ctx.int8_dot() {
                v.push(Int8ConvVariant::Dot(dot));
            }
        }
        v.retain(|&c| self.applies(ctx, c));
        v
    }

    /// The variant [`GpuConv2dInt8::forward`] runs for input `x_shape` on `ctx`: the
    /// dot-product kernel on the context's path for layers `conv2d_f` does not run, for
    /// depthwise 3×3 layers at stride 1 (`conv2d_dw`) and below
    /// [`super::conv2d::TUNE_MIN_MACS`] multiply-adds (untimed); else the fastest of
    /// [`GpuConv2dInt8::candidates`], timed at the first conv of its shape class
    /// ([`super::conv2d::shape_class`]) on this context and kept, in memory and in the
    /// context's cache directory.
    ///
    /// Errors: the geometry errors of [`GpuConv2dInt8::forward`]; those of the timing runs.
    pub fn variant_for(&self, ctx: &GpuContext, x_shape: &[usize]) -> Result<Int8ConvVariant> {
        let out = self.params.output_shape(x_shape, &self.weight_shape)?;
        let untuned = Int8ConvVariant::Dot(ctx.int8_dot());
        let macs = out
            .iter()
            .chain(&self.weight_shape[1..])
            .fold(1u64, |acc, &d| acc.saturating_mul(d as u64));
        if !self.float_ok || self.dw_kernel() || macs < super::conv2d::TUNE_MIN_MACS {
            return Ok(untuned);
        }
        let key = format!(
            "int8_conv2d/{}",
            super::conv2d::shape_class(x_shape, &self.weight_shape, &self.params)?
        );
        if let Some(v) = ctx
            .tuned(&key)
            .and_then(|id| Int8ConvVariant::parse(&id))
            .filter(|&v| self.applies(ctx, v))
        {
            return Ok(v);
        }
        let cands = self.candidates(ctx);
        let chosen = if cands.len() <= 1 || cfg!(target_arch = "wasm32") {
            cands.first().copied().unwrap_or(untuned)
        } else {
            self.time_candidates(ctx, &cands, x_shape, out)?
        };
        ctx.set_tuned(&key, &chosen.id());
        Ok(chosen)
    }

    /// Depthwise 3×3 at stride 1, dilation 1: the dot-product variants run `conv2d_dw`.
    fn dw_kernel(&self) -> bool {
        self.depthwise3 && self.params.stride == [1, 1] && self.params.dilation == [1, 1]
    }

    /// The fastest of `cands` on scratch input and output words of this layer's shapes (its
    /// own weights): each pipeline compiled first by an empty dispatch, then up to three
    /// interleaved rounds (two when the best run takes over 50 ms), candidates slower than
    /// twice the best dropped after the first; each candidate's best run counts (as the f32
    /// conv's tuner).
    fn time_candidates(
        &self,
        ctx: &GpuContext,
        cands: &[Int8ConvVariant],
        x_shape: &[usize],
        out: [usize; 4],
    ) -> Result<Int8ConvVariant> {
        let xw = GpuTensor::uninit(ctx, &word_shape(x_shape), DType::U32)?;
        let yw = GpuTensor::uninit(ctx, &word_shape(&out), DType::U32)?;
        let mut runs = Vec::with_capacity(cands.len());
        for &v in cands {
            let Some(plan) = self.plan(ctx, v, x_shape, out)? else {
                return Ok(cands[0]);
            };
            let uniform = ctx.params(&plan.params)?;
            let empty = ctx.params(&ConvParams {
                count: 0,
                ..plan.params
            })?;
            runs.push((v, plan, uniform, empty, f64::INFINITY));
        }
        let launch = |plan: &Int8Plan, uniform: &wgpu::Buffer, workgroups| {
            let l = [Launch {
                kernel: plan.kernel,
                constants: &plan.constants,
                buffers: &[
                    uniform,
                    xw.buffer(),
                    self.weight.buffer(),
                    self.rows.buffer(),
                    yw.buffer(),
                ],
                workgroups,
            }];
            let t = std::time::Instant::now();
            ctx.run_detached(&[xw.buffer()], &l)
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

    /// The launch of `variant` for input `x_shape` and output `out` (`None`: no work).
    fn plan(
        &self,
        ctx: &GpuContext,
        variant: Int8ConvVariant,
        x_shape: &[usize],
        out: [usize; 4],
    ) -> Result<Option<Int8Plan>> {
        if !self.applies(ctx, variant) {
            if let Int8ConvVariant::Dot(dot) = variant {
                ctx.check_int8_dot(dot)?;
            }
            return Err(Error::invalid(format!(
                "int8 conv2d: variant {} does not apply to a conv with weight {:?}, {:?}, \
                 input zero point {} on {}",
                variant.id(),
                self.weight_shape,
                self.params,
                self.x_zero_point,
                ctx.name()
            )));
        }
        let [n, o, oh, ow] = out;
        let (c, h, w) = (x_shape[1], x_shape[2], x_shape[3]);
        let [_, _, kh, kw] = self.weight_shape;
        let oq = o.div_ceil(4);
        let owb = ow.div_ceil(PX);
        let p = &self.params;
        let (kernel, constants, items, wg, overhang) = match variant {
            Int8ConvVariant::Dot(dot) => {
                if self.dw_kernel() {
                    (
                        &CONV2D_DW,
                        CONV_CONSTANTS.to_vec(),
                        n * oq * oh.div_ceil(DW_ROWS),
                        CONV_WG,
                        PX,
                    )
                } else {
                    (
                        conv_kernel(ctx, dot, false)?,
                        CONV_CONSTANTS.to_vec(),
                        n * oq * oh * owb,
                        CONV_WG,
                        PX,
                    )
                }
            }
            Int8ConvVariant::Float {
                channels,
                rows,
                k3,
                subgroups,
            } => {
                let rows = if k3 { rows as usize } else { 1 };
                let blocks = n * oh.div_ceil(rows) * ow.div_ceil(F_PIXELS);
                let ptiles = blocks.div_ceil(F_WORKGROUP as usize);
                // Every invocation index (pixel tile * F_WG + lane) stays below u32::MAX.
                to_u32(ptiles * F_WORKGROUP as usize, "conv2d int8 pixel blocks")?;
                let tiles = ptiles * o.div_ceil(channels as usize);
                let kernel = if subgroups {
                    &CONV2D_F_SUBGROUP
                } else {
                    &CONV2D_F_PORTABLE
                };
                (kernel, variant.constants(), tiles, 1, F_PIXELS)
            }
        };
        if items == 0 {
            return Ok(None);
        }
        // The padding per side, from the geometry function the CPU reference uses.
        let pads = p.pads([kh, kw])?;
        // Input coordinates are formed in i32 in the shader (up to the padded extent, and a
        // block of columns of overhang past the last output): the shared check.
        p.check_kernel_coordinates(
            "conv2d int8",
            x_shape,
            &self.weight_shape,
            out,
            &pads,
            overhang,
        )?;
        let params = ConvParams {
            n: to_u32(n, "conv2d int8 batch")?,
            c: to_u32(c, "conv2d int8 channels")?,
            cq: to_u32(c.div_ceil(4), "conv2d int8 channel words")?,
            h: to_u32(h, "conv2d int8 height")?,
            w: to_u32(w, "conv2d int8 width")?,
            o: to_u32(o, "conv2d int8 output channels")?,
            oq: to_u32(oq, "conv2d int8 output channel words")?,
            oh: to_u32(oh, "conv2d int8 output height")?,
            ow: to_u32(ow, "conv2d int8 output width")?,
            kh: to_u32(kh, "conv2d int8 kernel height")?,
            kw: to_u32(kw, "conv2d int8 kernel width")?,
            sh: to_u32(p.stride[0], "conv2d int8 stride")?,
            sw: to_u32(p.stride[1], "conv2d int8 stride")?,
            ph: to_u32(pads.begin[0], "conv2d int8 padding")?,
            pw: to_u32(pads.begin[1], "conv2d int8 padding")?,
            dh: to_u32(p.dilation[0], "conv2d int8 dilation")?,
            dw: to_u32(p.dilation[1], "conv2d int8 dilation")?,
            nq: to_u32(self.nq, "conv2d int8 weight words per channel")?,
            owb: to_u32(owb, "conv2d int8 output column blocks")?,
            count: to_u32(items, "conv2d int8 work items")?,
            x_zp: self.x_zero_point,
            out_zp: self.out_zero_point,
            lo: self.clamp.0,
            hi: self.clamp.1,
            mode: mode_code(self.mode),
            // A padding tap reads x_zp's low byte in every lane; the rest of x_zp (outside
            // [-128, 127] only) is added separately.
            zp_word: u32::from(self.x_zero_point as u8) * 0x0101_0101,
            zp_rest: self
                .x_zero_point
                .wrapping_sub(i32::from(self.x_zero_point as i8)),
            shared_q: u32::from(self.shared_q),
        };
        Ok(Some(Int8Plan {
            kernel,
            constants,
            params,
            workgroups: ctx.grid_1d(items, wg)?,
        }))
    }

    fn forward_impl(
        &self,
        ctx: &GpuContext,
        x: &GpuInt8Tensor,
        variant: Option<Int8ConvVariant>,
        given: Option<&GpuInt8Tensor>,
    ) -> Result<GpuInt8Tensor> {
        ctx.check_tensors(&[
            ("conv2d int8 input", &x.words),
            ("conv2d int8 weight", &self.weight),
        ])?;
        let out = self.params.output_shape(x.shape(), &self.weight_shape)?;
        if let Some(Int8ConvVariant::Dot(dot)) = variant {
            ctx.check_int8_dot(dot)?;
        }
        let inputs = [&x.words, &self.weight, &self.rows];
        let y = int8_output(ctx, "conv2d int8 output", given, &out, &inputs)?;
        to_u32(x.words.len(), "conv2d int8 input word count")?;
        to_u32(self.weight.len(), "conv2d int8 weight word count")?;
        to_u32(y.words.len(), "conv2d int8 output word count")?;
        let variant = match variant {
            Some(v) => v,
            None => self.variant_for(ctx, x.shape())?,
        };
        let Some(plan) = self.plan(ctx, variant, x.shape(), out)? else {
            return Ok(y);
        };
        let uniform = ctx.params(&plan.params)?;
        ctx.run(&[Launch {
            kernel: plan.kernel,
            constants: &plan.constants,
            buffers: &[
                &uniform,
                x.words.buffer(),
                self.weight.buffer(),
                self.rows.buffer(),
                y.words.buffer(),
            ],
            workgroups: plan.workgroups,
        }])?;
        Ok(y)
    }
}

/// Integer conv2d on the GPU ([`crate::reference::int8::conv2d_int8`], bit-exact): codes
/// `x` `[N, C, H, W]` with zero point `x_zero_point`, symmetric weight codes
/// `[O, C/groups, KH, KW]`, i32 bias `[O]`; output codes `[N, O, OH, OW]`. Prepares a
/// [`GpuConv2dInt8`] (packs and uploads the weights) and runs it; keep the layer to run it
/// again.
///
/// Errors: the reference's (invalid geometry, a bias that is not `[O]`, an invalid
/// requantization).
pub fn conv2d_int8(
    ctx: &GpuContext,
    x: &GpuInt8Tensor,
    x_zero_point: i32,
    weight: &Array4<i8>,
    bias: Option<&Array1<i32>>,
    params: &Conv2dParams,
    requant: &Requant,
) -> Result<GpuInt8Tensor> {
    conv2d_int8_impl(
        ctx,
        x,
        x_zero_point,
        weight,
        bias,
        params,
        requant,
        None,
        None,
    )
}

/// [`conv2d_int8`] with an explicit dot-product path.
///
/// Errors: those of [`conv2d_int8`], and [`Error::InvalidArgument`] for [`Int8Dot::Packed`]
/// where it is not available.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_int8_with(
    ctx: &GpuContext,
    x: &GpuInt8Tensor,
    x_zero_point: i32,
    weight: &Array4<i8>,
    bias: Option<&Array1<i32>>,
    params: &Conv2dParams,
    requant: &Requant,
    dot: Int8Dot,
) -> Result<GpuInt8Tensor> {
    conv2d_int8_impl(
        ctx,
        x,
        x_zero_point,
        weight,
        bias,
        params,
        requant,
        Some(Int8ConvVariant::Dot(dot)),
        None,
    )
}

/// [`conv2d_int8`] writing into `out`, codes `[N, O, OH, OW]` with a buffer of their own
/// (checked by [`super::check_output`] before the weights are packed and uploaded).
///
/// Errors: those of [`conv2d_int8`]; [`Error::ContextMismatch`], [`Error::ShapeMismatch`] or
/// [`Error::InvalidArgument`] naming `conv2d int8 output` for an unfit `out`.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_int8_into(
    ctx: &GpuContext,
    x: &GpuInt8Tensor,
    x_zero_point: i32,
    weight: &Array4<i8>,
    bias: Option<&Array1<i32>>,
    params: &Conv2dParams,
    requant: &Requant,
    out: &GpuInt8Tensor,
) -> Result<()> {
    conv2d_int8_impl(
        ctx,
        x,
        x_zero_point,
        weight,
        bias,
        params,
        requant,
        None,
        Some(out),
    )
    .map(drop)
}

#[allow(clippy::too_many_arguments)]
fn conv2d_int8_impl(
    ctx: &GpuContext,
    x: &GpuInt8Tensor,
    x_zero_point: i32,
    weight: &Array4<i8>,
    bias: Option<&Array1<i32>>,
    params: &Conv2dParams,
    requant: &Requant,
    variant: Option<Int8ConvVariant>,
    given: Option<&GpuInt8Tensor>,
) -> Result<GpuInt8Tensor> {
    ctx.check_tensor("conv2d int8 input", &x.words)?;
    // The reference's order of checks: geometry first.
    let shape = params.output_shape(x.shape(), weight.shape())?;
    if let Some(out) = given {
        int8_output(ctx, "conv2d int8 output", Some(out), &shape, &[&x.words])?;
    }
    GpuConv2dInt8::new(ctx, x_zero_point, weight, bias, params, requant)?
        .forward_impl(ctx, x, variant, given)
}

/// An integer linear layer prepared for the GPU: weight words `[out, ceil(in/4)]` and per
/// output channel the folded bias `bias − x_zp · Σw`, multiplier and shift
/// ([`crate::reference::int8::linear_int8`]).
#[derive(Debug, Clone)]
pub struct GpuLinearInt8 {
    weight: GpuTensor,
    rows: GpuTensor,
    weight_shape: [usize; 2],
    out_zero_point: i32,
    clamp: (i32, i32),
    mode: RequantMode,
}

impl GpuLinearInt8 {
    /// Packs and uploads symmetric weight codes `[out, in]`, an optional i32 bias `[out]` and
    /// the requantization, for inputs with zero point `x_zero_point`.
    ///
    /// Errors: [`Error::ShapeMismatch`] for a bias that is not `[out]`; an invalid
    /// requantization.
    pub fn new(
        ctx: &GpuContext,
        x_zero_point: i32,
        weight: &Array2<i8>,
        bias: Option<&Array1<i32>>,
        requant: &Requant,
    ) -> Result<Self> {
        let (outs, inp) = weight.dim();
        if let Some(b) = bias {
            if b.len() != outs {
                return Err(Error::shape("quantized linear bias", &[outs], b.shape()));
            }
        }
        requant.validate(outs)?;
        let words = pack_codes(&weight.clone().into_dyn());
        let wsum: Vec<i32> = weight
            .outer_iter()
            .map(|r| r.iter().fold(0i32, |a, &v| a.wrapping_add(i32::from(v))))
            .collect();
        let rows = requant_rows(bias, &wsum, &vec![0; outs], x_zero_point, requant)?;
        Ok(Self {
            weight: GpuTensor::from_slice_u32(ctx, &words, &[outs, inp.div_ceil(4)])?,
            rows: upload_rows(ctx, rows)?,
            weight_shape: [outs, inp],
            out_zero_point: requant.out_zero_point,
            clamp: (requant.clamp_min, requant.clamp_max),
            mode: requant.mode,
        })
    }

    /// The weight shape `[out, in]`.
    pub fn weight_shape(&self) -> [usize; 2] {
        self.weight_shape
    }

    /// Runs the layer on codes `x` `[N, in]` with the context's dot-product path, returning
    /// codes `[N, out]`.
    ///
    /// Errors: [`Error::ShapeMismatch`] for mismatched `in`, [`Error::InvalidArgument`] for
    /// an input that is not rank 2.
    pub fn forward(&self, ctx: &GpuContext, x: &GpuInt8Tensor) -> Result<GpuInt8Tensor> {
        self.forward_with(ctx, x, ctx.int8_dot())
    }

    /// [`GpuLinearInt8::forward`] with an explicit dot-product path.
    ///
    /// Errors: those of [`GpuLinearInt8::forward`], and [`Error::InvalidArgument`] for
    /// [`Int8Dot::Packed`] where it is not available.
    pub fn forward_with(
        &self,
        ctx: &GpuContext,
        x: &GpuInt8Tensor,
        dot: Int8Dot,
    ) -> Result<GpuInt8Tensor> {
        self.forward_impl(ctx, x, dot, None)
    }

    /// [`GpuLinearInt8::forward_with`] writing into `out` (as [`GpuLinearInt8::forward_into`]).
    ///
    /// Errors: those of [`GpuLinearInt8::forward_into`], and [`Error::InvalidArgument`] for
    /// [`Int8Dot::Packed`] where it is not available.
    pub fn forward_with_into(
        &self,
        ctx: &GpuContext,
        x: &GpuInt8Tensor,
        dot: Int8Dot,
        out: &GpuInt8Tensor,
    ) -> Result<()> {
        self.forward_impl(ctx, x, dot, Some(out)).map(drop)
    }

    /// [`GpuLinearInt8::forward`] writing into `out` (codes `[N, out]` with their own buffer,
    /// see [`super::check_output`]).
    pub fn forward_into(
        &self,
        ctx: &GpuContext,
        x: &GpuInt8Tensor,
        out: &GpuInt8Tensor,
    ) -> Result<()> {
        self.forward_impl(ctx, x, ctx.int8_dot(), Some(out))
            .map(drop)
    }

    fn forward_impl(
        &self,
        ctx: &GpuContext,
        x: &GpuInt8Tensor,
        dot: Int8Dot,
        given: Option<&GpuInt8Tensor>,
    ) -> Result<GpuInt8Tensor> {
        ctx.check_tensors(&[
            ("linear int8 input", &x.words),
            ("linear int8 weight", &self.weight),
        ])?;
        let [n, inp] = <[usize; 2]>::try_from(x.shape()).map_err(|_| {
            Error::invalid(format!(
                "quantized linear input must be [N, in] (rank 2), got shape {:?}",
                x.shape()
            ))
        })?;
        let [outs, w_in] = self.weight_shape;
        check_linear_shapes([n, inp], self.weight_shape)?;
        let kernel = conv_kernel(ctx, dot, true)?;
        let inputs = [&x.words, &self.weight, &self.rows];
        let y = int8_output(ctx, "linear int8 output", given, &[n, outs], &inputs)?;
        to_u32(x.words.len(), "linear int8 input word count")?;
        to_u32(self.weight.len(), "linear int8 weight word count")?;
        to_u32(y.words.len(), "linear int8 output word count")?;
        let oq = outs.div_ceil(4);
        let items = n.div_ceil(RB) * oq;
        if items == 0 {
            return Ok(y);
        }
        let cp = ConvParams {
            n: to_u32(n, "linear int8 rows")?,
            c: to_u32(w_in, "linear int8 in_features")?,
            cq: to_u32(w_in.div_ceil(4), "linear int8 input words")?,
            o: to_u32(outs, "linear int8 out_features")?,
            oq: to_u32(oq, "linear int8 output words")?,
            count: to_u32(items, "linear int8 work items")?,
            out_zp: self.out_zero_point,
            lo: self.clamp.0,
            hi: self.clamp.1,
            mode: mode_code(self.mode),
            ..ConvParams::default()
        };
        let uniform = ctx.params(&cp)?;
        ctx.run(&[Launch {
            kernel,
            constants: CONV_CONSTANTS,
            buffers: &[
                &uniform,
                x.words.buffer(),
                self.weight.buffer(),
                self.rows.buffer(),
                y.words.buffer(),
            ],
            workgroups: ctx.grid_1d(items, CONV_WG)?,
        }])?;
        Ok(y)
    }
}

/// The reference's `in` check of [`crate::reference::int8::linear_int8`].
fn check_linear_shapes(x: [usize; 2], w: [usize; 2]) -> Result<()> {
    if x[1] != w[1] {
        return Err(Error::shape(
            format!(
                "quantized linear input [{}, {}] against weight [{}, {}]",
                x[0], x[1], w[0], w[1]
            ),
            &[x[0], w[1]],
            &x,
        ));
    }
    Ok(())
}

/// Integer linear layer on the GPU ([`crate::reference::int8::linear_int8`], bit-exact):
/// codes `x` `[N, in]` with zero point `x_zero_point`, symmetric weight codes `[out, in]`,
/// i32 bias `[out]`; output codes `[N, out]`.
///
/// Errors: the reference's ([`Error::ShapeMismatch`] for mismatched `in` or bias length; an
/// invalid requantization), and [`Error::InvalidArgument`] for an input that is not rank 2.
pub fn linear_int8(
    ctx: &GpuContext,
    x: &GpuInt8Tensor,
    x_zero_point: i32,
    weight: &Array2<i8>,
    bias: Option<&Array1<i32>>,
    requant: &Requant,
) -> Result<GpuInt8Tensor> {
    linear_int8_with(ctx, x, x_zero_point, weight, bias, requant, ctx.int8_dot())
}

/// [`linear_int8`] with an explicit dot-product path.
///
/// Errors: those of [`linear_int8`], and [`Error::InvalidArgument`] for [`Int8Dot::Packed`]
/// where it is not available.
pub fn linear_int8_with(
    ctx: &GpuContext,
    x: &GpuInt8Tensor,
    x_zero_point: i32,
    weight: &Array2<i8>,
    bias: Option<&Array1<i32>>,
    requant: &Requant,
    dot: Int8Dot,
) -> Result<GpuInt8Tensor> {
    linear_int8_impl(ctx, x, x_zero_point, weight, bias, requant, dot, None)
}

/// [`linear_int8`] writing into `out`, codes `[N, out]` with a buffer of their own (checked
/// by [`super::check_output`] before the weights are packed and uploaded).
///
/// Errors: those of [`linear_int8`]; [`Error::ContextMismatch`], [`Error::ShapeMismatch`] or
/// [`Error::InvalidArgument`] naming `linear int8 output` for an unfit `out`.
pub fn linear_int8_into(
    ctx: &GpuContext,
    x: &GpuInt8Tensor,
    x_zero_point: i32,
    weight: &Array2<i8>,
    bias: Option<&Array1<i32>>,
    requant: &Requant,
    out: &GpuInt8Tensor,
) -> Result<()> {
    linear_int8_impl(
        ctx,
        x,
        x_zero_point,
        weight,
        bias,
        requant,
        ctx.int8_dot(),
        Some(out),
    )
    .map(drop)
}

#[allow(clippy::too_many_arguments)]
fn linear_int8_impl(
    ctx: &GpuContext,
    x: &GpuInt8Tensor,
    x_zero_point: i32,
    weight: &Array2<i8>,
    bias: Option<&Array1<i32>>,
    requant: &Requant,
    dot: Int8Dot,
    given: Option<&GpuInt8Tensor>,
) -> Result<GpuInt8Tensor> {
    ctx.check_tensor("linear int8 input", &x.words)?;
    let xs = <[usize; 2]>::try_from(x.shape()).map_err(|_| {
        Error::invalid(format!(
            "quantized linear input must be [N, in] (rank 2), got shape {:?}",
            x.shape()
        ))
    })?;
    check_linear_shapes(xs, [weight.nrows(), weight.ncols()])?;
    if let Some(out) = given {
        let shape = [xs[0], weight.nrows()];
        int8_output(ctx, "linear int8 output", Some(out), &shape, &[&x.words])?;
    }
    GpuLinearInt8::new(ctx, x_zero_point, weight, bias, requant)?.forward_impl(ctx, x, dot, given)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(src: &str, what: &str) {
        let module = naga::front::wgsl::parse_str(src)
            .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(src)));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(src)));
    }

    /// Both compositions of the conv module (and the elementwise one) validate; the
    /// portable one never uses `dot4I8Packed`.
    #[test]
    fn composed_int8_shaders_validate_with_naga() {
        for shader in [
            &ELEMENTWISE,
            &CONV_PORTABLE,
            &CONV_PACKED,
            &CONV_F_PORTABLE,
            &CONV_F_SUBGROUP,
        ] {
            validate(shader.source, shader.name);
        }
        // The portable f32 module uses no subgroup operation.
        let code: String = CONV_F_PORTABLE
            .source
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect();
        assert!(!code.contains("subgroup"));
        let code: String = CONV_PORTABLE
            .source
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect();
        assert!(!code.contains("dot4I8Packed"));
        assert!(!ELEMENTWISE.source.contains("dot4I8Packed"));
        assert!(CONV_PACKED.source.contains("dot4I8Packed(a, b)"));
    }

    #[test]
    fn pack_round_trips() {
        for shape in [
            vec![],
            vec![5],
            vec![2, 7],
            vec![2, 5, 3, 2],
            vec![1, 4, 2],
            vec![3, 0, 2],
        ] {
            let n: usize = shape.iter().product();
            let codes = ArrayD::from_shape_vec(
                IxDyn(&shape),
                (0..n).map(|i| (i as i32 * 37 - 128) as i8).collect(),
            )
            .unwrap();
            let words = pack_codes(&codes);
            assert_eq!(words.len(), packed_words(&shape));
            assert_eq!(
                unpack_codes(&words, &shape).unwrap(),
                codes,
                "{shape:?} {n}"
            );
        }
        assert!(unpack_codes(&[0; 3], &[2, 5]).is_err());
    }
}
