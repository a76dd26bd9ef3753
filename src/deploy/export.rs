//! [`IntModel`] to and from safetensors: int8 weights, i32 biases and requantization
//! multipliers and shifts, f32 scales as tensors; the graph (node kinds, inputs, geometry,
//! activations, zero points, clamps) as JSON in the header metadata under `qfuse.int_model`.
//!
//! Tensor names, for a node `NAME`: `NAME.weight` (int8), `NAME.weight_scale` (float32),
//! `NAME.bias` (int32, when present), `NAME.requant_scale` (float32) and `NAME.multiplier` /
//! `NAME.shift` (int32): the requantization multipliers in both forms, one per output
//! channel or one (the graph's `requant` says which form the kernels use). Every value's qparams: `values.scale` (float32) and
//! `values.zero_point` (int32), indexed by value id (0 = input).

use std::path::Path;

use ndarray::{Array1, ArrayD, IxDyn};
use serde_json::{json, Value};

use super::convert::{IntLayer, IntModel, IntNode};
use crate::error::{Error, Result};
use crate::io::state_dict::{parse_state_dict, Dtype, HostTensor};
use crate::io::{RawTensor, StateDict};
use crate::ops::{Activation, Conv2dParams, PadMode};
use crate::quant::{
    AddRequant, FixedPointMultiplier, QDtype, QParams, QuantRange, Requant, RequantMode,
};

/// The metadata key holding the graph JSON.
pub const GRAPH_KEY: &str = "qfuse.int_model";
const FORMAT: &str = "qfuse.int_model.v1";

fn act_name(a: Activation) -> Result<&'static str> {
    match a {
        Activation::None => Ok("none"),
        Activation::Relu => Ok("relu"),
        Activation::Relu6 => Ok("relu6"),
        other => Err(Error::invalid(format!(
            "activation {other:?} has no integer form"
        ))),
    }
}

/// The name of a table node's activation ([`Activation::parse`] reads it back).
fn table_act_name(a: Activation) -> String {
    match a {
        Activation::LeakyRelu { negative_slope } => format!("leaky_relu:{negative_slope}"),
        Activation::Hardswish => "hardswish".into(),
        other => act_name(other).unwrap_or("none").into(),
    }
}

/// The stored code type of a quantized add's f32 form, as the file names it.
fn codes_name(d: QDtype) -> &'static str {
    match d {
        QDtype::QInt8 => "int8",
        QDtype::QUInt8 => "uint8",
    }
}

fn parse_codes(s: &str) -> std::result::Result<QDtype, String> {
    match s {
        "int8" => Ok(QDtype::QInt8),
        "uint8" => Ok(QDtype::QUInt8),
        other => Err(format!(
            "unknown add code type `{}` (expected int8 or uint8)",
            crate::io::text::escape(other)
        )),
    }
}

fn fpm_json(m: FixedPointMultiplier) -> Value {
    json!([m.multiplier, m.shift])
}

fn i32_tensor(v: Vec<i32>) -> Result<HostTensor> {
    let n = v.len();
    Ok(HostTensor::I32(
        ArrayD::from_shape_vec(IxDyn(&[n]), v).map_err(|e| Error::invalid(e.to_string()))?,
    ))
}

fn f32_tensor(v: Vec<f32>) -> Result<HostTensor> {
    let n = v.len();
    Ok(HostTensor::F32(
        ArrayD::from_shape_vec(IxDyn(&[n]), v).map_err(|e| Error::invalid(e.to_string()))?,
    ))
}

fn i8_raw(a: &ArrayD<i8>) -> Result<RawTensor> {
    let bytes: Vec<u8> = a.as_standard_layout().iter().map(|&v| v as u8).collect();
    RawTensor::new(Dtype::I8, a.shape().to_vec(), bytes)
}

