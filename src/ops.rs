//! Descriptions of operations shared by both backends: convolution settings, BatchNorm state,
//! activations, the QAT configuration, and the structs ops return. Plain data.

use ndarray::{Array1, Array4, ArrayD};

use crate::error::{Error, Result};
use crate::quant::{ObserverSpec, QParams};

/// How a conv's zero padding is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PadMode {
    /// `padding` rows above and below, `padding` columns left and right (PyTorch's integer
    /// or pair `padding`; `'valid'` is `[0, 0]`).
    #[default]
    Explicit,
    /// PyTorch's `padding='same'`: the output has the input's size (stride 1 only). The total
    /// padding `dilation·(K − 1)` of each spatial dim is split with the smaller half
    /// (`total / 2`) above / left and the rest below / right, as
    /// `torch.nn.functional.conv2d` does, so an even kernel pads one more row at the bottom and
    /// one more column at the right. `padding` is ignored.
    Same,
}

/// The zero padding of one conv, per side, as [`Conv2dParams::pads`] resolves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvPads {
    /// `[top, left]`: rows and columns of zeros before the input (the offset of the first
    /// output's window).
    pub begin: [usize; 2],
    /// `[bottom, right]`: rows and columns of zeros after the input.
    pub end: [usize; 2],
}

/// conv2d settings, as `torch.nn.Conv2d` takes them (zero padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dParams {
    /// `[stride_h, stride_w]`.
    pub stride: [usize; 2],
    /// `[pad_h, pad_w]` (zeros on both sides) for [`PadMode::Explicit`].
    pub padding: [usize; 2],
    /// `[dilation_h, dilation_w]`.
    pub dilation: [usize; 2],
    /// Number of groups.
    pub groups: usize,
    /// Explicit padding or PyTorch's `'same'`.
    pub pad_mode: PadMode,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Self {
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
            pad_mode: PadMode::Explicit,
        }
    }
}

impl Conv2dParams {
    /// PyTorch's `padding='same'` (stride 1) with the given dilation and groups.
    pub fn same(dilation: [usize; 2], groups: usize) -> Self {
        Self {
            dilation,
            groups,
            pad_mode: PadMode::Same,
            ..Self::default()
        }
    }

    /// The zero padding per side for kernel size `[KH, KW]`: `padding` on both sides for
    /// [`PadMode::Explicit`]; for [`PadMode::Same`] `total = dilation·(K − 1)` split as
    /// `begin = total / 2`, `end = total − begin` (PyTorch's `_conv_forward` with
    /// `padding='same'`). The one geometry the CPU reference and every GPU kernel use.
    ///
    /// Errors: [`Error::InvalidArgument`] for `'same'` with a stride other than 1 (as PyTorch:
    /// "padding='same' is not supported for strided convolutions") or a padding that
    /// overflows.
    pub fn pads(&self, kernel: [usize; 2]) -> Result<ConvPads> {
        match self.pad_mode {
            PadMode::Explicit => Ok(ConvPads {
                begin: self.padding,
                end: self.padding,
            }),
            PadMode::Same => {
                if self.stride != [1, 1] {
                    return Err(Error::invalid(format!(
                        "conv2d padding='same' is not supported for strided convolutions, got \
                         stride {:?}",
                        self.stride
                    )));
                }
                let mut pads = ConvPads {
                    begin: [0; 2],
                    end: [0; 2],
                };
                for i in 0..2 {
                    let total = kernel[i]
                        .saturating_sub(1)
                        .checked_mul(self.dilation[i])
                        .ok_or_else(|| {
                            Error::invalid(format!(
                                "conv2d padding='same': dilation {:?} times kernel {kernel:?} \
                                 overflows",
                                self.dilation
                            ))
                        })?;
                    pads.begin[i] = total / 2;
                    pads.end[i] = total - total / 2;
                }
                Ok(pads)
            }
        }
    }

    /// Checks the settings against input `[N, C, H, W]` and weight `[O, C/g, KH, KW]` shapes
    /// and returns the output shape `[N, O, OH, OW]` and the padding per side
    /// ([`Conv2dParams::pads`]), with
    /// `OH = (H + top + bottom − dil_h·(KH − 1) − 1) / stride_h + 1` (likewise `OW`).
    ///
    /// Errors: as [`Conv2dParams::output_shape`].
    pub fn geometry(&self, x: &[usize], w: &[usize]) -> Result<([usize; 4], ConvPads)> {
        if x.len() != 4 {
            return Err(Error::invalid(format!(
                "conv2d input must be NCHW (rank 4), got shape {x:?}"
            )));
        }
        if w.len() != 4 {
            return Err(Error::invalid(format!(
                "conv2d weight must be OIHW (rank 4), got shape {w:?}"
            )));
        }
        if self.groups == 0 || self.stride.contains(&0) || self.dilation.contains(&0) {
            return Err(Error::invalid(format!(
                "conv2d stride, dilation and groups must be positive, got {self:?}"
            )));
        }
        check_settings("conv2d", &[self.stride, self.padding, self.dilation])?;
        crate::limits::check_elements("conv2d input", x)?;
        crate::limits::check_elements("conv2d weight", w)?;
        let g = self.groups;
        if !x[1].is_multiple_of(g) || !w[0].is_multiple_of(g) {
            return Err(Error::invalid(format!(
                "conv2d groups = {g} must divide input channels {} and output channels {}",
                x[1], w[0]
            )));
        }
        if w[1].checked_mul(g) != Some(x[1]) {
            return Err(Error::shape(
                format!("conv2d weight dim 1 (input channels {} / groups {g})", x[1]),
                &[w[0], x[1] / g, w[2], w[3]],
                w,
            ));
        }
        let pads = self.pads([w[2], w[3]])?;
        let limit = crate::limits::MAX_CONV_SETTING;
        if let Some(v) = pads.begin.iter().chain(&pads.end).find(|&&v| v > limit) {
            // Only 'same' padding derives a padding; it is held to the settings' limit.
            return Err(Error::invalid(format!(
                "conv2d padding='same' with kernel {:?} and dilation {:?} needs a padding of \
                 {v}, more than {limit}",
                &w[2..],
                self.dilation
            )));
        }
        let overflow = || Error::invalid(format!("conv2d padded input size overflows: {self:?}"));
        let mut padded = [0usize; 2];
        for i in 0..2 {
            padded[i] = x[2 + i]
                .checked_add(pads.begin[i])
                .and_then(|v| v.checked_add(pads.end[i]))
                .ok_or_else(overflow)?;
        }
        let mut out = [x[0], w[0], 0, 0];
        for i in 0..2 {
            let span = (w[2 + i].max(1) - 1)
                .checked_mul(self.dilation[i])
                .and_then(|v| v.checked_add(1))
                .ok_or_else(overflow)?;
            if w[2 + i] == 0 || padded[i] < span {
                return Err(Error::invalid(format!(
                    "conv2d kernel {:?} (dilation {:?}) larger than padded input {padded:?}",
                    &w[2..],
                    self.dilation,
                )));
            }
            out[2 + i] = (padded[i] - span) / self.stride[i] + 1;
        }
        // What the op allocates: the output, and (CPU reference) one im2col block per image.
        crate::limits::check_elements("conv2d output", &out)?;
        crate::limits::check_elements("conv2d im2col block", &[w[1], w[2], w[3], out[2], out[3]])?;
        Ok((out, pads))
    }

