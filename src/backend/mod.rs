//! The one interface every operation is reached through, and its two implementations:
//! [`CpuBackend`] (the ndarray reference, the spec) and [`GpuBackend`] (WGSL kernels via wgpu).
//!
//! Tensors cross this interface as host `ndarray` arrays; a GPU backend uploads, runs its
//! kernels and downloads. Code that wants to keep data on the device (chains, benchmarks)
//! uses [`crate::kernels`] and [`crate::gpu::GpuTensor`] directly.

mod cpu;
mod gpu;

pub use cpu::CpuBackend;
pub use gpu::GpuBackend;

use ndarray::{Array1, Array2, Array4, ArrayD, Dimension};

use crate::error::{Error, Result};
use crate::ops::{
    Activation, BatchNorm, BatchNormGrads, BatchNormOutput, Conv2d, Conv2dGrads, Conv2dParams,
    ConvTranspose2dParams, Folded, QatConfig, QatForward, QatGrads, QatWeightQuant,
};
use crate::quant::{AddRequant, ObserverSpec, QParams, QuantRange, Requant};

/// Every operation of qfuse, on one backend. See [`crate::reference`] for the exact
/// semantics of each (the CPU reference is the spec).
pub trait Backend {
    /// A human-readable name (`cpu`, or `gpu (adapter name, backend)`).
    fn name(&self) -> String;

    /// Folds BatchNorm into a conv weight of any rank (`torch.nn.utils.fusion.fuse_conv_bn_weights`).
    /// `transpose`: the weight is a ConvTranspose weight `[Cin, Cout/g, k...]`.
    fn fold_conv_bn(
        &self,
        weight: &ArrayD<f32>,
        bias: Option<&Array1<f32>>,
        bn: &BatchNorm,
        transpose: bool,
    ) -> Result<Folded>;

    /// Folds BatchNorm1d into a linear layer (`torch.nn.utils.fusion.fuse_linear_bn_weights`).
    fn fold_linear_bn(
        &self,
        weight: &Array2<f32>,
        bias: Option<&Array1<f32>>,
        bn: &BatchNorm,
    ) -> Result<Folded>;

    /// Fake quantization, per tensor or per channel (`torch.fake_quantize_per_{tensor,channel}_affine`).
    fn fake_quant(&self, x: &ArrayD<f32>, qp: &QParams, range: QuantRange) -> Result<ArrayD<f32>>;

    /// Straight-through gradient of [`Backend::fake_quant`]: `dy` where the rounded value is in range, else 0.
    fn fake_quant_backward(
        &self,
        x: &ArrayD<f32>,
        dy: &ArrayD<f32>,
        qp: &QParams,
        range: QuantRange,
    ) -> Result<ArrayD<f32>>;

    /// Observes `x` once and returns its qparams (`MinMaxObserver` / `PerChannelMinMaxObserver`
    /// then `calculate_qparams`).
    fn calc_qparams(&self, x: &ArrayD<f32>, spec: &ObserverSpec) -> Result<QParams>;

    /// conv2d (`torch.nn.functional.conv2d`), NCHW input, OIHW weight.
    fn conv2d(
        &self,
        x: &Array4<f32>,
        weight: &Array4<f32>,
        bias: Option<&Array1<f32>>,
        params: &Conv2dParams,
    ) -> Result<Array4<f32>>;

    /// Gradients of conv2d for upstream `dy`.
    fn conv2d_backward(
        &self,
        x: &Array4<f32>,
        weight: &Array4<f32>,
        dy: &Array4<f32>,
        params: &Conv2dParams,
    ) -> Result<Conv2dGrads>;

    /// BatchNorm2d forward (`torch.nn.functional.batch_norm`): batch statistics and running
    /// update when `training`, running statistics otherwise.
    fn batch_norm2d(
        &self,
        x: &Array4<f32>,
        bn: &BatchNorm,
        training: bool,
    ) -> Result<BatchNormOutput>;

    /// Gradients of BatchNorm2d given the forward's `mean`/`invstd`.
    fn batch_norm2d_backward(
        &self,
        x: &Array4<f32>,
        dy: &Array4<f32>,
        bn: &BatchNorm,
        fwd: &BatchNormOutput,
        training: bool,
    ) -> Result<BatchNormGrads>;

    /// Elementwise activation.
    fn activation(&self, x: &ArrayD<f32>, act: Activation) -> Result<ArrayD<f32>>;

    /// Gradient of the activation at input `x` for upstream `dy`.
    fn activation_backward(
        &self,
        x: &ArrayD<f32>,
        dy: &ArrayD<f32>,
        act: Activation,
    ) -> Result<ArrayD<f32>>;