impl IntModel {
    /// The model as a state dict: per node `NAME.weight` (int8), its scales, bias and
    /// requantization tensors, and the graph as JSON in the header metadata under
    /// `qfuse.int_model`.
    ///
    /// Errors: [`Error::InvalidArgument`] for an invalid model or a node name that would
    /// collide with the `values.` tensors.
    pub fn to_state_dict(&self) -> Result<StateDict> {
        self.validate()?;
        let mut sd = StateDict::default();
        sd.tensors.insert(
            "values.scale".into(),
            f32_tensor(self.values.iter().map(|q| q.scale[0]).collect())?,
        );
        sd.tensors.insert(
            "values.zero_point".into(),
            i32_tensor(self.values.iter().map(|q| q.zero_point[0]).collect())?,
        );
        let mut nodes = Vec::new();
        for node in &self.nodes {
            if node.name == "values" || node.name.starts_with("values.") {
                return Err(Error::invalid(format!(
                    "node name `{}` collides with the `values.` tensors",
                    node.name
                )));
            }
            let n = &node.name;
            let mut j = json!({ "name": n, "kind": node.layer.kind(), "inputs": node.inputs });
            // Weight codes, scales, bias, requantization and activation of a conv or linear.
            let put_weighted = |sd: &mut StateDict,
                                j: &mut Value,
                                weight: ArrayD<i8>,
                                weight_scale: &[f32],
                                bias: Option<&Array1<i32>>,
                                rq: &Requant,
                                act: Activation|
             -> Result<()> {
                sd.raw.insert(format!("{n}.weight"), i8_raw(&weight)?);
                sd.tensors.insert(
                    format!("{n}.weight_scale"),
                    f32_tensor(weight_scale.to_vec())?,
                );
                if let Some(b) = bias {
                    sd.tensors
                        .insert(format!("{n}.bias"), i32_tensor(b.to_vec())?);
                }
                sd.tensors.insert(
                    format!("{n}.multiplier"),
                    i32_tensor(rq.multipliers.iter().map(|m| m.multiplier).collect())?,
                );
                sd.tensors.insert(
                    format!("{n}.shift"),
                    i32_tensor(rq.multipliers.iter().map(|m| m.shift).collect())?,
                );
                sd.tensors
                    .insert(format!("{n}.requant_scale"), f32_tensor(rq.scales.clone())?);
                j["requant"] = json!(rq.mode.name());
                j["out_zero_point"] = json!(rq.out_zero_point);
                j["clamp"] = json!([rq.clamp_min, rq.clamp_max]);
                j["act"] = json!(act_name(act)?);
                Ok(())
            };
            match &node.layer {
                IntLayer::Conv {
                    weight,
                    weight_scale,
                    bias,
                    params,
                    requant,
                    act,
                } => {
                    let w = weight.clone().into_dyn();
                    put_weighted(
                        &mut sd,
                        &mut j,
                        w,
                        weight_scale,
                        bias.as_ref(),
                        requant,
                        *act,
                    )?;
                    j["stride"] = json!(params.stride);
                    j["padding"] = match params.pad_mode {
                        PadMode::Explicit => json!(params.padding),
                        PadMode::Same => json!("same"),
                    };
                    j["dilation"] = json!(params.dilation);
                    j["groups"] = json!(params.groups);
                }
                IntLayer::Linear {
                    weight,
                    weight_scale,
                    bias,
                    requant,
                    act,
                } => {
                    let w = weight.clone().into_dyn();
                    put_weighted(
                        &mut sd,
                        &mut j,
                        w,
                        weight_scale,
                        bias.as_ref(),
                        requant,
                        *act,
                    )?;
                }
                IntLayer::MaxPool2d { kernel, stride } => {
                    j["kernel"] = json!(kernel);
                    j["stride"] = json!(stride);
                }
                IntLayer::Flatten => {}
                IntLayer::MaxPool2dPad { pool } => {
                    j["kernel"] = json!(pool.kernel);
                    j["stride"] = json!(pool.stride);
                    j["padding"] = json!(pool.padding);
                }
                IntLayer::GlobalAvgPool { mode } => j["requant"] = json!(mode.name()),
                IntLayer::Table { act, table } => {
                    j["act"] = json!(table_act_name(*act));
                    let t = ArrayD::from_shape_vec(IxDyn(&[table.len()]), table.clone())
                        .map_err(|e| Error::invalid(e.to_string()))?;
                    sd.raw.insert(format!("{n}.table"), i8_raw(&t)?);
                }
                IntLayer::Add { add, act } => {
                    j["requant"] = json!(add.mode.name());
                    j["codes"] = json!(codes_name(add.codes));
                    j["ratios"] = json!([add.a_ratio, add.b_ratio]);
                    j["zero_points"] = json!([add.a_zero_point, add.b_zero_point]);
                    j["multipliers"] = json!([
                        fpm_json(add.a_multiplier),
                        fpm_json(add.b_multiplier),
                        fpm_json(add.out_multiplier)
                    ]);
                    j["out_zero_point"] = json!(add.out_zero_point);
                    j["clamp"] = json!([add.clamp_min, add.clamp_max]);
                    j["act"] = json!(act_name(*act)?);
                }
            }
            nodes.push(j);
        }
        let graph = json!({
            "format": FORMAT,
            "output": self.output,
            "activation_range": [self.activation_range.quant_min, self.activation_range.quant_max],
            "nodes": nodes,
        });
        sd.metadata.insert(GRAPH_KEY.into(), graph.to_string());
        Ok(sd)
    }