    /// The one check of the signed 32-bit coordinates a GPU conv kernel forms, for input `x`,
    /// weight `w` that [`Conv2dParams::geometry`] accepted (with its output `out` and `pads`):
    /// per spatial axis the padded input extent, and the reach of the last output's last tap
    /// plus `overhang` more outputs (kernels that compute several output columns per thread
    /// read up to that far), each below `2^31`.
    ///
    /// With settings of at most [`MAX_CONV_SETTING`](crate::limits::MAX_CONV_SETTING) and
    /// tensors of at most [`MAX_TENSOR_ELEMENTS`](crate::limits::MAX_TENSOR_ELEMENTS)
    /// elements, every geometry the shared check accepts passes this one for an overhang
    /// below 64 (see the unit test), so CPU and GPU refuse the same inputs; the check stays so
    /// that raising those limits cannot silently overflow a kernel's coordinates.
    ///
    /// Errors: [`Error::TooLarge`] naming `op` and the axis.
    pub fn check_kernel_coordinates(
        &self,
        op: &str,
        x: &[usize],
        w: &[usize],
        out: [usize; 4],
        pads: &ConvPads,
        overhang: usize,
    ) -> Result<()> {
        for i in 0..2 {
            let padded = x[2 + i]
                .saturating_add(pads.begin[i])
                .saturating_add(pads.end[i]);
            let reach = out[2 + i]
                .saturating_add(overhang)
                .saturating_mul(self.stride[i])
                .saturating_add(w[2 + i].saturating_mul(self.dilation[i]));
            let extent = padded.max(reach);
            if extent > i32::MAX as usize {
                return Err(Error::TooLarge {
                    what: format!("{op} coordinate extent along axis {}", 2 + i),
                    size: extent as u64,
                    limit: i32::MAX as u64,
                    unit: "positions (a GPU kernel's i32 coordinates)",
                });
            }
        }
        Ok(())
    }

    /// Checks the settings against input `[N, C, H, W]` and weight `[O, C/g, KH, KW]` shapes
    /// and returns the output shape `[N, O, OH, OW]` (see [`Conv2dParams::geometry`]).
    ///
    /// This is the one geometry check of conv2d, called by the CPU reference and the GPU
    /// launchers alike, so both refuse the same input with the same message; every size is
    /// computed with checked arithmetic.
    ///
    /// Errors: [`Error::InvalidArgument`] for a tensor that is not rank 4, non-positive
    /// stride, dilation or groups, a stride, padding (given, or derived for `'same'`) or
    /// dilation above [`MAX_CONV_SETTING`](crate::limits::MAX_CONV_SETTING), groups that do not divide the
    /// channels, `'same'` padding with a stride other than 1, or a kernel larger than the
    /// padded input; [`Error::ShapeMismatch`] for a weight whose dim 1 is not `C / groups`;
    /// [`Error::TooLarge`] for an input, weight, output or im2col block of more than
    /// [`MAX_TENSOR_ELEMENTS`](crate::limits::MAX_TENSOR_ELEMENTS) elements.
    pub fn output_shape(&self, x: &[usize], w: &[usize]) -> Result<[usize; 4]> {
        self.geometry(x, w).map(|(out, _)| out)
    }
}

/// The rank check of BatchNorm folding into a conv weight
/// ([`crate::reference::fold::fuse_conv_bn_weights`]; it runs before the BatchNorm is
/// validated): `[out, in/groups, k...]`, rank at least 3.
pub fn check_conv_weight_rank(shape: &[usize]) -> Result<()> {
    if shape.len() < 3 {
        return Err(Error::invalid(format!(
            "conv weight must have rank >= 3 ([out, in/groups, k...]), got shape {shape:?}"
        )));
    }
    Ok(())
}

/// The geometry of the linear layer `x · Wᵀ + b` ([`crate::reference::layers::linear`] and
/// [`crate::kernels::linear`]): `x` `[N, in]`, weight `[out, in]`, optional bias `[out]`.
/// Returns `[N, in, out]`.
///
/// Errors: [`Error::ShapeMismatch`] when `x`'s columns differ from the weight's (naming both
/// shapes) or the bias is not `[out]`; [`Error::TooLarge`] when the output `[N, out]` has more
/// than [`MAX_TENSOR_ELEMENTS`](crate::limits::MAX_TENSOR_ELEMENTS) elements (possible with
/// small inputs: `in` may be 0).
pub fn check_linear(x: [usize; 2], w: [usize; 2], bias: Option<&[usize]>) -> Result<[usize; 3]> {
    let ([n, inp], [out, w_in]) = (x, w);
    if inp != w_in {
        return Err(Error::shape(
            format!("linear: input {x:?} vs weight {w:?} (in_features)"),
            &[n, w_in],
            &x,
        ));
    }
    if let Some(b) = bias {
        if b != [out] {
            return Err(Error::shape(
                format!("linear bias (weight {w:?})"),
                &[out],
                b,
            ));
        }
    }
    crate::limits::check_elements("linear output", &[n, out])?;
    Ok([n, inp, out])
}

/// The input check of the quantized linear layer ([`crate::reference::int8::linear_int8`]):
/// `x` `[N, in]` against weight `[out, in]` (both rank 2), and the output `[N, out]` within
/// [`MAX_TENSOR_ELEMENTS`](crate::limits::MAX_TENSOR_ELEMENTS) ([`Error::TooLarge`]).
pub fn check_linear_int8_input(x: &[usize], w: &[usize]) -> Result<()> {
    if x.len() != 2 || w.len() != 2 || x[1] != w[1] {
        let (xn, xc) = (
            x.first().copied().unwrap_or(0),
            x.get(1).copied().unwrap_or(0),
        );
        let (wr, wc) = (
            w.first().copied().unwrap_or(0),
            w.get(1).copied().unwrap_or(0),
        );
        return Err(Error::shape(
            format!("quantized linear input [{xn}, {xc}] against weight [{wr}, {wc}]"),
            &[xn, wc],
            x,
        ));
    }
    crate::limits::check_elements("quantized linear output", &[x[0], w[0]])?;
    Ok(())
}

/// The output size `(OH, OW)` of 2-D max pooling without padding
/// (`torch.nn.functional.max_pool2d`), shared by the reference and the kernels.
///
/// Errors: [`Error::InvalidArgument`] for a zero kernel or stride, or a kernel larger than the
/// input's height or width.
pub fn max_pool2d_output(
    h: usize,
    w: usize,
    kernel: usize,
    stride: usize,
) -> Result<(usize, usize)> {
    if kernel == 0 || stride == 0 {
        return Err(Error::invalid(format!(
            "max_pool2d kernel and stride must be positive, got kernel {kernel}, stride {stride}"
        )));
    }
    if kernel > h || kernel > w {
        return Err(Error::invalid(format!(
            "max_pool2d kernel {kernel} is larger than the input's spatial size [{h}, {w}]"
        )));
    }
    Ok(((h - kernel) / stride + 1, (w - kernel) / stride + 1))
}

/// 2-D max pooling with zero-cost padding (`torch.nn.MaxPool2d(kernel, stride, padding)`,
/// ONNX `MaxPool` with symmetric `pads`, floor mode, no dilation): padded positions never win
/// (they count as −∞ for floats and as below every code for int8), so on codes the result is
/// exactly the float max pooling of the dequantized values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool2d {
    /// Window `[KH, KW]`.
    pub kernel: [usize; 2],
    /// Step `[SH, SW]`.
    pub stride: [usize; 2],
    /// Padding `[PH, PW]` on each side.
    pub padding: [usize; 2],
}