    /// Fused eval forward of conv+bn+act: folds BN, then one conv with bias and activation.
    /// Returns the output and the folded parameters.
    fn conv_bn_act_eval(
        &self,
        x: &Array4<f32>,
        conv: &Conv2d,
        bn: &BatchNorm,
        act: Activation,
    ) -> Result<(Array4<f32>, Folded)>;

    /// `ConvBn2d` / `ConvBnReLU2d` QAT forward in training mode.
    fn conv_bn_qat_forward(
        &self,
        x: &Array4<f32>,
        conv: &Conv2d,
        bn: &BatchNorm,
        cfg: &QatConfig,
    ) -> Result<QatForward>;

    /// The QAT step that qfuse's QAT modules ([`crate::qat`]) run: as
    /// [`Backend::conv_bn_qat_forward`], with the weight fake quant's qparams given or
    /// observed and fake quant switchable (`weight`), and finite where γ = 0 (PyTorch gives
    /// NaN there): see [`crate::reference::conv_bn::conv_bn_qat_forward_with`] for the exact
    /// semantics. Its backward is [`Backend::conv_bn_qat_backward`].
    ///
    /// The default runs the CPU reference; [`GpuBackend`] runs it on the GPU.
    fn conv_bn_qat_forward_with(
        &self,
        x: &Array4<f32>,
        conv: &Conv2d,
        bn: &BatchNorm,
        cfg: &QatConfig,
        weight: &QatWeightQuant,
    ) -> Result<QatForward> {
        crate::reference::conv_bn::conv_bn_qat_forward_with(x, conv, bn, cfg, weight)
    }

    /// Backward of [`Backend::conv_bn_qat_forward`] (or of
    /// [`Backend::conv_bn_qat_forward_with`]) for upstream `dy`.
    fn conv_bn_qat_backward(
        &self,
        x: &Array4<f32>,
        dy: &Array4<f32>,
        conv: &Conv2d,
        bn: &BatchNorm,
        cfg: &QatConfig,
        fwd: &QatForward,
    ) -> Result<QatGrads>;

    /// 2-D max pooling, no padding (`torch.nn.functional.max_pool2d`).
    fn max_pool2d(&self, x: &Array4<f32>, kernel: usize, stride: usize) -> Result<Array4<f32>>;

    /// Linear layer `x · Wᵀ + b` (`torch.nn.functional.linear`), x `[N, in]`, W `[out, in]`.
    fn linear(
        &self,
        x: &Array2<f32>,
        weight: &Array2<f32>,
        bias: Option<&Array1<f32>>,
    ) -> Result<Array2<f32>>;

    /// `log_softmax` along dim 1 of `[N, C]`.
    fn log_softmax(&self, x: &Array2<f32>) -> Result<Array2<f32>>;

    /// Transposed conv2d (`torch.nn.functional.conv_transpose2d`): NCHW input `[N, Cin, H, W]`,
    /// weight `[Cin, Cout/groups, KH, KW]`, output `[N, Cout, OH, OW]` (see
    /// [`ConvTranspose2dParams::output_shape`]).
    fn conv_transpose2d(
        &self,
        x: &Array4<f32>,
        weight: &Array4<f32>,
        bias: Option<&Array1<f32>>,
        params: &ConvTranspose2dParams,
    ) -> Result<Array4<f32>>;

    /// `act(conv2d(x, weight, bias))`: a conv with bias and activation (the forward of a fused
    /// eval `ConvReLU2d` whose BatchNorm is already folded). The default runs
    /// [`Backend::conv2d`] then [`Backend::activation`]; the GPU applies the activation in the
    /// conv's epilogue (one dispatch).
    fn conv2d_act(
        &self,
        x: &Array4<f32>,
        weight: &Array4<f32>,
        bias: Option<&Array1<f32>>,
        params: &Conv2dParams,
        act: Activation,
    ) -> Result<Array4<f32>> {
        let y = self.conv2d(x, weight, bias, params)?;
        match act {
            Activation::None => Ok(y),
            act => into_dim(self.activation(&y.into_dyn(), act)?, "conv2d_act"),
        }
    }

    /// `act(conv_transpose2d(x, weight, bias))`. The default runs
    /// [`Backend::conv_transpose2d`] then [`Backend::activation`]; the GPU applies the
    /// activation in the kernel's epilogue.
    fn conv_transpose2d_act(
        &self,
        x: &Array4<f32>,
        weight: &Array4<f32>,
        bias: Option<&Array1<f32>>,
        params: &ConvTranspose2dParams,
        act: Activation,
    ) -> Result<Array4<f32>> {
        let y = self.conv_transpose2d(x, weight, bias, params)?;
        match act {
            Activation::None => Ok(y),
            act => into_dim(self.activation(&y.into_dyn(), act)?, "conv_transpose2d_act"),
        }
    }