    /// Writes the model to a safetensors file.
    ///
    /// Errors: those of [`IntModel::to_state_dict`], and [`Error::Io`].
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        self.to_state_dict()?.save(path)
    }

    /// Reads a model written by [`IntModel::save`] from safetensors bytes; `origin` names the
    /// source in errors.
    ///
    /// Errors: [`Error::MalformedStateDict`] for bytes that are not such a model (no graph
    /// metadata, wrong format version, missing or mistyped tensors, inconsistent shapes).
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self> {
        let sd = parse_state_dict(bytes, origin)?;
        Self::from_state_dict(&sd, origin)
    }

    /// Reads a model written by [`IntModel::save`] (a regular file only, see
    /// [`crate::io::file::read_input`]).
    ///
    /// Errors: [`Error::Io`], [`Error::NotRegularFile`], [`Error::TooLarge`], and those of
    /// [`IntModel::from_bytes`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = crate::io::file::read_input(path, None)?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// Rebuilds a model from a state dict written by [`IntModel::to_state_dict`].
    ///
    /// Errors: as [`IntModel::from_bytes`].
    pub fn from_state_dict(sd: &StateDict, origin: &str) -> Result<Self> {
        let bad = |reason: String| Error::MalformedStateDict {
            path: origin.to_string(),
            reason,
        };
        let graph: Value = sd
            .metadata
            .get(GRAPH_KEY)
            .ok_or_else(|| {
                bad(format!(
                    "no `{GRAPH_KEY}` metadata: not a qfuse integer model"
                ))
            })
            .and_then(|s| serde_json::from_str(s).map_err(|e| bad(format!("graph JSON: {e}"))))?;
        if graph["format"] != FORMAT {
            return Err(bad(format!("format {} is not {FORMAT}", graph["format"])));
        }
        let int = |v: &Value, what: &str| -> Result<i64> {
            v.as_i64()
                .ok_or_else(|| bad(format!("{what} must be an integer, got {v}")))
        };
        let i32v = |v: &Value, what: &str| -> Result<i32> {
            i32::try_from(int(v, what)?).map_err(|_| bad(format!("{what} out of i32 range")))
        };
        let usz = |v: &Value, what: &str| -> Result<usize> {
            usize::try_from(int(v, what)?).map_err(|_| bad(format!("{what} must be >= 0")))
        };
        let pair = |v: &Value, what: &str| -> Result<[usize; 2]> {
            Ok([usz(&v[0], what)?, usz(&v[1], what)?])
        };
        let scales = sd.f32("values.scale")?;
        let zps = sd.i32("values.zero_point")?;
        if scales.len() != zps.len() {
            return Err(bad(
                "values.scale and values.zero_point differ in length".into()
            ));
        }
        let values: Vec<QParams> = scales
            .iter()
            .zip(zps.iter())
            .map(|(&s, &z)| QParams::per_tensor(s, z))
            .collect();
        let ar = &graph["activation_range"];
        let activation_range = QuantRange::new(
            i32v(&ar[0], "activation_range")?,
            i32v(&ar[1], "activation_range")?,
        )?;
        let empty = Vec::new();
        let mut nodes = Vec::new();
        for j in graph["nodes"].as_array().unwrap_or(&empty) {
            let name = j["name"]
                .as_str()
                .ok_or_else(|| bad("node without a name".into()))?
                .to_string();
            let inputs = j["inputs"]
                .as_array()
                .ok_or_else(|| bad(format!("node `{name}` has no inputs list")))?
                .iter()
                .map(|v| usz(v, "input"))
                .collect::<Result<Vec<_>>>()?;
            let act = || -> Result<Activation> {
                Activation::parse(j["act"].as_str().unwrap_or("")).map_err(|e| bad(e.to_string()))
            };
            let clamp = |j: &Value| -> Result<(i32, i32)> {
                Ok((
                    i32v(&j["clamp"][0], "clamp")?,
                    i32v(&j["clamp"][1], "clamp")?,
                ))
            };
            let weight = || -> Result<ArrayD<i8>> {
                let key = format!("{name}.weight");
                let raw = sd.raw.get(&key).ok_or_else(|| Error::MissingTensor {
                    name: key.clone(),
                    context: format!(" in {origin}"),
                })?;
                if raw.dtype() != Dtype::I8 {
                    return Err(bad(format!("`{key}` must be int8")));
                }
                let data = raw.data().iter().map(|&b| b as i8).collect();
                ArrayD::from_shape_vec(IxDyn(raw.shape()), data).map_err(|e| bad(e.to_string()))
            };
            let requant = |j: &Value| -> Result<Requant> {
                let m = sd.i32(&format!("{name}.multiplier"))?;
                let s = sd.i32(&format!("{name}.shift"))?;
                if m.len() != s.len() {
                    return Err(bad(format!(
                        "`{name}` multiplier and shift differ in length"
                    )));
                }
                let (lo, hi) = clamp(j)?;
                let scales: Vec<f32> = sd
                    .f32(&format!("{name}.requant_scale"))?
                    .iter()
                    .copied()
                    .collect();
                if scales.len() != m.len() {
                    return Err(bad(format!(
                        "`{name}` requant_scale and multiplier differ in length"
                    )));
                }
                Ok(Requant {
                    mode: RequantMode::parse(j["requant"].as_str().unwrap_or(""))
                        .map_err(|e| bad(e.to_string()))?,
                    scales,
                    multipliers: m
                        .iter()
                        .zip(s.iter())
                        .map(|(&multiplier, &shift)| FixedPointMultiplier { multiplier, shift })
                        .collect(),
                    out_zero_point: i32v(&j["out_zero_point"], "out_zero_point")?,
                    clamp_min: lo,
                    clamp_max: hi,
                })
            };
            let bias = || -> Result<Option<Array1<i32>>> {
                let key = format!("{name}.bias");
                if !sd.contains(&key) {
                    return Ok(None);
                }
                Ok(Some(sd.i32(&key)?.iter().copied().collect()))
            };
            let weight_scale = || -> Result<Vec<f32>> {
                Ok(sd
                    .f32(&format!("{name}.weight_scale"))?
                    .iter()
                    .copied()
                    .collect())
            };
            let shape_err = |e: ndarray::ShapeError| bad(format!("`{name}`.weight: {e}"));
            let layer = match j["kind"].as_str().unwrap_or("") {
                "conv2d" => IntLayer::Conv {
                    weight: weight()?.into_dimensionality().map_err(shape_err)?,
                    weight_scale: weight_scale()?,
                    bias: bias()?,
                    params: {
                        let same = j["padding"].as_str() == Some("same");
                        Conv2dParams {
                            stride: pair(&j["stride"], "stride")?,
                            padding: if same {
                                [0, 0]
                            } else {
                                pair(&j["padding"], "padding")?
                            },
                            dilation: pair(&j["dilation"], "dilation")?,
                            groups: usz(&j["groups"], "groups")?,
                            pad_mode: if same {
                                PadMode::Same
                            } else {
                                PadMode::Explicit
                            },
                        }
                    },
                    requant: requant(j)?,
                    act: act()?,
                },
                "linear" => IntLayer::Linear {
                    weight: weight()?.into_dimensionality().map_err(shape_err)?,
                    weight_scale: weight_scale()?,
                    bias: bias()?,
                    requant: requant(j)?,
                    act: act()?,
                },
                "max_pool2d" => IntLayer::MaxPool2d {
                    kernel: usz(&j["kernel"], "kernel")?,
                    stride: usz(&j["stride"], "stride")?,
                },
                "flatten" => IntLayer::Flatten,
                "max_pool2d_pad" => IntLayer::MaxPool2dPad {
                    pool: crate::ops::Pool2d {
                        kernel: pair(&j["kernel"], "kernel")?,
                        stride: pair(&j["stride"], "stride")?,
                        padding: pair(&j["padding"], "padding")?,
                    },
                },
                "global_avg_pool" => IntLayer::GlobalAvgPool {
                    mode: RequantMode::parse(j["requant"].as_str().unwrap_or(""))
                        .map_err(|e| bad(e.to_string()))?,
                },
                "activation" => {
                    let key = format!("{name}.table");
                    let raw = sd.raw.get(&key).ok_or_else(|| Error::MissingTensor {
                        name: key.clone(),
                        context: format!(" in {origin}"),
                    })?;
                    if raw.dtype() != Dtype::I8 || raw.shape() != [256] {
                        return Err(bad(format!("`{key}` must be int8 [256]")));
                    }
                    IntLayer::Table {
                        act: act()?,
                        table: raw.data().iter().map(|&b| b as i8).collect(),
                    }
                }
                "add" => {
                    let m = &j["multipliers"];
                    let fpm = |k: usize| -> Result<FixedPointMultiplier> {
                        Ok(FixedPointMultiplier {
                            multiplier: i32v(&m[k][0], "multiplier")?,
                            shift: i32v(&m[k][1], "shift")?,
                        })
                    };
                    let (lo, hi) = clamp(j)?;
                    // Files written before the f32 add carry neither the arithmetic nor the
                    // ratios: they were TFLite's fixed point.
                    let (mode, ratios) = match j.get("requant") {
                        None => (RequantMode::FixedPoint, [1.0, 1.0]),
                        Some(m) => {
                            let ratio = |k: usize| -> Result<f32> {
                                j["ratios"][k]
                                    .as_f64()
                                    .map(|v| v as f32)
                                    .ok_or_else(|| bad(format!("node `{name}` has no ratios")))
                            };
                            (
                                RequantMode::parse(m.as_str().unwrap_or(""))
                                    .map_err(|e| bad(e.to_string()))?,
                                [ratio(0)?, ratio(1)?],
                            )
                        }
                    };
                    let codes = match j.get("codes") {
                        None => QDtype::QInt8,
                        Some(c) => parse_codes(c.as_str().unwrap_or("")).map_err(bad)?,
                    };
                    IntLayer::Add {
                        add: AddRequant {
                            mode,
                            codes,
                            a_ratio: ratios[0],
                            b_ratio: ratios[1],
                            a_zero_point: i32v(&j["zero_points"][0], "zero point")?,
                            b_zero_point: i32v(&j["zero_points"][1], "zero point")?,
                            a_multiplier: fpm(0)?,
                            b_multiplier: fpm(1)?,
                            out_multiplier: fpm(2)?,
                            out_zero_point: i32v(&j["out_zero_point"], "out_zero_point")?,
                            clamp_min: lo,
                            clamp_max: hi,
                        },
                        act: act()?,
                    }
                }
                other => return Err(bad(format!("node `{name}` has unknown kind `{other}`"))),
            };
            nodes.push(IntNode {
                name,
                layer,
                inputs,
            });
        }
        let model = IntModel {
            nodes,
            values,
            activation_range,
            output: usz(&graph["output"], "output")?,
        };
        model.validate().map_err(|e| bad(e.to_string()))?;
        Ok(model)
    }
}
