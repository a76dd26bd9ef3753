//! The interface every operation is reached through, split by op family, and its two
//! implementations: [`CpuBackend`] (the ndarray reference, the spec) and [`GpuBackend`]
//! (WGSL kernels via wgpu).
//!
//! A backend is a [`Device`] (its tensor types and the explicit upload / download edges)
//! with four op families over those tensors: [`FloatOps`] (conv, BatchNorm, activations,
//! pooling, linear, log_softmax and their backwards), [`QuantOps`] (fake quantization,
//! observers, BatchNorm folding), [`Int8Ops`] (the deployed integer ops on codes) and
//! [`FusedOps`] (conv + BatchNorm + activation in eval and the QAT step). [`Backend`] is all
//! of them. On [`GpuBackend`] every op takes and returns [`crate::gpu::GpuTensor`]s: data
//! stays on the device between ops and crosses only at [`Device::upload`] /
//! [`Device::download`]. On [`CpuBackend`] the tensors are host arrays.
//!
//! [`HostOps`] is a thin convenience layer over host `ndarray` arrays, implemented for every
//! [`Backend`]: each call uploads its arguments, runs the device op and downloads the result
//! (what the CLI, the conformance runner and the tests use). It is object safe:
//! [`best_available`] returns a `Box<dyn HostOps>`.
//!
//! ```
//! use ndarray::ArrayD;
//! use qfuse::backend::{CpuBackend, Device, FloatOps};
//! use qfuse::ops::Activation;
//!
//! # fn main() -> qfuse::Result<()> {
//! let b = CpuBackend;
//! let x = b.upload(&ArrayD::from_shape_vec(vec![1, 3], vec![-1.0, 0.5, 7.0]).unwrap())?;
//! let y = b.activation(&x, Activation::Relu6)?; // on the backend's own tensors
//! assert_eq!(b.download(&y)?.as_slice().unwrap(), &[0.0, 0.5, 6.0]);
//! # Ok(()) }
//! ```

mod cpu;
mod gpu;
mod host;

pub use cpu::{CpuBackend, CpuConv2dInt8, CpuLinearInt8};
pub use gpu::{GpuBackend, GpuQatSaved};
pub use host::HostOps;

use std::fmt::Debug;

use ndarray::{Array1, Array2, Array4, ArrayD};

use crate::error::Result;
use crate::ops::{
    Activation, BatchNorm, BatchNormGrads, BatchNormOutput, Conv2d, Conv2dGrads, Conv2dParams,
    ConvTranspose2dParams, Folded, QatConfig, QatForward, QatGrads, QatStep, QatWeightQuant,
};
use crate::quant::{AddRequant, ObserverSpec, QParams, QuantRange, Requant};

/// A tensor that knows its shape (host arrays and device tensors alike).
pub trait Shaped {
    /// The shape, outermost dimension first.
    fn dims(&self) -> &[usize];
}

impl<T> Shaped for ArrayD<T> {
    fn dims(&self) -> &[usize] {
        self.shape()
    }
}

/// Where a backend's tensors live, and the explicit edges data crosses to get there.
pub trait Device: Clone {
    /// An `f32` tensor on this backend.
    type Tensor: Shaped + Clone + Debug + crate::ops::ConvWeight<Bias = Self::Tensor>;
    /// A tensor of 8-bit integer codes on this backend.
    type Codes: Shaped + Clone + Debug;
    /// Quantization parameters on this backend.
    type QParams: Clone + Debug;

    /// A human-readable name (`cpu`, or `gpu (adapter name, backend)`).
    fn name(&self) -> String;
    /// Copies a host array onto the backend.
    fn upload(&self, x: &ArrayD<f32>) -> Result<Self::Tensor>;
    /// Copies a tensor back to the host (on the GPU this waits for the work recorded so far).
    fn download(&self, x: &Self::Tensor) -> Result<ArrayD<f32>>;
    /// Copies host codes onto the backend.
    fn upload_codes(&self, q: &ArrayD<i8>) -> Result<Self::Codes>;
    /// Copies codes back to the host.
    fn download_codes(&self, q: &Self::Codes) -> Result<ArrayD<i8>>;
    /// Copies host qparams onto the backend.
    fn upload_qparams(&self, qp: &QParams) -> Result<Self::QParams>;
    /// Copies qparams back to the host.
    fn download_qparams(&self, qp: &Self::QParams) -> Result<QParams>;
    /// The same elements under another shape of the same element count (`flatten`, `view`).
    ///
    /// Errors: [`crate::Error::ShapeMismatch`] when the element counts differ.
    fn reshape(&self, x: &Self::Tensor, shape: &[usize]) -> Result<Self::Tensor>;
}