impl Pool2d {
    /// The output size `(OH, OW)` for an `h × w` input, `(h + 2·ph − kh) / sh + 1` (floor),
    /// shared by the reference and the kernels.
    ///
    /// Errors: [`Error::InvalidArgument`] for a zero kernel or stride, a padding not smaller
    /// than the kernel (a window could then hold only padding), a kernel larger than the
    /// padded input, or a setting above [`crate::limits::MAX_CONV_SETTING`].
    pub fn output(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let [kh, kw] = self.kernel;
        let [sh, sw] = self.stride;
        let [ph, pw] = self.padding;
        let big = crate::limits::MAX_CONV_SETTING;
        if kh == 0 || kw == 0 || sh == 0 || sw == 0 {
            return Err(Error::invalid(format!(
                "max pooling kernel and stride must be positive, got kernel {:?}, stride {:?}",
                self.kernel, self.stride
            )));
        }
        if [kh, kw, sh, sw, ph, pw].iter().any(|&v| v > big) {
            return Err(Error::invalid(format!(
                "max pooling settings (kernel {:?}, stride {:?}, padding {:?}) exceed {big}",
                self.kernel, self.stride, self.padding
            )));
        }
        if ph >= kh || pw >= kw {
            return Err(Error::invalid(format!(
                "max pooling padding {:?} must be smaller than the kernel {:?}",
                self.padding, self.kernel
            )));
        }
        let (eh, ew) = (h.checked_add(2 * ph), w.checked_add(2 * pw));
        match (eh, ew) {
            (Some(eh), Some(ew)) if eh >= kh && ew >= kw => {
                Ok(((eh - kh) / sh + 1, (ew - kw) / sw + 1))
            }
            _ => Err(Error::invalid(format!(
                "max pooling kernel {:?} is larger than the padded input [{h}, {w}] + {:?}",
                self.kernel, self.padding
            ))),
        }
    }
}

/// The largest spatial extent `H·W` global average pooling accepts on codes: the i32 sum
/// of `H·W` differences `q − z` (each within `[−255, 255]`) cannot overflow.
pub const MAX_GLOBAL_POOL_EXTENT: usize = 1 << 23;

/// The one check of global average pooling (`GlobalAveragePool`, `AdaptiveAvgPool2d(1)`):
/// an NCHW input with a non-empty spatial extent of at most [`MAX_GLOBAL_POOL_EXTENT`].
/// Returns `H·W`.
///
/// Errors: [`Error::InvalidArgument`] for another rank, an empty or too large extent.
pub fn global_pool_extent(shape: &[usize]) -> Result<usize> {
    let [_, _, h, w] = <[usize; 4]>::try_from(shape).map_err(|_| {
        Error::invalid(format!(
            "global average pooling needs an NCHW input, got shape {shape:?}"
        ))
    })?;
    match h.checked_mul(w) {
        Some(n) if n > 0 && n <= MAX_GLOBAL_POOL_EXTENT => Ok(n),
        _ => Err(Error::invalid(format!(
            "global average pooling over [{h}, {w}]: the extent must be in 1..={MAX_GLOBAL_POOL_EXTENT}"
        ))),
    }
}

/// The one check of a float elementwise add ([`crate::backend::FloatOps::add`]): both
/// operands have the same shape (no broadcasting).
///
/// Errors: [`Error::ShapeMismatch`] naming both shapes.
pub fn check_add(a: &[usize], b: &[usize]) -> Result<()> {
    if a != b {
        return Err(Error::shape("add (b vs a)", a, b));
    }
    Ok(())
}

/// One pooled dim's output size (ONNX `MaxPool` / `AveragePool`, PyTorch's pooling):
/// `(input + pad_begin + pad_end − ((k − 1)·d + 1)) / s + 1`, rounded up with `ceil`, where a
/// last window that would start in the end padding is dropped.
///
/// Errors: [`Error::InvalidArgument`] when the window does not fit the padded input.
pub fn pool_output_dim(
    input: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
    pad_begin: usize,
    pad_end: usize,
    ceil: bool,
) -> Result<usize> {
    let err = || {
        Error::invalid(format!(
            "pool window {kernel} (dilation {dilation}) does not fit input {input} with pads {pad_begin}+{pad_end}"
        ))
    };
    let reach = kernel
        .checked_sub(1)
        .and_then(|k1| k1.checked_mul(dilation))
        .and_then(|r| r.checked_add(1))
        .ok_or_else(err)?;
    let padded = input
        .checked_add(pad_begin)
        .and_then(|v| v.checked_add(pad_end))
        .ok_or_else(err)?;
    let span = padded.checked_sub(reach).ok_or_else(err)?;
    if stride == 0 {
        return Err(err());
    }
    let mut out = if ceil {
        span.div_ceil(stride)
    } else {
        span / stride
    } + 1;
    if ceil && (out - 1) * stride >= input + pad_begin {
        out -= 1;
    }
    Ok(out)
}

/// The one check of 2-D zero padding (`torch.nn.functional.pad` of an NCHW tensor, the
/// asymmetric pads of an ONNX Conv): an NCHW input, pads `[top, left, bottom, right]`, an
/// output within the element limit. Returns the output shape.
///
/// Errors: [`Error::InvalidArgument`] for another rank or pads that overflow,
/// [`Error::TooLarge`].
pub fn pad2d_output_shape(x: &[usize], pads: [usize; 4]) -> Result<[usize; 4]> {
    let [n, c, h, w] = <[usize; 4]>::try_from(x)
        .map_err(|_| Error::invalid(format!("2-D padding needs an NCHW input, got shape {x:?}")))?;
    let add = |a: usize, b: usize, d: usize| {
        a.checked_add(b)
            .and_then(|s| s.checked_add(d))
            .ok_or_else(|| Error::invalid(format!("padding {pads:?} overflows")))
    };
    let shape = [n, c, add(pads[0], pads[2], h)?, add(pads[1], pads[3], w)?];
    crate::limits::check_elements("padded input", &shape)?;
    Ok(shape)
}

/// What a pooling window computes ([`PoolWindow`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// The maximum of the window's input positions (padding never wins; NaN propagates).
    Max,
    /// The mean of the window (ONNX `AveragePool`): the sum of its input positions divided by
    /// their count, or with `count_include_pad` by the count of its positions inside the
    /// padded input (positions past the end padding, which `ceil_mode` windows can reach,
    /// never count).
    Avg {
        /// ONNX's `count_include_pad` (PyTorch's `count_include_pad`).
        count_include_pad: bool,
    },
}

/// A 2-D pooling window as ONNX `MaxPool` / `AveragePool` describe it (PyTorch's
/// `MaxPool2d` / `AvgPool2d`): kernel, strides, dilations, per-side pads and `ceil_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolWindow {
    /// Window `[KH, KW]`.
    pub kernel: [usize; 2],
    /// Step `[SH, SW]`.
    pub stride: [usize; 2],
    /// Dilation `[DH, DW]` (1: contiguous windows).
    pub dilation: [usize; 2],
    /// Padding `[top, left, bottom, right]`.
    pub pads: [usize; 4],
    /// Output sizes rounded up (a last partial window kept unless it starts in the padding).
    pub ceil_mode: bool,
}

