//! Activation-range calibration of a [`Net`] on a backend's own tensors: the fused float
//! model (BN folded once, on the host, as [`super::convert_with_ranges`] folds it) runs on the
//! device, and each value [`super::convert_with_ranges`] reads is observed there by
//! [`crate::backend::QuantOps::observe_running`] (a min/max accumulated over the batches).
//! Each batch is one upload; the parameters are uploaded once and the observers' states are
//! downloaded once, at the end.

use ndarray::ArrayD;

use super::convert::{convert_with_ranges, DeployConfig, IntModel};
use super::forward::DeviceNet;
use super::net::Net;
use crate::backend::{Backend, CpuBackend};
use crate::error::{Error, Result};
use crate::quant::ObserverSpec;

/// Observes the activation ranges of `net`'s fused float model (BN folded, as deployed) on
/// `backend`'s tensors over the `calibration` batches, with `spec` (per tensor): the input
/// and every requantizing node's output (conv, linear, add) get `Some((min, max))` over all
/// batches, the other values `None` (they inherit their input's qparams), in the layout
/// [`super::convert_with_ranges`] takes.
///
/// Errors: [`Error::InvalidArgument`] for no batch; shape errors between nodes; the errors of
/// [`crate::backend::QuantOps::observe_running`] (a per-channel `spec`, ...).
pub fn calibrate_ranges<'a, B: Backend>(
    net: &Net,
    backend: &B,
    calibration: impl IntoIterator<Item = &'a ArrayD<f32>>,
    spec: &ObserverSpec,
) -> Result<Vec<Option<(f32, f32)>>> {
    calibrate_ranges_with(net, backend, calibration, spec, None)
}

/// [`calibrate_ranges`] with the running observer's averaging constant: `None` for
/// `MinMaxObserver`'s running min / max, `Some(c)` for `MovingAverageMinMaxObserver`'s
/// moving average (as [`crate::backend::QuantOps::observe_running`] takes it).
///
/// Errors: as [`calibrate_ranges`]; an averaging constant outside `[0, 1]`
/// ([`crate::ops::check_observer_update`]).
pub fn calibrate_ranges_with<'a, B: Backend>(
    net: &Net,
    backend: &B,
    calibration: impl IntoIterator<Item = &'a ArrayD<f32>>,
    spec: &ObserverSpec,
    averaging_constant: Option<f32>,
) -> Result<Vec<Option<(f32, f32)>>> {
    let dnet = DeviceNet::prepare(net, backend.clone(), true)?;
    calibrate_prepared(net, &dnet, calibration, spec, averaging_constant)
}

/// [`calibrate_ranges_with`] on `net` already prepared on its backend with its BatchNorms
/// folded (`dnet`, from [`DeviceNet::prepare`] of the same `net` with `fold`), so a caller
/// that also runs the net places its parameters once.
///
/// Errors: as [`calibrate_ranges_with`]; [`Error::InvalidArgument`] when `dnet` is not
/// `net`'s folded model.
pub fn calibrate_prepared<'a, B: Backend>(
    net: &Net,
    dnet: &DeviceNet<B>,
    calibration: impl IntoIterator<Item = &'a ArrayD<f32>>,
    spec: &ObserverSpec,
    averaging_constant: Option<f32>,
) -> Result<Vec<Option<(f32, f32)>>> {
    if spec.qscheme.is_per_channel() {
        return Err(Error::invalid(
            "deployment calibrates activations per tensor; got a per-channel spec",
        ));
    }
    if !dnet.folded() || dnet.value_count() != net.value_count() {
        return Err(Error::invalid(
            "calibration needs the net's folded model prepared on the backend",
        ));
    }
    let backend = dnet.backend();
    let observed: Vec<bool> = std::iter::once(true)
        .chain(net.nodes().iter().map(|n| n.op.requantizes()))
        .collect();
    let mut states: Vec<Option<B::Tensor>> = vec![None; observed.len()];
    let mut batches = 0usize;
    for x in calibration {
        dnet.forward_observed(&backend.upload(x)?, &mut |v, value| {
            if observed[v] {
                states[v] = Some(
                    backend
                        .observe_running(states[v].take(), value, spec, averaging_constant)?
                        .0,
                );
            }
            Ok(())
        })?;
        batches += 1;
    }
    if batches == 0 {
        return Err(Error::invalid(
            "deployment needs at least one calibration batch",
        ));
    }
    states
        .iter()
        .map(|s| {
            s.as_ref()
                .map(|s| {
                    let s = backend.download(s)?;
                    match s.as_slice() {
                        Some(&[min, max]) => Ok((min, max)),
                        _ => Err(Error::invalid(format!(
                            "internal: a per-tensor observer state of shape {:?}",
                            s.shape()
                        ))),
                    }
                })
                .transpose()
        })
        .collect()
}

/// [`super::convert`] with the calibration on `backend`'s tensors ([`calibrate_ranges`] with
/// `config.activation`), then [`convert_with_ranges`] (weights folded and quantized on the
/// host by the CPU reference). The same [`IntModel`] as [`super::convert`] wherever the
/// observed values are the same.
///
/// Errors: those of [`calibrate_ranges`] and [`convert_with_ranges`].
pub fn convert_on<'a, B: Backend>(
    net: &Net,
    backend: &B,
    calibration: impl IntoIterator<Item = &'a ArrayD<f32>>,
    config: &DeployConfig,
) -> Result<IntModel> {
    config.validate()?;
    let ranges = calibrate_ranges(net, backend, calibration, &config.activation)?;
    convert_with_ranges(net, &CpuBackend, &ranges, config)
}