/// Float ops (forward and backward) on a backend's tensors. See [`crate::reference`] for the
/// exact semantics of each (the CPU reference is the spec).
pub trait FloatOps: Device {
    /// `act(conv2d(x, weight, bias))` (`torch.nn.functional.conv2d`), NCHW input, OIHW
    /// weight; `Activation::None` for a plain conv.
    fn conv2d(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        params: &Conv2dParams,
        act: Activation,
    ) -> Result<Self::Tensor>;

    /// Gradients of conv2d for upstream `dy`.
    fn conv2d_backward(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        dy: &Self::Tensor,
        params: &Conv2dParams,
    ) -> Result<Conv2dGrads<Self::Tensor, Self::Tensor>>;

    /// `act(conv_transpose2d(x, weight, bias))`: input `[N, Cin, H, W]`, weight
    /// `[Cin, Cout/groups, KH, KW]` (see [`ConvTranspose2dParams::output_shape`]).
    fn conv_transpose2d(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        params: &ConvTranspose2dParams,
        act: Activation,
    ) -> Result<Self::Tensor>;

    /// BatchNorm2d forward followed by `act` (`torch.nn.functional.batch_norm`): batch
    /// statistics and running update when `training`, running statistics otherwise.
    fn batch_norm2d(
        &self,
        x: &Self::Tensor,
        bn: &BatchNorm<Self::Tensor>,
        training: bool,
        act: Activation,
    ) -> Result<BatchNormOutput<Self::Tensor, Self::Tensor>>;

    /// Gradients of BatchNorm2d (no activation) given the forward's `mean`/`invstd`.
    fn batch_norm2d_backward(
        &self,
        x: &Self::Tensor,
        dy: &Self::Tensor,
        bn: &BatchNorm<Self::Tensor>,
        fwd: &BatchNormOutput<Self::Tensor, Self::Tensor>,
        training: bool,
    ) -> Result<BatchNormGrads<Self::Tensor, Self::Tensor>>;

    /// Elementwise activation.
    fn activation(&self, x: &Self::Tensor, act: Activation) -> Result<Self::Tensor>;

    /// Gradient of the activation at input `x` for upstream `dy`.
    fn activation_backward(
        &self,
        x: &Self::Tensor,
        dy: &Self::Tensor,
        act: Activation,
    ) -> Result<Self::Tensor>;

    /// 2-D max pooling, no padding (`torch.nn.functional.max_pool2d`).
    fn max_pool2d(&self, x: &Self::Tensor, kernel: usize, stride: usize) -> Result<Self::Tensor>;