impl PoolWindow {
    /// The one check of 2-D pooling, shared by the reference and the kernels: an NCHW input,
    /// positive settings at most [`crate::limits::MAX_CONV_SETTING`], pads smaller than the
    /// kernel (ONNX: every window holds an input position), a window that fits the padded
    /// input, and an output within the element limit. Returns the output shape
    /// `[N, C, OH, OW]`.
    ///
    /// Errors: [`Error::InvalidArgument`] for a bad setting or rank, [`Error::TooLarge`].
    pub fn output_shape(&self, x: &[usize]) -> Result<[usize; 4]> {
        let [n, c, h, w] = <[usize; 4]>::try_from(x).map_err(|_| {
            Error::invalid(format!("2-D pooling needs an NCHW input, got shape {x:?}"))
        })?;
        let [kh, kw] = self.kernel;
        let settings = [
            kh,
            kw,
            self.stride[0],
            self.stride[1],
            self.dilation[0],
            self.dilation[1],
        ];
        if settings.contains(&0) {
            return Err(Error::invalid(format!(
                "pool kernel, stride and dilation must be positive, got kernel {:?}, stride {:?}, dilation {:?}",
                self.kernel, self.stride, self.dilation
            )));
        }
        let big = crate::limits::MAX_CONV_SETTING;
        if settings.iter().chain(&self.pads).any(|&v| v > big) {
            return Err(Error::invalid(format!(
                "pool settings (kernel {:?}, stride {:?}, dilation {:?}, pads {:?}) exceed {big}",
                self.kernel, self.stride, self.dilation, self.pads
            )));
        }
        if (0..4).any(|i| self.pads[i] >= self.kernel[i % 2]) {
            return Err(Error::invalid(format!(
                "pool pads {:?} must be smaller than the kernel {:?}",
                self.pads, self.kernel
            )));
        }
        let oh = pool_output_dim(
            h,
            kh,
            self.stride[0],
            self.dilation[0],
            self.pads[0],
            self.pads[2],
            self.ceil_mode,
        )?;
        let ow = pool_output_dim(
            w,
            kw,
            self.stride[1],
            self.dilation[1],
            self.pads[1],
            self.pads[3],
            self.ceil_mode,
        )?;
        crate::limits::check_elements("pool output", &[n, c, oh, ow])?;
        Ok([n, c, oh, ow])
    }
}

/// An elementwise binary op with numpy broadcasting ([`broadcast_shape`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    /// `a + b` (ONNX `Add`).
    Add,
    /// `a · b` (ONNX `Mul`).
    Mul,
}

impl BinaryOp {
    /// The op on one pair of elements (the spec the kernels follow: one f32 rounding).
    pub fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            Self::Add => a + b,
            Self::Mul => a * b,
        }
    }
}

/// The largest rank broadcasting ops ([`broadcast_shape`]) and [`concat_shape`] take.
pub const MAX_BROADCAST_RANK: usize = 8;

/// The one check of numpy (ONNX multidirectional) broadcasting of two shapes: dims aligned
/// at the right, each pair equal or one of them 1. Returns the output shape.
///
/// Errors: [`Error::InvalidArgument`] for shapes that do not broadcast or a rank above
/// [`MAX_BROADCAST_RANK`]; [`Error::TooLarge`] for an output past the element limit.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    if r > MAX_BROADCAST_RANK {
        return Err(Error::invalid(format!(
            "broadcasting shapes {a:?} and {b:?}: rank above {MAX_BROADCAST_RANK}"
        )));
    }
    let dim = |s: &[usize], i: usize| {
        let off = r - s.len();
        if i < off {
            1
        } else {
            s[i - off]
        }
    };
    let mut shape = Vec::with_capacity(r);
    for i in 0..r {
        shape.push(match (dim(a, i), dim(b, i)) {
            (p, q) if p == q => p,
            (1, q) => q,
            (p, 1) => p,
            _ => {
                return Err(Error::invalid(format!(
                    "shapes {a:?} and {b:?} do not broadcast"
                )))
            }
        });
    }
    crate::limits::check_elements("broadcast output", &shape)?;
    Ok(shape)
}

/// The one check of a concatenation along `axis` (negative: from the end, ONNX `Concat`):
/// at least one part, equal ranks (at most [`MAX_BROADCAST_RANK`]), every dim but the axis
/// equal. Returns the axis and the output shape.
///
/// Errors: [`Error::AxisOutOfRange`], [`Error::ShapeMismatch`], [`Error::InvalidArgument`],
/// [`Error::TooLarge`].
pub fn concat_shape(parts: &[&[usize]], axis: i64) -> Result<(usize, Vec<usize>)> {
    let first = parts
        .first()
        .ok_or_else(|| Error::invalid("Concat of no inputs"))?;
    let r = first.len();
    if r > MAX_BROADCAST_RANK {
        return Err(Error::invalid(format!(
            "Concat of rank {r}: rank above {MAX_BROADCAST_RANK}"
        )));
    }
    let ax = if axis < 0 { axis + r as i64 } else { axis };
    if !(0..r as i64).contains(&ax) {
        return Err(Error::AxisOutOfRange {
            axis: isize::try_from(axis).unwrap_or(isize::MAX),
            rank: r,
        });
    }
    let ax = ax as usize;
    let mut shape = first.to_vec();
    let mut total = 0usize;
    for p in parts {
        if p.len() != r {
            return Err(Error::shape("Concat input", first, p));
        }
        total = total
            .checked_add(p[ax])
            .ok_or_else(|| Error::invalid("Concat size overflows"))?;
        let same = (0..r).all(|i| i == ax || p[i] == first[i]);
        if !same {
            return Err(Error::shape("Concat input", first, p));
        }
    }
    shape[ax] = total;
    crate::limits::check_elements("Concat output", &shape)?;
    Ok((ax, shape))
}

