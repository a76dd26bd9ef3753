//! Deployment: the integer model that int8 hardware runs, built from the same fused model
//! the simulation quantizes, and the measured gap between the two.
//!
//! 1. Describe the float model as a [`Net`] (from an [`crate::nn`] module tree by name with
//!    [`Net::module`], or by hand).
//! 2. [`convert`] it: BN folded into the conv (as `fuse_modules` does), activations
//!    calibrated with min/max observers on the fused float model, weights quantized
//!    symmetrically (int8 per channel by default), biases to i32 at `s_in · s_w[o]`, and each
//!    layer's requantization `M[o] = s_in · s_w[o] / s_out`, in f32 (fbgemm's arithmetic, the
//!    default) or in gemmlowp / TFLite fixed point (`multiplier · 2^(shift − 31)`), chosen by
//!    [`DeployConfig::requant`] (see [`crate::quant::requant`]). ReLU and ReLU6 become the
//!    requantization clamp; a residual add computes onnxruntime's `QLinearAdd` (MLAS's f32
//!    arithmetic, [`crate::quant::AddRequant`]) with f32 requantization, TFLite's integer
//!    add with fixed point. [`convert_on`]
//!    calibrates on a backend's own tensors ([`calibrate_ranges`]: the fused float net on the
//!    device, each observed value reduced there by
//!    [`crate::backend::QuantOps::observe_running`], one upload per batch and one download
//!    per observed value at the end), [`convert`] through the host-array layer (each op a
//!    round trip on a GPU); both give the same [`IntModel`] from the same observed values.
//! 3. Run the [`IntModel`] on any backend ([`IntModel::forward`]: integer kernels), simulate
//!    it ([`IntModel::simulate`]: fake quantization with the same qparams, the same quantized
//!    bias, float arithmetic), and compare ([`measure_gap`]) — also against the unfused
//!    simulation ([`simulate_unfused`]: BN applied in float after a fake-quantized conv).
//! 4. Save it to safetensors and load it back ([`IntModel::save`], [`IntModel::load`]).
//!
//! The fused simulation and the integer model differ only where rounding does: the integer
//! path accumulates exactly and requantizes once, `round_ties_even(f32(acc) · M)`; the
//! simulation accumulates fake-quantized values in f32 and rounds once, ties to even, so
//! they part only where f32 error moves a value across a rounding boundary (and the
//! difference then carries into later layers). With [`crate::quant::RequantMode::FixedPoint`]
//! the integer path rounds twice (the high multiply ties up, the shift ties away from zero)
//! and parts from the simulation far more often: [`measure_gap`] shows by how much.

mod calibrate;
mod convert;
mod device;
mod export;
mod forward;
mod gap;
mod net;
mod run;

pub use calibrate::{calibrate_prepared, calibrate_ranges, calibrate_ranges_with, convert_on};
pub use convert::{
    convert, convert_with_qparams, convert_with_ranges, DeployConfig, IntLayer, IntModel, IntNode,
};
pub use device::{DeviceIntModel, GpuIntModel};
pub use forward::DeviceNet;
pub use gap::{measure_gap, Gap, GapReport, LayerGap};
pub use net::{Net, Node, NodeOp, ValueId};
pub use run::{simulate_node_unfused, simulate_unfused, simulate_unfused_values};