    /// `act(linear(x, weight, bias))`. The default runs [`Backend::linear`] then
    /// [`Backend::activation`]; the GPU applies the activation in the GEMM's epilogue.
    fn linear_act(
        &self,
        x: &Array2<f32>,
        weight: &Array2<f32>,
        bias: Option<&Array1<f32>>,
        act: Activation,
    ) -> Result<Array2<f32>> {
        let y = self.linear(x, weight, bias)?;
        match act {
            Activation::None => Ok(y),
            act => into_dim(self.activation(&y.into_dyn(), act)?, "linear_act"),
        }
    }

    /// Quantizes `x` to 8-bit codes with `qp` (per tensor or per channel):
    /// [`crate::reference::int8::quantize`].
    fn quantize(&self, x: &ArrayD<f32>, qp: &QParams, range: QuantRange) -> Result<ArrayD<i8>>;

    /// Dequantizes codes: [`crate::reference::int8::dequantize`].
    fn dequantize(&self, q: &ArrayD<i8>, qp: &QParams) -> Result<ArrayD<f32>>;

    /// Integer conv2d with requantization and the activation clamp in its epilogue:
    /// [`crate::reference::int8::conv2d_int8`].
    fn conv2d_int8(
        &self,
        x: &Array4<i8>,
        x_zero_point: i32,
        weight: &Array4<i8>,
        bias: Option<&Array1<i32>>,
        params: &Conv2dParams,
        requant: &Requant,
    ) -> Result<Array4<i8>>;

    /// Integer linear layer with requantization: [`crate::reference::int8::linear_int8`].
    fn linear_int8(
        &self,
        x: &Array2<i8>,
        x_zero_point: i32,
        weight: &Array2<i8>,
        bias: Option<&Array1<i32>>,
        requant: &Requant,
    ) -> Result<Array2<i8>>;

    /// Max pooling on codes: [`crate::reference::int8::max_pool2d_int8`].
    fn max_pool2d_int8(&self, x: &Array4<i8>, kernel: usize, stride: usize) -> Result<Array4<i8>>;

    /// Quantized elementwise add with clamp: [`crate::reference::int8::add_int8`].
    fn add_int8(&self, a: &ArrayD<i8>, b: &ArrayD<i8>, add: &AddRequant) -> Result<ArrayD<i8>>;

    /// BatchNorm2d forward followed by an activation: as [`Backend::batch_norm2d`], with `y`
    /// replaced by `act(y)` (the forward of a `BNReLU2d`). The default runs the two ops; the
    /// GPU applies the activation in the normalize pass.
    fn batch_norm2d_act(
        &self,
        x: &Array4<f32>,
        bn: &BatchNorm,
        training: bool,
        act: Activation,
    ) -> Result<BatchNormOutput> {
        let mut out = self.batch_norm2d(x, bn, training)?;
        if act != Activation::None {
            let y = std::mem::replace(&mut out.y, Array4::zeros([0, 0, 0, 0]));
            out.y = into_dim(self.activation(&y.into_dyn(), act)?, "batch_norm2d_act")?;
        }
        Ok(out)
    }
}

/// An activation's output back in its input's dimensionality (it always is; the error is for
/// a backend that breaks that contract).
fn into_dim<D: Dimension>(a: ArrayD<f32>, what: &str) -> Result<ndarray::Array<f32, D>> {
    a.into_dimensionality::<D>()
        .map_err(|e| Error::invalid(format!("{what}: activation changed the rank: {e}")))
}

/// The backend a user without preferences gets: the GPU when an adapter can be opened
/// (`WGPU_BACKEND` / `WGPU_ADAPTER_NAME` are honoured), else the CPU reference. The second
/// value says why the CPU serves, so callers can tell their users.
///
/// ```
/// let (backend, fallback) = qfuse::backend::best_available();
/// if let Some(why) = &fallback {
///     eprintln!("running on the CPU reference: {why}");
/// }
/// println!("backend: {}", backend.name());
/// ```
pub fn best_available() -> (Box<dyn Backend>, Option<String>) {
    match GpuBackend::from_system() {
        Ok(g) => (Box::new(g), None),
        Err(e) => (Box::new(CpuBackend), Some(e.to_string())),
    }
}