/// Checks a max pooling backward: `dy` must have the forward output shape of `x_shape`
/// ([`max_pool2d_output`]). Returns `(oh, ow)`.
///
/// Errors: [`Error::InvalidArgument`] for an input that is not rank 4 or a bad kernel / stride
/// (the forward's messages); [`Error::ShapeMismatch`] when `dy` is not `[N, C, OH, OW]`.
pub fn check_max_pool2d_backward(
    x_shape: &[usize],
    dy_shape: &[usize],
    kernel: usize,
    stride: usize,
) -> Result<(usize, usize)> {
    let [n, c, h, w] = <[usize; 4]>::try_from(x_shape).map_err(|_| {
        Error::invalid(format!(
            "max_pool2d input must be NCHW (rank 4), got shape {x_shape:?}"
        ))
    })?;
    let (oh, ow) = max_pool2d_output(h, w, kernel, stride)?;
    if dy_shape != [n, c, oh, ow] {
        return Err(Error::shape(
            "max_pool2d_backward dy (forward output shape)",
            &[n, c, oh, ow],
            dy_shape,
        ));
    }
    Ok((oh, ow))
}
/// Checks a linear backward: `x` `[N, in]`, weight `[out, in]`, `dy` `[N, out]`.
///
/// Errors: [`Error::InvalidArgument`] for a tensor that is not rank 2;
/// [`Error::ShapeMismatch`] for `in_features` that differ or a `dy` that is not `[N, out]`.
pub fn check_linear_backward(
    x_shape: &[usize],
    w_shape: &[usize],
    dy_shape: &[usize],
) -> Result<[usize; 3]> {
    let rank2 = |what: &str, s: &[usize]| {
        <[usize; 2]>::try_from(s)
            .map_err(|_| Error::invalid(format!("linear {what} must be rank 2, got shape {s:?}")))
    };
    let x = rank2("input", x_shape)?;
    let w = rank2("weight", w_shape)?;
    rank2("backward dy", dy_shape)?;
    let [n, inp, out] = check_linear(x, w, None)?;
    if dy_shape != [n, out] {
        return Err(Error::shape(
            "linear_backward dy (forward output shape)",
            &[n, out],
            dy_shape,
        ));
    }
    Ok([n, inp, out])
}
/// Checks class labels against `classes` (PyTorch's `Target 12 is out of bounds.`).
///
/// Errors: [`Error::InvalidArgument`] for a label `≥ classes`.
pub fn check_labels(labels: &[u32], classes: usize) -> Result<()> {
    if let Some(&l) = labels.iter().find(|&&l| l as usize >= classes) {
        return Err(Error::invalid(format!(
            "Target {l} is out of bounds (classes: {classes})"
        )));
    }
    Ok(())
}
/// Checks a classification op's inputs: scores `[N, C]` with `C > 0` and one label per row.
/// Returns `[N, C]`.
///
/// Errors: [`Error::InvalidArgument`] unless the scores are rank 2 with at least one class;
/// [`Error::ShapeMismatch`] when the labels are not `[N]`.
pub fn check_classification(
    op: &str,
    scores_shape: &[usize],
    labels_shape: &[usize],
) -> Result<[usize; 2]> {
    let [n, c] = <[usize; 2]>::try_from(scores_shape).map_err(|_| {
        Error::invalid(format!(
            "{op} input must be [N, C] (rank 2), got shape {scores_shape:?}"
        ))
    })?;
    if c == 0 {
        return Err(Error::invalid(format!(
            "{op} input must have at least one class, got shape {scores_shape:?}"
        )));
    }
    if labels_shape != [n] {
        return Err(Error::shape(format!("{op} labels"), &[n], labels_shape));
    }
    Ok([n, c])
}
/// The shared checks of one running-observer step ([`crate::backend::QuantOps::observe_running`]):
/// `spec` valid, a non-empty input `x_shape` with `spec`'s per-channel axis, and the running
/// `state_shape` (when there is one) `[2, C]` for the input's `C`
/// ([`check_observer_update`]). Returns the resolved channel axis (`None` per tensor), `C`,
/// and `spec` with its axis resolved against the input's rank ([`ObserverSpec::for_rank`]).
///
/// Errors: [`ObserverSpec::validate`]'s; [`Error::AxisOutOfRange`]; [`Error::InvalidArgument`]
/// for an empty input or an averaging constant outside `[0, 1]`; [`Error::ShapeMismatch`]
/// for a state of another channel count.
pub fn check_running_observer(
    x_shape: &[usize],
    state_shape: Option<&[usize]>,
    spec: &ObserverSpec,
    averaging_constant: Option<f32>,
) -> Result<(Option<usize>, usize, ObserverSpec)> {
    spec.validate()?;
    if x_shape.contains(&0) {
        return Err(Error::invalid(format!(
            "an observer cannot observe an empty tensor (shape {x_shape:?})"
        )));
    }
    let spec = spec.for_rank(x_shape.len())?;
    let axis = if spec.qscheme.is_per_channel() {
        Some(spec.channel_axis(x_shape.len())?)
    } else {
        None
    };
    let c = axis.map_or(1, |a| x_shape[a]);
    let batch = [2, c];
    check_observer_update(state_shape.unwrap_or(&batch), &batch, averaging_constant)?;
    Ok((axis, c, spec))
}

/// The shared checks of [`crate::reference::train::observer_update`]: both `[2, C]`, the same `C`, an averaging
/// constant in `[0, 1]`. Returns `C`.
///
/// Errors: as [`crate::reference::train::observer_update`].
pub fn check_observer_update(
    state_shape: &[usize],
    batch_shape: &[usize],
    averaging_constant: Option<f32>,
) -> Result<usize> {
    let c = match state_shape {
        [2, c] => *c,
        _ => {
            let c = state_shape.get(1).copied().unwrap_or(0);
            return Err(Error::shape(
                "observer state (min/max rows)",
                &[2, c],
                state_shape,
            ));
        }
    };
    if batch_shape != [2, c] {
        return Err(Error::shape(
            "observer batch min/max (vs state)",
            &[2, c],
            batch_shape,
        ));
    }
    if let Some(k) = averaging_constant {
        if !(0.0..=1.0).contains(&k) {
            return Err(Error::invalid(format!(
                "averaging_constant must be in [0, 1], got {k}"
            )));
        }
    }
    Ok(c)
}

/// The shape `torch.flatten(x, 1)` gives: `[N, rest]` for an input `[N, ...]`.
///
/// Errors: [`Error::InvalidArgument`] for a scalar, or an element count that overflows.
pub fn flatten_shape(shape: &[usize]) -> Result<[usize; 2]> {
    let Some((&n, rest)) = shape.split_first() else {
        return Err(Error::invalid("flatten needs an input of rank >= 1"));
    };
    let rest = rest
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::invalid(format!("flatten: shape {shape:?} overflows")))?;
    Ok([n, rest])
}

/// The shape `torch.flatten(x, start_dim, end_dim)` gives (negative dims count from the
/// end): the dims `start_dim..=end_dim` merged into one.
///
/// Errors: [`Error::InvalidArgument`] for dims that do not fit `shape`.
pub fn flatten_dims(shape: &[usize], start_dim: isize, end_dim: isize) -> Result<Vec<usize>> {
    let r = shape.len() as isize;
    let norm = |d: isize| if d < 0 { d + r } else { d };
    let (s, e) = (norm(start_dim), norm(end_dim));
    if r == 0 || s < 0 || e >= r || s > e {
        return Err(Error::invalid(format!(
            "Flatten(start_dim={start_dim}, end_dim={end_dim}) does not fit an input of shape \
             {shape:?}"
        )));
    }
    let (s, e) = (s as usize, e as usize);
    let mut out: Vec<usize> = shape[..s].to_vec();
    out.push(shape[s..=e].iter().product());
    out.extend_from_slice(&shape[e + 1..]);
    Ok(out)
}

/// A reshape keeps the element count: `Err(ShapeMismatch)` unless `from` and `to` hold as
/// many elements (checked products).
pub fn check_reshape(from: &[usize], to: &[usize]) -> Result<()> {
    let count = |s: &[usize]| s.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match (count(from), count(to)) {
        (Some(a), Some(b)) if a == b => Ok(()),
        _ => Err(Error::shape(
            format!("reshape of {from:?} (element count)"),
            from,
            to,
        )),
    }
}

/// Refuses a stride, padding, dilation or output padding above
/// [`MAX_CONV_SETTING`](crate::limits::MAX_CONV_SETTING).
fn check_settings(op: &str, settings: &[[usize; 2]]) -> Result<()> {
    let limit = crate::limits::MAX_CONV_SETTING;
    if let Some(v) = settings.iter().flatten().find(|&&v| v > limit) {
        return Err(Error::invalid(format!(
            "{op} stride, padding and dilation must be at most {limit}, got {v}"
        )));
    }
    Ok(())
}

/// A BatchNorm's parameters and running statistics (`torch.nn.BatchNorm{1,2,3}d`).
/// `weight`/`bias` are `None` for `affine=False`.
///
/// Generic over where the per-channel vectors live: `T = Array1<f32>` (the default) on the
/// host, a backend's tensor type ([`crate::backend::Device::Tensor`]) on a device, so a
/// BatchNorm is built from device tensors with no host round trip.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNorm<T = Array1<f32>> {
    /// γ, or `None` (treated as ones).
    pub weight: Option<T>,
    /// β, or `None` (treated as zeros).
    pub bias: Option<T>,
    /// Running mean.
    pub running_mean: T,
    /// Running (unbiased) variance.
    pub running_var: T,
    /// ε added to the variance.
    pub eps: f32,
    /// Momentum of the running statistics update (PyTorch's convention: `new = (1-m)·old + m·batch`).
    pub momentum: f32,
}