    /// `act(x · Wᵀ + b)` (`torch.nn.functional.linear`), x `[N, in]`, W `[out, in]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        act: Activation,
    ) -> Result<Self::Tensor>;

    /// `log_softmax` along dim 1 of `[N, C]`.
    fn log_softmax(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// `a + b` elementwise (residual adds).
    ///
    /// Errors: [`crate::Error::ShapeMismatch`] when the shapes differ
    /// ([`crate::ops::check_add`]).
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    /// 2-D pooling of an NCHW tensor with ONNX's full window (`MaxPool` / `AveragePool`:
    /// pads, strides, dilations, `ceil_mode`, `count_include_pad`;
    /// [`crate::reference::layers::pool2d`]).
    ///
    /// Errors: those of [`crate::ops::PoolWindow::output_shape`].
    fn pool2d(
        &self,
        x: &Self::Tensor,
        window: &crate::ops::PoolWindow,
        mode: crate::ops::PoolMode,
    ) -> Result<Self::Tensor>;

    /// Zero padding of an NCHW tensor by `[top, left, bottom, right]`
    /// ([`crate::reference::layers::zero_pad2d`]).
    ///
    /// Errors: those of [`crate::ops::pad2d_output_shape`].
    fn pad2d(&self, x: &Self::Tensor, pads: [usize; 4]) -> Result<Self::Tensor>;

    /// Global average pooling `[N, C, H, W] → [N, C, 1, 1]`
    /// ([`crate::reference::layers::global_avg_pool2d`], ndarray's summation order).
    ///
    /// Errors: those of [`crate::ops::global_pool_extent`].
    fn global_avg_pool2d(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// `a op b` with numpy broadcasting ([`crate::reference::layers::broadcast_binary`]).
    ///
    /// Errors: those of [`crate::ops::broadcast_shape`].
    fn binary(
        &self,
        a: &Self::Tensor,
        b: &Self::Tensor,
        op: crate::ops::BinaryOp,
    ) -> Result<Self::Tensor>;

    /// The parts concatenated along `axis` (negative: from the end;
    /// [`crate::reference::layers::concat`]).
    ///
    /// Errors: those of [`crate::ops::concat_shape`].
    fn concat(&self, parts: &[&Self::Tensor], axis: i64) -> Result<Self::Tensor>;
}

/// Quantization ops on a backend's tensors: fake quantization, observers, BatchNorm folding.
pub trait QuantOps: Device {
    /// Fake quantization, per tensor or per channel
    /// (`torch.fake_quantize_per_{tensor,channel}_affine`).
    fn fake_quant(
        &self,
        x: &Self::Tensor,
        qp: &Self::QParams,
        range: QuantRange,
    ) -> Result<Self::Tensor>;

    /// ONNX `QuantizeLinear` then `DequantizeLinear` with the same qparams (a division by
    /// the scale, NaN to code 0; [`crate::reference::fake_quant::fake_quantize_onnx`]).
    ///
    /// Errors: those of [`QParams::validate`].
    fn fake_quant_onnx(
        &self,
        x: &Self::Tensor,
        qp: &Self::QParams,
        range: QuantRange,
    ) -> Result<Self::Tensor>;

    /// Straight-through gradient of [`QuantOps::fake_quant`]: `dy` where the rounded value is
    /// in range, else 0.
    fn fake_quant_backward(
        &self,
        x: &Self::Tensor,
        dy: &Self::Tensor,
        qp: &Self::QParams,
        range: QuantRange,
    ) -> Result<Self::Tensor>;

    /// Observes `x` once and returns its qparams (`MinMaxObserver` /
    /// `PerChannelMinMaxObserver` then `calculate_qparams`), on the backend.
    fn calc_qparams(&self, x: &Self::Tensor, spec: &ObserverSpec) -> Result<Self::QParams>;

    /// One step of a running observer on the backend (`MinMaxObserver` /
    /// `MovingAverageMinMaxObserver`, per tensor or per channel along `spec.axis`, as a
    /// [`crate::qat::FakeQuantize`]'s observer): `x`'s min/max (per
    /// [`crate::reference::observer::min_max`]) becomes the state on the first step
    /// (`state == None`), else is combined into `state` per
    /// [`crate::reference::train::observer_update`] (running min / max with
    /// `averaging_constant = None`, the moving average with `Some(c)`). Returns the new state
    /// `[2, C]` (row 0 minima, row 1 maxima; `state` is consumed, and may be updated in place)
    /// and its qparams ([`crate::reference::observer::calculate_qparams`]), without leaving
    /// the backend.
    ///
    /// Errors: those of [`crate::ops::check_running_observer`].
    #[allow(clippy::type_complexity)]
    fn observe_running(
        &self,
        state: Option<Self::Tensor>,
        x: &Self::Tensor,
        spec: &ObserverSpec,
        averaging_constant: Option<f32>,
    ) -> Result<(Self::Tensor, Self::QParams)>;

    /// Folds BatchNorm into a conv weight of any rank
    /// (`torch.nn.utils.fusion.fuse_conv_bn_weights`). `transpose`: a ConvTranspose weight
    /// `[Cin, Cout/g, k...]`.
    fn fold_conv_bn(
        &self,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        bn: &BatchNorm<Self::Tensor>,
        transpose: bool,
    ) -> Result<Folded<Self::Tensor, Self::Tensor>>;

    /// Folds BatchNorm1d into a linear layer (`torch.nn.utils.fusion.fuse_linear_bn_weights`).
    fn fold_linear_bn(
        &self,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        bn: &BatchNorm<Self::Tensor>,
    ) -> Result<Folded<Self::Tensor, Self::Tensor>>;
}

/// The deployed integer ops on a backend's codes ([`crate::reference::int8`] is the spec).
/// Conv and linear layers are prepared once (weights packed and placed on the backend), then
/// run on codes.
pub trait Int8Ops: Device {
    /// An integer conv2d layer prepared on this backend.
    type Conv2dInt8: Clone + Debug;
    /// An integer linear layer prepared on this backend.
    type LinearInt8: Clone + Debug;

    /// Quantizes `x` to 8-bit codes with `qp` (per tensor or per channel).
    ///
    /// Errors: a NaN in `x` (the first by row-major index), as the reference.
    fn quantize(
        &self,
        x: &Self::Tensor,
        qp: &Self::QParams,
        range: QuantRange,
    ) -> Result<Self::Codes>;

    /// Dequantizes codes.
    fn dequantize(&self, q: &Self::Codes, qp: &Self::QParams) -> Result<Self::Tensor>;

    /// Prepares an integer conv2d: symmetric weight codes `[O, C/groups, KH, KW]`, an optional
    /// i32 bias `[O]`, the requantization, for inputs with zero point `x_zero_point`.
    fn prepare_conv2d_int8(
        &self,
        x_zero_point: i32,
        weight: &Array4<i8>,
        bias: Option<&Array1<i32>>,
        params: &Conv2dParams,
        requant: &Requant,
    ) -> Result<Self::Conv2dInt8>;

    /// Runs a prepared integer conv2d on codes `[N, C, H, W]`.
    fn conv2d_int8(&self, layer: &Self::Conv2dInt8, x: &Self::Codes) -> Result<Self::Codes>;

    /// Prepares an integer linear layer: weight codes `[out, in]`, optional i32 bias `[out]`.
    fn prepare_linear_int8(
        &self,
        x_zero_point: i32,
        weight: &Array2<i8>,
        bias: Option<&Array1<i32>>,
        requant: &Requant,
    ) -> Result<Self::LinearInt8>;

    /// Runs a prepared integer linear layer on codes `[N, in]`.
    fn linear_int8(&self, layer: &Self::LinearInt8, x: &Self::Codes) -> Result<Self::Codes>;

    /// Max pooling on codes.
    fn max_pool2d_int8(&self, x: &Self::Codes, kernel: usize, stride: usize)
        -> Result<Self::Codes>;

    /// Quantized elementwise add with clamp.
    fn add_int8(&self, a: &Self::Codes, b: &Self::Codes, add: &AddRequant) -> Result<Self::Codes>;

    /// `[N, ...]` codes as `[N, rest]` (`torch.flatten(x, 1)`).
    fn flatten_int8(&self, x: &Self::Codes) -> Result<Self::Codes>;

    /// Max pooling on codes with padding
    /// ([`crate::reference::int8::max_pool2d_pad_int8`]).
    fn max_pool2d_pad_int8(
        &self,
        x: &Self::Codes,
        pool: &crate::ops::Pool2d,
    ) -> Result<Self::Codes>;

    /// Global average pooling on codes `[N, C, H, W] → [N, C, 1, 1]`
    /// ([`crate::reference::int8::global_avg_pool_int8`]).
    fn global_avg_pool_int8(
        &self,
        x: &Self::Codes,
        x_zero_point: i32,
        requant: &Requant,
    ) -> Result<Self::Codes>;

    /// An elementwise op on codes by a 256-entry table
    /// ([`crate::reference::int8::lookup_int8`]).
    fn lookup_int8(&self, x: &Self::Codes, table: &[i8]) -> Result<Self::Codes>;
}

/// Fused conv + BatchNorm (+ activation) ops: the eval forward with BN folded, and the QAT
/// training step of `ConvBn2d` / `ConvBnReLU2d`.
pub trait FusedOps: Device {
    /// What a QAT forward keeps for its backward, on this backend.
    type QatSaved: Clone + Debug;

    /// Fused eval forward of conv+bn+act: folds BN, then one conv with bias and activation.
    /// Returns the output and the folded parameters.
    #[allow(clippy::type_complexity)]
    fn conv_bn_act_eval(
        &self,
        x: &Self::Tensor,
        conv: &Conv2d<Self::Tensor>,
        bn: &BatchNorm<Self::Tensor>,
        act: Activation,
    ) -> Result<(Self::Tensor, Folded<Self::Tensor, Self::Tensor>)>;

    /// The QAT forward in training mode that qfuse's QAT modules run: the weight fake
    /// quant's qparams given or observed and fake quant switchable (`weight`), finite where
    /// γ = 0 (see [`crate::reference::conv_bn::conv_bn_qat_forward_with`] for the exact
    /// semantics). With `QatWeightQuant::default()` and no γ = 0 channel this is PyTorch's
    /// step ([`crate::reference::conv_bn::conv_bn_qat_forward`]).
    #[allow(clippy::type_complexity)]
    fn conv_bn_qat_forward(
        &self,
        x: &Self::Tensor,
        conv: &Conv2d<Self::Tensor>,
        bn: &BatchNorm<Self::Tensor>,
        cfg: &QatConfig,
        weight: &QatWeightQuant<Self::QParams>,
    ) -> Result<QatStep<Self::Tensor, Self::QParams, Self::QatSaved>>;

    /// PyTorch's QAT step exactly ([`crate::reference::conv_bn::conv_bn_qat_forward`]):
    /// the weight observed, fake quant on, and NaN where γ = 0 (as PyTorch gives).
    #[allow(clippy::type_complexity)]
    fn conv_bn_qat_forward_pytorch(
        &self,
        x: &Self::Tensor,
        conv: &Conv2d<Self::Tensor>,
        bn: &BatchNorm<Self::Tensor>,
        cfg: &QatConfig,
    ) -> Result<QatStep<Self::Tensor, Self::QParams, Self::QatSaved>>;

    /// Backward of [`FusedOps::conv_bn_qat_forward`] for upstream `dy`.
    fn conv_bn_qat_backward(
        &self,
        x: &Self::Tensor,
        dy: &Self::Tensor,
        conv: &Conv2d<Self::Tensor>,
        bn: &BatchNorm<Self::Tensor>,
        cfg: &QatConfig,
        fwd: &QatStep<Self::Tensor, Self::QParams, Self::QatSaved>,
    ) -> Result<QatGrads<Self::Tensor, Self::Tensor>>;

    /// The host form of a QAT forward (a download edge: for reports and the host layer).
    /// `conv` and `bn` are the forward's layers: the saved tensors a device forward did not
    /// keep (the conv output, the BatchNorm output under ReLU / ReLU6) are rebuilt from them.
    fn qat_forward_to_host(
        &self,
        fwd: &QatStep<Self::Tensor, Self::QParams, Self::QatSaved>,
        conv: &Conv2d<Self::Tensor>,
        bn: &BatchNorm<Self::Tensor>,
    ) -> Result<QatForward>;

    /// A host QAT forward on this backend (an upload edge), for a backward of saved state.
    fn qat_forward_from_host(
        &self,
        fwd: &QatForward,
    ) -> Result<QatStep<Self::Tensor, Self::QParams, Self::QatSaved>>;
}

/// A whole backend: its device and every op family.
pub trait Backend: Device + FloatOps + QuantOps + Int8Ops + FusedOps {}

impl<B: Device + FloatOps + QuantOps + Int8Ops + FusedOps> Backend for B {}

/// Uploads a host BatchNorm's vectors (an upload edge).
pub fn upload_batch_norm<B: Device>(b: &B, bn: &BatchNorm) -> Result<BatchNorm<B::Tensor>> {
    bn.validate()?;
    bn.try_map(|a| b.upload(&a.clone().into_dyn()))
}

/// Downloads a device BatchNorm to the host (a download edge).
pub fn download_batch_norm<B: Device>(b: &B, bn: &BatchNorm<B::Tensor>) -> Result<BatchNorm> {
    bn.try_map(|t| host::to1(b.download(t)?, "BatchNorm vector"))
}

/// Uploads a host conv layer (an upload edge).
pub fn upload_conv2d<B: Device>(b: &B, conv: &Conv2d) -> Result<Conv2d<B::Tensor>> {
    Ok(Conv2d {
        weight: b.upload(&conv.weight.clone().into_dyn())?,
        bias: conv
            .bias
            .as_ref()
            .map(|a| b.upload(&a.clone().into_dyn()))
            .transpose()?,
        params: conv.params,
    })
}

/// The backend a user without preferences gets, behind the host-array layer: the GPU when
/// an adapter can be opened (`WGPU_BACKEND` / `WGPU_ADAPTER_NAME` are honoured), else the
/// CPU reference. The second value says why the CPU serves, so callers can tell their users.
///
/// ```
/// let (backend, fallback) = qfuse::backend::best_available();
/// if let Some(why) = &fallback {
///     eprintln!("running on the CPU reference: {why}");
/// }
/// println!("backend: {}", backend.name());
/// ```
pub fn best_available() -> (Box<dyn HostOps>, Option<String>) {
    match GpuBackend::from_system() {
        Ok(g) => (Box::new(g), None),
        Err(e) => (Box::new(CpuBackend), Some(e.to_string())),
    }
}
