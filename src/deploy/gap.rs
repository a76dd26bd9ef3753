//! The gap between deployed integer outputs and a simulation of them, counted in
//! quantization steps of the output.

use ndarray::ArrayD;

use super::convert::{DeployConfig, IntLayer, IntModel};
use super::net::Net;
use super::run::{simulate_node_unfused, simulate_unfused_values};
use crate::backend::{Backend, HostOps};
use crate::error::{Error, Result};

/// How far two code tensors of the same output are apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Gap {
    /// Number of outputs compared.
    pub outputs: usize,
    /// Outputs with identical codes.
    pub identical: usize,
    /// Largest `|a − b|` in quantization steps (codes).
    pub max_step_diff: u32,
}

impl Gap {
    /// Compares two code tensors element by element.
    ///
    /// Errors: [`Error::ShapeMismatch`] when the shapes differ.
    pub fn between(a: &ArrayD<i8>, b: &ArrayD<i8>) -> Result<Self> {
        if a.shape() != b.shape() {
            return Err(Error::shape(
                "gap between code tensors",
                a.shape(),
                b.shape(),
            ));
        }
        let mut g = Gap {
            outputs: a.len(),
            ..Gap::default()
        };
        for (&x, &y) in a.iter().zip(b) {
            let d = (x as i32 - y as i32).unsigned_abs();
            if d == 0 {
                g.identical += 1;
            }
            g.max_step_diff = g.max_step_diff.max(d);
        }
        Ok(g)
    }

    /// `identical / outputs` (1.0 for no outputs).
    pub fn identical_fraction(&self) -> f64 {
        if self.outputs == 0 {
            1.0
        } else {
            self.identical as f64 / self.outputs as f64
        }
    }
}

/// The measured gap of one model on one batch: integer outputs against the fused simulation
/// (same folded, quantized weights, quantized bias) and against the unfused simulation
/// (fake-quantized unfolded conv, then float BN).
#[derive(Debug, Clone, PartialEq)]
pub struct GapReport {
    /// Integer vs fused simulation, at the model's output.
    pub fused: Gap,
    /// Integer vs unfused simulation, at the model's output.
    pub unfused: Gap,
    /// Every requantizing layer (conv, linear, add), in execution order.
    pub layers: Vec<LayerGap>,
}

/// The gap at one layer's output.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerGap {
    /// The node's name.
    pub name: String,
    /// Integer vs fused simulation, each run end to end from the input (differences of
    /// earlier layers carry into this one).
    pub fused: Gap,
    /// Integer vs unfused simulation, end to end.
    pub unfused: Gap,
    /// Integer vs the fused simulation of this layer alone, fed the integer model's own
    /// (dequantized) inputs: the arithmetic difference of this layer, nothing inherited.
    pub fused_isolated: Gap,
    /// The same for the unfused simulation of this layer.
    pub unfused_isolated: Gap,
}

/// Runs `model` (integer), its fused simulation and `net`'s unfused simulation on `x` with
/// `backend`, and counts how the output codes differ.
///
/// Errors: those of [`IntModel::forward`], [`IntModel::simulate`] and [`simulate_unfused`](crate::deploy::simulate_unfused).
pub fn measure_gap<B: Backend>(
    net: &Net,
    model: &IntModel,
    config: &DeployConfig,
    backend: &B,
    x: &ArrayD<f32>,
) -> Result<GapReport> {
    let range = model.activation_range;
    let int = model.forward_values(backend, x)?;
    let backend: &dyn HostOps = backend;
    let fused = model.simulate_values(backend, x)?;
    let unfused = simulate_unfused_values(net, model, config, backend, x)?;
    let codes_gap = |v: usize, sim: &ArrayD<f32>| -> Result<Gap> {
        Gap::between(&int[v], &backend.quantize(sim, &model.values[v], range)?)
    };
    let gap = |v: usize| -> Result<(Gap, Gap)> {
        Ok((codes_gap(v, &fused[v])?, codes_gap(v, &unfused[v])?))
    };
    let mut layers = Vec::new();
    for (i, node) in model.nodes.iter().enumerate() {
        if matches!(
            node.layer,
            IntLayer::MaxPool2d { .. } | IntLayer::MaxPool2dPad { .. } | IntLayer::Flatten
        ) {
            continue;
        }
        let (f, u) = gap(i + 1)?;
        let deq = node
            .inputs
            .iter()
            .map(|&v| backend.dequantize(&int[v], &model.values[v]))
            .collect::<Result<Vec<_>>>()?;
        let ins: Vec<&ArrayD<f32>> = deq.iter().collect();
        let fi = model.simulate_node(backend, i, &ins)?;
        let ui = simulate_node_unfused(net, model, config, backend, i, &ins)?;
        layers.push(LayerGap {
            name: node.name.clone(),
            fused: f,
            unfused: u,
            fused_isolated: codes_gap(i + 1, &fi)?,
            unfused_isolated: codes_gap(i + 1, &ui)?,
        });
    }
    let (fused, unfused) = gap(model.output)?;
    Ok(GapReport {
        fused,
        unfused,
        layers,
    })
}