impl<T> BatchNorm<T> {
    /// The same BatchNorm with every per-channel vector mapped by `f` (an upload, a
    /// download, a conversion), failing on `f`'s first error.
    pub fn try_map<U>(&self, mut f: impl FnMut(&T) -> Result<U>) -> Result<BatchNorm<U>> {
        Ok(BatchNorm {
            weight: self.weight.as_ref().map(&mut f).transpose()?,
            bias: self.bias.as_ref().map(&mut f).transpose()?,
            running_mean: f(&self.running_mean)?,
            running_var: f(&self.running_var)?,
            eps: self.eps,
            momentum: self.momentum,
        })
    }
}

impl BatchNorm {
    /// Number of channels (`num_features`).
    pub fn channels(&self) -> usize {
        self.running_mean.len()
    }

    /// Checks that every per-channel tensor has the same length and `eps` is non-negative.
    pub fn validate(&self) -> Result<()> {
        let c = self.channels();
        let check = |name: &str, a: &Array1<f32>| {
            if a.len() == c {
                Ok(())
            } else {
                Err(Error::shape(format!("BatchNorm {name}"), &[c], a.shape()))
            }
        };
        check("running_var", &self.running_var)?;
        if let Some(w) = &self.weight {
            check("weight", w)?;
        }
        if let Some(b) = &self.bias {
            check("bias", b)?;
        }
        if self.eps.is_nan() || self.eps < 0.0 {
            return Err(Error::invalid(format!(
                "BatchNorm eps must be >= 0, got {}",
                self.eps
            )));
        }
        Ok(())
    }
}

/// The activation that closes a fused pattern.
///
/// Not `Eq`: [`Activation::LeakyRelu`] carries an `f32` slope.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Activation {
    /// Identity.
    #[default]
    None,
    /// `torch.nn.ReLU`.
    Relu,
    /// `torch.nn.ReLU6`.
    Relu6,
    /// `torch.nn.LeakyReLU(negative_slope)`: `x > 0 ? x : x * negative_slope`.
    LeakyRelu {
        /// The slope for `x <= 0` (PyTorch's default is `0.01`).
        negative_slope: f32,
    },
    /// `torch.nn.Hardswish`: `x * clamp(x + 3, 0, 6) / 6`.
    Hardswish,
}

impl Activation {
    /// PyTorch's default `LeakyReLU` slope, `0.01`.
    pub const DEFAULT_NEGATIVE_SLOPE: f32 = 0.01;

    /// The clamp bounds `[lo, hi]` of an output quantized with `scale` / `zero_point` in
    /// `range` after a fused activation, matching what fake quantization of the activation's
    /// output gives: `None` → the range; ReLU → `lo = max(qmin, zp)`; ReLU6 → also
    /// `hi = min(qmax, round_ties_even(6 · (1/scale)) + zp)` (1/scale in f32, as
    /// [`crate::reference::fake_quant`] computes it).
    ///
    /// Errors: [`Error::InvalidArgument`] for activations an integer kernel cannot clamp
    /// (LeakyReLU, Hardswish), or a range outside `[-128, 127]`.
    pub fn int8_bounds(
        self,
        scale: f32,
        zero_point: i32,
        range: crate::quant::QuantRange,
    ) -> Result<(i32, i32)> {
        range.check_int8_codes()?;
        let (qmin, qmax) = (range.quant_min, range.quant_max);
        match self {
            Activation::None => Ok((qmin, qmax)),
            Activation::Relu => Ok((zero_point.max(qmin).min(qmax), qmax)),
            Activation::Relu6 => {
                let six = (6.0f32 * (1.0f32 / scale)).round_ties_even();
                let hi = if six >= (qmax - zero_point) as f32 {
                    qmax
                } else {
                    six as i32 + zero_point
                };
                let lo = zero_point.max(qmin).min(qmax);
                Ok((lo, hi.max(lo)))
            }
            other => Err(Error::invalid(format!(
                "activation {other:?} has no integer epilogue (only none, ReLU and ReLU6 fold into \
                 the requantization clamp)"
            ))),
        }
    }

    /// Parses `none` (or `identity`), `relu`, `relu6`, `hardswish`, `leaky_relu` (slope
    /// 0.01) and `leaky_relu:<slope>`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "none" | "identity" => Ok(Self::None),
            "relu" => Ok(Self::Relu),
            "relu6" => Ok(Self::Relu6),
            "hardswish" => Ok(Self::Hardswish),
            "leaky_relu" => Ok(Self::LeakyRelu {
                negative_slope: Self::DEFAULT_NEGATIVE_SLOPE,
            }),
            other => {
                if let Some(slope) = other.strip_prefix("leaky_relu:") {
                    return match slope.trim().parse::<f32>() {
                        Ok(v) if v.is_finite() => Ok(Self::LeakyRelu { negative_slope: v }),
                        _ => Err(Error::invalid(format!(
                            "leaky_relu slope must be a finite number, got `{slope}`"
                        ))),
                    };
                }
                Err(Error::invalid(format!(
                    "unknown activation `{other}` (expected none, relu, relu6, hardswish, \
                     leaky_relu, leaky_relu:<slope>)"
                )))
            }
        }
    }

    /// Whether the activation's gradient can be evaluated on its output instead of its input:
    /// true for ReLU and ReLU6, whose output is inside `(0, 6)` / above 0 exactly where the
    /// input is (NaN in neither), as PyTorch's `threshold_backward` takes ReLU's result; false
    /// for LeakyReLU and Hardswish (their slopes need the input) and for `None` (no gradient
    /// mask).
    pub fn grad_from_output(self) -> bool {
        matches!(self, Self::Relu | Self::Relu6)
    }

    /// PyTorch's module type name (`ReLU`, `ReLU6`, `LeakyReLU`, `Hardswish`; `Identity` for
    /// [`Activation::None`]).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::None => "Identity",
            Self::Relu => "ReLU",
            Self::Relu6 => "ReLU6",
            Self::LeakyRelu { .. } => "LeakyReLU",
            Self::Hardswish => "Hardswish",
        }
    }
}

/// conv_transpose2d settings, as `torch.nn.ConvTranspose2d` takes them (zero padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvTranspose2dParams {
    /// `[stride_h, stride_w]`.
    pub stride: [usize; 2],
    /// `[pad_h, pad_w]`: `dilation * (kernel - 1) - padding` zeros are added to each side of the
    /// (dilated) input, as in PyTorch.
    pub padding: [usize; 2],
    /// `[out_pad_h, out_pad_w]`: extra rows / columns on one side of the output; each must be
    /// smaller than the stride or the dilation of its dimension.
    pub output_padding: [usize; 2],
    /// `[dilation_h, dilation_w]`.
    pub dilation: [usize; 2],
    /// Number of groups.
    pub groups: usize,
}

impl Default for ConvTranspose2dParams {
    fn default() -> Self {
        Self {
            stride: [1, 1],
            padding: [0, 0],
            output_padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
        }
    }
}

impl ConvTranspose2dParams {
    /// The settings of the conv2d whose input gradient this transposed conv is (everything but
    /// `output_padding`).
    pub fn as_conv(&self) -> Conv2dParams {
        Conv2dParams {
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
            groups: self.groups,
            pad_mode: PadMode::Explicit,
        }
    }

    /// Checks the settings against input `[N, Cin, H, W]` and weight `[Cin, Cout/g, KH, KW]`
    /// shapes and returns the output shape `[N, Cout, OH, OW]` with
    /// `OH = (H − 1)·stride_h − 2·pad_h + dil_h·(KH − 1) + out_pad_h + 1` (likewise `OW`), as
    /// `torch.nn.functional.conv_transpose2d` computes it.
    ///
    /// Errors: [`Error::InvalidArgument`] for non-positive stride, dilation or groups, groups
    /// that do not divide `Cin`, an `output_padding` not smaller than the stride or the
    /// dilation, an empty kernel or a non-positive output size; [`Error::ShapeMismatch`] when
    /// the weight's dim 0 is not `Cin` or a tensor is not rank 4.
    pub fn output_shape(&self, x: &[usize], w: &[usize]) -> Result<[usize; 4]> {
        if x.len() != 4 {
            return Err(Error::invalid(format!(
                "conv_transpose2d input must be NCHW (rank 4), got shape {x:?}"
            )));
        }
        if w.len() != 4 {
            return Err(Error::invalid(format!(
                "conv_transpose2d weight must be [Cin, Cout/groups, KH, KW] (rank 4), got shape \
                 {w:?}"
            )));
        }
        if self.groups == 0 || self.stride.contains(&0) || self.dilation.contains(&0) {
            return Err(Error::invalid(format!(
                "conv_transpose2d stride, dilation and groups must be positive, got {self:?}"
            )));
        }
        check_settings(
            "conv_transpose2d",
            &[
                self.stride,
                self.padding,
                self.dilation,
                self.output_padding,
            ],
        )?;
        crate::limits::check_elements("conv_transpose2d input", x)?;
        crate::limits::check_elements("conv_transpose2d weight", w)?;
        let g = self.groups;
        if !x[1].is_multiple_of(g) {
            return Err(Error::invalid(format!(
                "conv_transpose2d groups = {g} must divide input channels {}",
                x[1]
            )));
        }
        if w[0] != x[1] {
            return Err(Error::shape(
                format!("conv_transpose2d weight dim 0 (input channels {})", x[1]),
                &[x[1], w[1], w[2], w[3]],
                w,
            ));
        }
        let cout = w[1].checked_mul(g).ok_or_else(|| {
            Error::invalid(format!(
                "conv_transpose2d output channels {} x groups {g} overflow",
                w[1]
            ))
        })?;
        let mut out = [x[0], cout, 0, 0];
        for i in 0..2 {
            let op = self.output_padding[i];
            if op >= self.stride[i] && op >= self.dilation[i] {
                return Err(Error::invalid(format!(
                    "conv_transpose2d output padding must be smaller than either stride or \
                     dilation, got output_padding {:?}, stride {:?}, dilation {:?}",
                    self.output_padding, self.stride, self.dilation
                )));
            }
            if w[2 + i] == 0 {
                return Err(Error::invalid(format!(
                    "conv_transpose2d kernel must be non-empty, got weight {w:?}"
                )));
            }
            let full = (x[2 + i].max(1) - 1)
                .checked_mul(self.stride[i])
                .and_then(|v| v.checked_add(self.dilation[i].checked_mul(w[2 + i] - 1)?))
                .and_then(|v| v.checked_add(op)?.checked_add(1))
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "conv_transpose2d output size overflows for input {:?}, weight {:?} \
                         and {self:?}",
                        &x[2..],
                        &w[2..]
                    ))
                })?;
            let pad = self.padding[i].saturating_mul(2);
            if x[2 + i] == 0 || full <= pad {
                return Err(Error::invalid(format!(
                    "conv_transpose2d output size is not positive for input {:?}, weight {:?} \
                     and {self:?}",
                    &x[2..],
                    &w[2..]
                )));
            }
            out[2 + i] = full - pad;
        }
        // What the op allocates: the output, and (CPU reference) one column block per image.
        crate::limits::check_elements("conv_transpose2d output", &out)?;
        crate::limits::check_elements(
            "conv_transpose2d column block",
            &[w[1], w[2], w[3], x[2], x[3]],
        )?;
        Ok(out)
    }
}

/// The tensor type of a conv weight and the type of its bias: `Array4<f32>` weights have
/// `Array1<f32>` biases on the host; a device tensor type is its own bias type.
pub trait ConvWeight {
    /// The bias type that goes with this weight type.
    type Bias;
}

impl ConvWeight for Array4<f32> {
    type Bias = Array1<f32>;
}

impl ConvWeight for ArrayD<f32> {
    type Bias = ArrayD<f32>;
}

impl<'a, W: ConvWeight> ConvWeight for &'a W {
    type Bias = &'a W::Bias;
}

/// A conv2d layer's parameters: the one conv description, on the host
/// (`Conv2d<Array4<f32>>`, the default), on a device (`Conv2d<B::Tensor>`, see
/// [`crate::backend`]) or borrowing device tensors
/// ([`crate::kernels::conv_bn::GpuConv2d`] is `Conv2d<&GpuTensor>`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Conv2d<W: ConvWeight = Array4<f32>> {
    /// Weight, OIHW.
    pub weight: W,
    /// Bias, or `None`.
    pub bias: Option<W::Bias>,
    /// Settings.
    pub params: Conv2dParams,
}

/// Weight and bias after BatchNorm folding (host arrays by default; a device's tensors from
/// [`crate::backend::QuantOps`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Folded<W = ArrayD<f32>, B = Array1<f32>> {
    /// Folded weight, same shape as the input weight.
    pub weight: W,
    /// Folded bias, one per output channel.
    pub bias: B,
}

/// Gradients of conv2d (host arrays by default; a device's tensors from
/// [`crate::backend::FloatOps`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Conv2dGrads<Y = Array4<f32>, C = Array1<f32>> {
    /// dL/dx.
    pub dx: Y,
    /// dL/dweight.
    pub dweight: Y,
    /// dL/dbias (sum of dy over N, H, W).
    pub dbias: C,
}

/// What BatchNorm2d forward returns (host arrays by default; a device's tensors from
/// [`crate::backend::FloatOps`]).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNormOutput<Y = Array4<f32>, C = Array1<f32>> {
    /// Normalized output.
    pub y: Y,
    /// Running mean after the update (unchanged in eval).
    pub running_mean: C,
    /// Running variance after the update (unchanged in eval).
    pub running_var: C,
    /// Mean used to normalize (batch mean in training, running mean in eval).
    pub mean: C,
    /// `1/sqrt(var + eps)` used to normalize.
    pub invstd: C,
}

/// Gradients of BatchNorm2d (host arrays by default; a device's tensors from
/// [`crate::backend::FloatOps`]).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNormGrads<Y = Array4<f32>, C = Array1<f32>> {
    /// dL/dx.
    pub dx: Y,
    /// dL/dγ.
    pub dweight: C,
    /// dL/dβ.
    pub dbias: C,
}

/// Settings of a `ConvBn2d` / `ConvBnReLU2d` QAT module
/// (`torch.ao.nn.intrinsic.qat`), training mode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QatConfig {
    /// Activation after BN (`None` for ConvBn2d, `Relu` for ConvBnReLU2d).
    pub activation: Activation,
    /// Use running statistics and leave them unchanged.
    pub freeze_bn: bool,
    /// The weight observer (symmetric in PyTorch's default QAT qconfigs).
    pub weight_observer: ObserverSpec,
}

/// What the QAT forward returns, including what its backward needs.
#[derive(Debug, Clone, PartialEq)]
pub struct QatForward {
    /// Output.
    pub y: Array4<f32>,
    /// Running mean after the step.
    pub running_mean: Array1<f32>,
    /// Running variance after the step.
    pub running_var: Array1<f32>,
    /// The weight observer's qparams (of the BN-scaled weight).
    pub weight_qparams: QParams,
    /// Saved for backward.
    pub saved: QatSaved,
}

/// Intermediates of the QAT forward that the backward reuses.
#[derive(Debug, Clone, PartialEq)]
pub struct QatSaved {
    /// Per-channel factor `s = γ / sqrt(running_var + eps)` (running stats before the update).
    pub scale_factor: Array1<f32>,
    /// Fake-quantized scaled weight `W_q = fq(W·s)`.
    pub weight_q: Array4<f32>,
    /// Straight-through mask of the weight fake quant (1 where in range).
    pub weight_mask: Array4<f32>,
    /// Conv output before the divide-back (`conv(x, W_q)`).
    pub conv_out: Array4<f32>,
    /// BN input `y = conv_out / s + b`.
    pub bn_input: Array4<f32>,
    /// Mean BN normalized with.
    pub mean: Array1<f32>,
    /// `1/sqrt(var + eps)` BN normalized with.
    pub invstd: Array1<f32>,
    /// BN output before the activation.
    pub bn_out: Array4<f32>,
}

/// Gradients of the QAT step (host arrays by default; a device's tensors from
/// [`crate::backend::FusedOps`]).
#[derive(Debug, Clone, PartialEq)]
pub struct QatGrads<Y = Array4<f32>, C = Array1<f32>> {
    /// dL/dx.
    pub dx: Y,
    /// dL/dW (conv weight).
    pub dweight: Y,
    /// dL/db (conv bias), `None` when the conv has no bias.
    pub dbias: Option<C>,
    /// dL/dγ.
    pub dbn_weight: C,
    /// dL/dβ.
    pub dbn_bias: C,
}

/// What a device's QAT forward returns ([`crate::backend::FusedOps::conv_bn_qat_forward`]):
/// the output, the running statistics after the step and the weight's qparams as device
/// values, and the backend's own saved state for the backward (`S`).
#[derive(Debug, Clone)]
pub struct QatStep<T, Q, S> {
    /// Output.
    pub y: T,
    /// Running mean after the step.
    pub running_mean: T,
    /// Running variance after the step.
    pub running_var: T,
    /// The weight observer's qparams (of the BN-scaled weight).
    pub weight_qparams: Q,
    /// Saved for backward.
    pub saved: S,
}

/// The weight fake quant of one QAT conv + BatchNorm step run with
/// [`crate::HostOps::conv_bn_qat_forward_with`]: where its qparams come from and whether it
/// is applied. The default (`qparams: None`, enabled) is what
/// [`crate::HostOps::conv_bn_qat_forward`] does.
///
/// A `torch.ao.quantization.FakeQuantize` keeps its observer's running statistics between
/// steps (a `MinMaxObserver` widens, a `MovingAverageMinMaxObserver` averages), can have its
/// observer or its fake quant switched off, and stores `scale` / `zero_point`; this carries
/// what such a module decided for the step (see [`crate::qat::FakeQuantize`]).
///
/// `Q` is where the qparams live: host [`QParams`] (the default) or a backend's device
/// qparams ([`crate::backend::Device::QParams`]).
#[derive(Debug, Clone, PartialEq)]
pub struct QatWeightQuant<Q = QParams> {
    /// `None`: the weight observer ([`QatConfig::weight_observer`]) sees this step's
    /// BN-scaled weight `W_s` once and gives the qparams. `Some`: fake-quantize `W_s` with
    /// these (for example a `FakeQuantize`'s stored `scale` / `zero_point`, along the 4-D
    /// weight's axes).
    pub qparams: Option<Q>,
    /// `false`: no fake quant (`fake_quant_enabled = 0`): `W_q = W_s` and the
    /// straight-through mask is all ones. The qparams (given or observed) are still
    /// reported in [`QatForward::weight_qparams`].
    pub fake_quant_enabled: bool,
}

impl<Q> Default for QatWeightQuant<Q> {
    fn default() -> Self {
        Self {
            qparams: None,
            fake_quant_enabled: true,
        }
    }
}

impl<Q> QatWeightQuant<Q> {
    /// Fake-quantize with fixed `qparams`.
    pub fn fixed(qparams: Q) -> Self {
        Self {
            qparams: Some(qparams),
            fake_quant_enabled: true,
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every conv geometry the shared check accepts, at the limits' extremes, passes the GPU
    /// kernels' coordinate check (overhang below 64), so it can refuse nothing the CPU
    /// accepts; an extent past `i32` is refused as too large.
    #[test]
    fn accepted_geometries_fit_kernel_coordinates() {
        use super::{Conv2dParams, PadMode};
        use crate::limits::{MAX_CONV_SETTING as S, MAX_TENSOR_ELEMENTS as E};
        let mut accepted = 0;
        for (x, w) in [
            ([1, 1, 1, E], [1, 1, 1, 1]),
            ([1, 1, 1, E], [1, 1, 1, 17]),
            ([1, 1, E, 1], [1, 1, 16, 1]),
            ([1, 1, 1, 1], [1, 1, 1, E / 2]),
            ([1, 1, 1, 1 << 14], [1, 1, 1, 1 << 14]),
        ] {
            for s in [1, 2, S] {
                for d in [1, S] {
                    for (pad_mode, p) in [(PadMode::Explicit, 0), (PadMode::Explicit, S)] {
                        for mode in [pad_mode, PadMode::Same] {
                            let params = Conv2dParams {
                                stride: [s, s],
                                padding: [p, p],
                                dilation: [d, d],
                                groups: 1,
                                pad_mode: mode,
                            };
                            let Ok((out, pads)) = params.geometry(&x, &w) else {
                                continue;
                            };
                            accepted += 1;
                            params
                                .check_kernel_coordinates("conv2d", &x, &w, out, &pads, 63)
                                .unwrap_or_else(|e| panic!("{params:?} {x:?} {w:?}: {e}"));
                        }
                    }
                }
            }
        }
        assert!(accepted > 20, "only {accepted} geometries accepted");
        let params = Conv2dParams::default();
        let (out, pads) = params.geometry(&[1, 1, 1, 8], &[1, 1, 1, 1]).unwrap();
        let e = params
            .check_kernel_coordinates("conv2d", &[1, 1, 1, 8], &[1, 1, 1, 1], out, &pads, 1 << 31)
            .unwrap_err();
        assert!(matches!(e, crate::Error::TooLarge { .. }), "{e}");
    }

    /// `'same'` padding is held to the settings' limit, on both backends (one check).
    #[test]
    fn same_padding_past_the_setting_limit_is_refused() {
        use super::{Conv2dParams, PadMode};
        let params = Conv2dParams {
            dilation: [1, 1 << 24],
            pad_mode: PadMode::Same,
            ..Conv2dParams::default()
        };
        let e = params.geometry(&[1, 1, 1, 1], &[1, 1, 1, 4]).unwrap_err();
        assert!(e.to_string().contains("padding='same'"), "{e}");
        assert!(params.geometry(&[1, 1, 1, 1], &[1, 1, 1, 2]).is_ok());
    }

    use super::*;

    #[test]
    fn activation_int8_bounds() {
        let r = crate::quant::QuantRange::new(-128, 127).unwrap();
        assert_eq!(
            Activation::None.int8_bounds(0.1, -3, r).unwrap(),
            (-128, 127)
        );
        assert_eq!(Activation::Relu.int8_bounds(0.1, -3, r).unwrap(), (-3, 127));
        // 6 / 0.1 = 60 codes above the zero point.
        assert_eq!(Activation::Relu6.int8_bounds(0.1, -3, r).unwrap(), (-3, 57));
        assert_eq!(
            Activation::Relu6.int8_bounds(0.01, -128, r).unwrap(),
            (-128, 127)
        );
        assert!(Activation::Hardswish.int8_bounds(0.1, 0, r).is_err());
        let u8r = crate::quant::QuantRange::new(0, 255).unwrap();
        assert!(Activation::None.int8_bounds(0.1, 0, u8r).is_err());
    }
}
