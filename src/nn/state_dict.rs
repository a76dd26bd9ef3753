//! State dicts of a module tree: [`Module::state_dict`] and [`Module::load_state_dict`]
//! with PyTorch's names.

use std::collections::BTreeSet;

use ndarray::{Array, ArrayD, ArrayViewMutD, Dimension, IxDyn};

use super::fused::{Fused, FusedHead};
use super::layer::{BatchNormLayer, ConvLayer, Layer};
use super::Module;
use super::{FakeQuantize, QatLayer};
use crate::error::{Error, Result};
use crate::io::state_dict::{dtype_name, Dtype, HostTensor, RawTensor, StateDict};
use crate::ops::Activation;

/// What [`Module::load_state_dict`] found besides the keys it loaded: PyTorch's
/// `_IncompatibleKeys`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IncompatibleKeys {
    /// Keys of the model that the state dict lacks (their tensors keep their values), in
    /// the model's order.
    pub missing_keys: Vec<String>,
    /// Keys of the state dict that the model does not have (ignored), sorted.
    pub unexpected_keys: Vec<String>,
}

impl IncompatibleKeys {
    /// Whether every key matched.
    pub fn is_empty(&self) -> bool {
        self.missing_keys.is_empty() && self.unexpected_keys.is_empty()
    }
}

/// One entry of a state dict, before it becomes a [`StateDict`] tensor.
enum Value {
    F32(ArrayD<f32>),
    I32(ArrayD<i32>),
    /// A 0-dim int64 (`num_batches_tracked`).
    I64Scalar(i64),
    /// A `[1]` uint8 flag (`fake_quant_enabled`, `observer_enabled`).
    Flag(bool),
}

fn key(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Whether a fused module's parts are children `0`, `1`, ... in PyTorch (every fused module
/// is a `Sequential` there) or the head itself (a "fused" module that is a plain layer).
fn fused_is_sequential(f: &Fused) -> bool {
    f.bn.is_some() || f.act != Activation::None
}

// ------------------------------------------------------------------------------ saving

fn save_conv(c: &ConvLayer, p: &str, out: &mut Vec<(String, Value)>) {
    out.push((key(p, "weight"), Value::F32(c.weight.clone())));
    if let Some(b) = &c.bias {
        out.push((key(p, "bias"), Value::F32(b.clone().into_dyn())));
    }
}

fn save_wb(
    w: ArrayD<f32>,
    b: Option<&ndarray::Array1<f32>>,
    p: &str,
    out: &mut Vec<(String, Value)>,
) {
    out.push((key(p, "weight"), Value::F32(w)));
    if let Some(b) = b {
        out.push((key(p, "bias"), Value::F32(b.clone().into_dyn())));
    }
}

fn save_bn(b: &BatchNormLayer, p: &str, out: &mut Vec<(String, Value)>) {
    if let Some(w) = &b.bn.weight {
        out.push((key(p, "weight"), Value::F32(w.clone().into_dyn())));
    }
    if let Some(x) = &b.bn.bias {
        out.push((key(p, "bias"), Value::F32(x.clone().into_dyn())));
    }
    out.push((
        key(p, "running_mean"),
        Value::F32(b.bn.running_mean.clone().into_dyn()),
    ));
    out.push((
        key(p, "running_var"),
        Value::F32(b.bn.running_var.clone().into_dyn()),
    ));
    let n = i64::try_from(b.num_batches_tracked).unwrap_or(i64::MAX);
    out.push((key(p, "num_batches_tracked"), Value::I64Scalar(n)));
}

fn vec_f32(v: &[f32]) -> ArrayD<f32> {
    ndarray::Array1::from(v.to_vec()).into_dyn()
}

fn save_fake_quant(f: &FakeQuantize, p: &str, out: &mut Vec<(String, Value)>) {
    out.push((
        key(p, "fake_quant_enabled"),
        Value::Flag(f.fake_quant_enabled),
    ));
    out.push((key(p, "observer_enabled"), Value::Flag(f.observer_enabled)));
    out.push((key(p, "scale"), Value::F32(vec_f32(&f.scale))));
    let zp = ndarray::Array1::from(f.zero_point.clone()).into_dyn();
    out.push((key(p, "zero_point"), Value::I32(zp)));
    let obs = key(p, "activation_post_process");
    out.push((key(&obs, "eps"), Value::F32(vec_f32(&[f.spec.eps]))));
    // Per tensor: 0-dim tensors, as MinMaxObserver's `torch.tensor(float("inf"))`.
    let stat = |v: &[f32]| match v {
        [x] if !f.is_per_channel() => ArrayD::from_elem(IxDyn(&[]), *x),
        _ => vec_f32(v),
    };
    out.push((key(&obs, "min_val"), Value::F32(stat(&f.min_val))));
    out.push((key(&obs, "max_val"), Value::F32(stat(&f.max_val))));
}

fn save_qat(q: &QatLayer, p: &str, out: &mut Vec<(String, Value)>) {
    save_wb(q.head.weight(), q.head.bias(), p, out);
    if let Some(b) = &q.bn {
        save_bn(b, &key(p, "bn"), out);
    }
    save_fake_quant(&q.weight_fake_quant, &key(p, "weight_fake_quant"), out);
    if let Some(a) = &q.activation_post_process {
        save_fake_quant(a, &key(p, "activation_post_process"), out);
    }
}

fn save_fused_head(h: &FusedHead, p: &str, out: &mut Vec<(String, Value)>) {
    match h {
        FusedHead::Conv1d(c) | FusedHead::Conv2d(c) => save_conv(c, p, out),
        FusedHead::ConvTranspose2d(c) => {
            save_wb(c.weight.clone().into_dyn(), c.bias.as_ref(), p, out)
        }
        FusedHead::Linear(l) => save_wb(l.weight.clone().into_dyn(), l.bias.as_ref(), p, out),
        FusedHead::BatchNorm1d(b) | FusedHead::BatchNorm2d(b) => save_bn(b, p, out),
    }
}

fn save_module(m: &Module, p: &str, out: &mut Vec<(String, Value)>) {
    #[allow(unreachable_patterns)]
    match m.layer() {
        Layer::Conv1d(c) | Layer::Conv2d(c) => save_conv(c, p, out),
        Layer::ConvTranspose2d(c) => save_wb(c.weight.clone().into_dyn(), c.bias.as_ref(), p, out),
        Layer::Linear(l) => save_wb(l.weight.clone().into_dyn(), l.bias.as_ref(), p, out),
        Layer::BatchNorm1d(b) | Layer::BatchNorm2d(b) => save_bn(b, p, out),
        Layer::Container(c) => {
            for (name, child) in c.children() {
                save_module(child, &key(p, name), out);
            }
        }
        Layer::Fused(f) => {
            if fused_is_sequential(f) {
                save_fused_head(&f.head, &key(p, "0"), out);
                if let Some(b) = &f.bn {
                    save_bn(b, &key(p, "1"), out);
                }
            } else {
                save_fused_head(&f.head, p, out);
            }
        }
        Layer::Qat(q) => save_qat(q, p, out),
        // Activations, Identity, pooling, Flatten, custom layers (and any later kind
        // without tensors): nothing.
        _ => {}
    }
}

fn raw(dtype: Dtype, shape: Vec<usize>, data: Vec<u8>, name: &str) -> Result<RawTensor> {
    RawTensor::new(dtype, shape, data)
        .map_err(|e| Error::invalid(format!("internal: state dict tensor `{name}`: {e}")))
}

impl Module {
    /// The module's state dict, PyTorch's `state_dict()`: every parameter and buffer by
    /// dotted name, as PyTorch names them.
    ///
    /// * `Conv*`, `Linear`: `weight`, `bias` (when there is one).
    /// * `BatchNorm*`: `weight`, `bias` (when affine), `running_mean`, `running_var`,
    ///   `num_batches_tracked` (a 0-dim **int64** tensor, stored as a
    ///   [`crate::io::RawTensor`]).
    /// * Containers: their children's, under the child's name (`layer1.0.conv1.weight`).
    /// * Fused modules are `Sequential`s in PyTorch: `ConvReLU2d` → `0.weight`, `0.bias`;
    ///   intrinsic `ConvBn2d` / `ConvBnReLU2d` → `0.*` (conv) and `1.*` (BatchNorm);
    ///   `BNReLU2d` → `0.*`.
    /// * QAT modules ([`crate::qat`]) as `torch.ao.nn.intrinsic.qat` / `torch.ao.nn.qat`:
    ///   `weight`, `bias`, `bn.*` (the BatchNorm's, for `ConvBn*` / `LinearBn1d`),
    ///   `weight_fake_quant.fake_quant_enabled` and `.observer_enabled` (uint8 `[1]`),
    ///   `.scale` (f32), `.zero_point` (int32), `.activation_post_process.eps` (f32 `[1]`),
    ///   `.activation_post_process.min_val` / `.max_val` (f32; 0-dim per tensor, one per
    ///   channel per channel), and the same under `activation_post_process` for an output
    ///   fake quant.
    /// * Activations, `Identity`, pooling, `Flatten` and custom layers have none.
    ///
    /// The [`StateDict`] is keyed by name (sorted); [`Module::state_dict_keys`] gives
    /// PyTorch's order. Save it with [`StateDict::save`].
    ///
    /// Errors: none in practice ([`Error::InvalidArgument`] for an internal inconsistency).
    pub fn state_dict(&self) -> Result<StateDict> {
        let mut entries = Vec::new();
        save_module(self, "", &mut entries);
        let mut sd = StateDict::default();
        for (name, v) in entries {
            match v {
                Value::F32(a) => {
                    sd.tensors.insert(name, HostTensor::F32(a));
                }
                Value::I32(a) => {
                    sd.tensors.insert(name, HostTensor::I32(a));
                }
                Value::I64Scalar(n) => {
                    let t = raw(Dtype::I64, Vec::new(), n.to_le_bytes().to_vec(), &name)?;
                    sd.raw.insert(name, t);
                }
                Value::Flag(b) => {
                    let t = raw(Dtype::U8, vec![1], vec![u8::from(b)], &name)?;
                    sd.raw.insert(name, t);
                }
            }
        }
        Ok(sd)
    }

    /// The names of [`Module::state_dict`], in PyTorch's order (parameters, then buffers,
    /// then children, each in registration order).
    pub fn state_dict_keys(&self) -> Vec<String> {
        let mut entries = Vec::new();
        save_module(self, "", &mut entries);
        entries.into_iter().map(|(k, _)| k).collect()
    }

    /// PyTorch's `load_state_dict(state_dict, strict)`: copies every tensor of `sd` whose
    /// name is one of [`Module::state_dict`]'s into the model.
    ///
    /// * Shapes must match exactly ([`Error::ShapeMismatch`] naming the key, with the
    ///   model's shape as `expected` and the state dict's as `got`), in strict and
    ///   non-strict mode alike, as PyTorch's "size mismatch". As in PyTorch, a fake quant's
    ///   `scale` / `zero_point` and a per-channel observer's `min_val` / `max_val` take the
    ///   loaded length (they are resized), and a `[1]` tensor loads into a 0-dim one.
    /// * Dtypes: float32 for parameters and float buffers; `num_batches_tracked` int64 (or
    ///   int32); zero points int32 (or int64); the fake quant flags uint8, bool, int32 or
    ///   int64. Anything else is [`Error::DtypeMismatch`] (PyTorch would cast).
    /// * `strict`: any missing or unexpected key is [`Error::StateDictKeys`], whose message
    ///   is PyTorch's (`Missing key(s) in state_dict: "a", "b". Unexpected key(s) in
    ///   state_dict: "c".`). Non-strict: they are returned in [`IncompatibleKeys`].
    /// * A missing `num_batches_tracked` is not reported (it keeps its value), as PyTorch
    ///   does for state dicts without version metadata, such as safetensors files.
    ///
    /// On error the model is unchanged.
    pub fn load_state_dict(&mut self, sd: &StateDict, strict: bool) -> Result<IncompatibleKeys> {
        let mut copy = self.clone();
        let mut loader = Loader {
            sd,
            used: BTreeSet::new(),
            missing: Vec::new(),
        };
        load_module(&mut copy, "", &mut loader)?;
        let unexpected: Vec<String> = sd
            .names()
            .into_iter()
            .filter(|n| !loader.used.contains(*n))
            .map(str::to_string)
            .collect();
        let keys = IncompatibleKeys {
            missing_keys: loader.missing,
            unexpected_keys: unexpected,
        };
        if strict && !keys.is_empty() {
            return Err(Error::StateDictKeys {
                module: self.kind_name(),
                missing: keys.missing_keys,
                unexpected: keys.unexpected_keys,
            });
        }
        *self = copy;
        Ok(keys)
    }
}

// ------------------------------------------------------------------------------ loading

struct Loader<'a> {
    sd: &'a StateDict,
    used: BTreeSet<String>,
    missing: Vec<String>,
}

fn size_mismatch(key: &str, model: &[usize], ckpt: &[usize]) -> Error {
    Error::shape(
        format!(
            "state_dict key `{key}` (size mismatch: the current model's shape vs the checkpoint's)"
        ),
        model,
        ckpt,
    )
}

fn dtype_error(sd: &StateDict, key: &str, expected: &str) -> Error {
    Error::DtypeMismatch {
        name: key.to_string(),
        got: sd.dtype(key).map_or("unknown", dtype_name).to_string(),
        expected: expected.to_string(),
    }
}

/// How a resizable 1-D buffer's loaded shape is checked.
#[derive(Clone, Copy)]
enum Len {
    /// Any 1-D length (PyTorch resizes the buffer).
    Any,
    /// `[1]`, or 0-dim.
    One,
}

impl Loader<'_> {
    /// Marks `key` used if present; records it missing (unless `optional`) if not.
    fn present(&mut self, key: &str, optional: bool) -> bool {
        if self.sd.contains(key) {
            self.used.insert(key.to_string());
            true
        } else {
            if !optional {
                self.missing.push(key.to_string());
            }
            false
        }
    }

    fn f32_tensor(&self, key: &str) -> Result<&ArrayD<f32>> {
        match self.sd.tensors.get(key) {
            Some(HostTensor::F32(a)) => Ok(a),
            _ => Err(dtype_error(self.sd, key, "float32")),
        }
    }

    /// A tensor of exactly `target`'s shape, copied into it.
    fn exact<D: Dimension>(&mut self, key: &str, target: &mut Array<f32, D>) -> Result<()> {
        if !self.present(key, false) {
            return Ok(());
        }
        let src = self.f32_tensor(key)?;
        if src.shape() != target.shape() {
            return Err(size_mismatch(key, target.shape(), src.shape()));
        }
        let v = src
            .view()
            .into_dimensionality::<D>()
            .map_err(|e| Error::invalid(format!("internal: `{key}`: {e}")))?;
        target.assign(&v);
        Ok(())
    }

    /// A 1-D f32 buffer (or 0-dim for [`Len::One`]).
    fn f32_vec(&mut self, key: &str, len: Len, model_len: usize) -> Result<Option<Vec<f32>>> {
        if !self.present(key, false) {
            return Ok(None);
        }
        let src = self.f32_tensor(key)?;
        check_len(key, src.shape(), len, model_len)?;
        Ok(Some(src.iter().copied().collect()))
    }

    /// Integers of any integer dtype, with the shape.
    fn ints(&self, key: &str, expected: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        if let Some(t) = self.sd.tensors.get(key) {
            return match t {
                HostTensor::I32(a) => {
                    Ok((a.iter().map(|&v| v as i64).collect(), a.shape().to_vec()))
                }
                HostTensor::F32(_) => Err(dtype_error(self.sd, key, expected)),
            };
        }
        let Some(r) = self.sd.raw.get(key) else {
            return Err(Error::MissingTensor {
                name: key.to_string(),
                context: String::new(),
            });
        };
        let d = r.data();
        let v: Vec<i64> = match r.dtype() {
            Dtype::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
            Dtype::U8 | Dtype::BOOL => d.iter().map(|&b| b as i64).collect(),
            Dtype::I8 => d.iter().map(|&b| b as i8 as i64).collect(),
            _ => return Err(dtype_error(self.sd, key, expected)),
        };
        Ok((v, r.shape().to_vec()))
    }

    fn count(&mut self, key: &str) -> Result<Option<u64>> {
        if !self.present(key, true) {
            return Ok(None);
        }
        let (v, shape) = self.ints(key, "int64")?;
        check_len(key, &shape, Len::One, 1)?;
        let n = v.first().copied().unwrap_or(0);
        u64::try_from(n)
            .map(Some)
            .map_err(|_| Error::invalid(format!("state_dict key `{key}`: negative count {n}")))
    }

    fn flag(&mut self, key: &str) -> Result<Option<bool>> {
        if !self.present(key, false) {
            return Ok(None);
        }
        let (v, shape) = self.ints(key, "uint8")?;
        check_len(key, &shape, Len::One, 1)?;
        Ok(Some(v.first().is_some_and(|&x| x != 0)))
    }

    fn i32_vec(&mut self, key: &str, len: Len, model_len: usize) -> Result<Option<Vec<i32>>> {
        if !self.present(key, false) {
            return Ok(None);
        }
        let (v, shape) = self.ints(key, "int32")?;
        check_len(key, &shape, len, model_len)?;
        v.into_iter()
            .map(|x| {
                i32::try_from(x).map_err(|_| {
                    Error::invalid(format!("state_dict key `{key}`: {x} does not fit int32"))
                })
            })
            .collect::<Result<Vec<i32>>>()
            .map(Some)
    }
}

fn check_len(key: &str, shape: &[usize], len: Len, model_len: usize) -> Result<()> {
    let ok = match len {
        Len::Any => shape.len() == 1,
        Len::One => shape.is_empty() || shape == [1],
    };
    if ok {
        Ok(())
    } else {
        let model: Vec<usize> = match len {
            Len::Any => vec![model_len],
            Len::One => vec![1],
        };
        Err(size_mismatch(key, &model, shape))
    }
}

fn load_conv(c: &mut ConvLayer, p: &str, l: &mut Loader) -> Result<()> {
    l.exact(&key(p, "weight"), &mut c.weight)?;
    if let Some(b) = c.bias.as_mut() {
        l.exact(&key(p, "bias"), b)?;
    }
    Ok(())
}

fn load_bn(b: &mut BatchNormLayer, p: &str, l: &mut Loader) -> Result<()> {
    if let Some(w) = b.bn.weight.as_mut() {
        l.exact(&key(p, "weight"), w)?;
    }
    if let Some(x) = b.bn.bias.as_mut() {
        l.exact(&key(p, "bias"), x)?;
    }
    l.exact(&key(p, "running_mean"), &mut b.bn.running_mean)?;
    l.exact(&key(p, "running_var"), &mut b.bn.running_var)?;
    if let Some(n) = l.count(&key(p, "num_batches_tracked"))? {
        b.num_batches_tracked = n;
    }
    Ok(())
}

fn load_fake_quant(f: &mut FakeQuantize, p: &str, l: &mut Loader) -> Result<()> {
    if let Some(v) = l.flag(&key(p, "fake_quant_enabled"))? {
        f.fake_quant_enabled = v;
    }
    if let Some(v) = l.flag(&key(p, "observer_enabled"))? {
        f.observer_enabled = v;
    }
    let per_channel = f.is_per_channel();
    let len = if per_channel { Len::Any } else { Len::One };
    let scale_key = key(p, "scale");
    if let Some(v) = l.f32_vec(&scale_key, len, f.scale.len())? {
        f.scale = v;
    }
    if let Some(v) = l.i32_vec(&key(p, "zero_point"), len, f.zero_point.len())? {
        f.zero_point = v;
    }
    if f.scale.len() != f.zero_point.len() {
        return Err(size_mismatch(
            &key(p, "zero_point"),
            &[f.scale.len()],
            &[f.zero_point.len()],
        ));
    }
    let obs = key(p, "activation_post_process");
    if let Some(v) = l.f32_vec(&key(&obs, "eps"), Len::One, 1)? {
        if let Some(&e) = v.first() {
            f.spec.eps = e;
        }
    }
    let min_key = key(&obs, "min_val");
    if let Some(v) = l.f32_vec(&min_key, len, f.min_val.len())? {
        f.min_val = v;
    }
    if let Some(v) = l.f32_vec(&key(&obs, "max_val"), len, f.max_val.len())? {
        f.max_val = v;
    }
    if f.min_val.len() != f.max_val.len() {
        return Err(size_mismatch(
            &key(&obs, "max_val"),
            &[f.min_val.len()],
            &[f.max_val.len()],
        ));
    }
    Ok(())
}

fn load_qat(q: &mut QatLayer, p: &str, l: &mut Loader) -> Result<()> {
    match &mut q.head {
        super::QatHead::Conv1d(c) | super::QatHead::Conv2d(c) => load_conv(c, p, l)?,
        super::QatHead::Linear(x) => {
            l.exact(&key(p, "weight"), &mut x.weight)?;
            if let Some(b) = x.bias.as_mut() {
                l.exact(&key(p, "bias"), b)?;
            }
        }
    }
    if let Some(b) = q.bn.as_mut() {
        load_bn(b, &key(p, "bn"), l)?;
    }
    load_fake_quant(&mut q.weight_fake_quant, &key(p, "weight_fake_quant"), l)?;
    if let Some(a) = q.activation_post_process.as_mut() {
        load_fake_quant(a, &key(p, "activation_post_process"), l)?;
    }
    Ok(())
}

fn load_fused_head(h: &mut FusedHead, p: &str, l: &mut Loader) -> Result<()> {
    match h {
        FusedHead::Conv1d(c) | FusedHead::Conv2d(c) => load_conv(c, p, l),
        FusedHead::ConvTranspose2d(c) => {
            l.exact(&key(p, "weight"), &mut c.weight)?;
            if let Some(b) = c.bias.as_mut() {
                l.exact(&key(p, "bias"), b)?;
            }
            Ok(())
        }
        FusedHead::Linear(x) => {
            l.exact(&key(p, "weight"), &mut x.weight)?;
            if let Some(b) = x.bias.as_mut() {
                l.exact(&key(p, "bias"), b)?;
            }
            Ok(())
        }
        FusedHead::BatchNorm1d(b) | FusedHead::BatchNorm2d(b) => load_bn(b, p, l),
    }
}

fn load_module(m: &mut Module, p: &str, l: &mut Loader) -> Result<()> {
    #[allow(unreachable_patterns)]
    match m.layer_mut() {
        Layer::Conv1d(c) | Layer::Conv2d(c) => load_conv(c, p, l)?,
        Layer::ConvTranspose2d(c) => {
            l.exact(&key(p, "weight"), &mut c.weight)?;
            if let Some(b) = c.bias.as_mut() {
                l.exact(&key(p, "bias"), b)?;
            }
        }
        Layer::Linear(x) => {
            l.exact(&key(p, "weight"), &mut x.weight)?;
            if let Some(b) = x.bias.as_mut() {
                l.exact(&key(p, "bias"), b)?;
            }
        }
        Layer::BatchNorm1d(b) | Layer::BatchNorm2d(b) => load_bn(b, p, l)?,
        Layer::Container(c) => {
            for (name, child) in c.children_mut() {
                load_module(child, &key(p, name), l)?;
            }
        }
        Layer::Fused(f) => {
            if fused_is_sequential(f) {
                load_fused_head(&mut f.head, &key(p, "0"), l)?;
                if let Some(b) = f.bn.as_mut() {
                    load_bn(b, &key(p, "1"), l)?;
                }
            } else {
                load_fused_head(&mut f.head, p, l)?;
            }
        }
        Layer::Qat(q) => load_qat(q, p, l)?,
        _ => {}
    }
    Ok(())
}

// ------------------------------------------------------------------------------ parameters

fn visit_wb(
    w: ArrayViewMutD<'_, f32>,
    b: Option<&mut ndarray::Array1<f32>>,
    p: &str,
    f: &mut dyn FnMut(&str, ArrayViewMutD<'_, f32>),
) {
    f(&key(p, "weight"), w);
    if let Some(b) = b {
        f(&key(p, "bias"), b.view_mut().into_dyn());
    }
}

fn visit_bn(b: &mut BatchNormLayer, p: &str, f: &mut dyn FnMut(&str, ArrayViewMutD<'_, f32>)) {
    if let Some(w) = b.bn.weight.as_mut() {
        f(&key(p, "weight"), w.view_mut().into_dyn());
    }
    if let Some(x) = b.bn.bias.as_mut() {
        f(&key(p, "bias"), x.view_mut().into_dyn());
    }
}

fn visit_fused_head(h: &mut FusedHead, p: &str, f: &mut dyn FnMut(&str, ArrayViewMutD<'_, f32>)) {
    match h {
        FusedHead::Conv1d(c) | FusedHead::Conv2d(c) => {
            visit_wb(c.weight.view_mut(), c.bias.as_mut(), p, f)
        }
        FusedHead::ConvTranspose2d(c) => {
            visit_wb(c.weight.view_mut().into_dyn(), c.bias.as_mut(), p, f)
        }
        FusedHead::Linear(x) => visit_wb(x.weight.view_mut().into_dyn(), x.bias.as_mut(), p, f),
        FusedHead::BatchNorm1d(b) | FusedHead::BatchNorm2d(b) => visit_bn(b, p, f),
    }
}

/// Calls `f` on every parameter (PyTorch's `named_parameters()`: weights, biases, BatchNorm
/// γ and β; not the buffers) of the tree, with its state-dict name.
pub(crate) fn for_each_param_mut(
    m: &mut Module,
    p: &str,
    f: &mut dyn FnMut(&str, ArrayViewMutD<'_, f32>),
) {
    #[allow(unreachable_patterns)]
    match m.layer_mut() {
        Layer::Conv1d(c) | Layer::Conv2d(c) => visit_wb(c.weight.view_mut(), c.bias.as_mut(), p, f),
        Layer::ConvTranspose2d(c) => {
            visit_wb(c.weight.view_mut().into_dyn(), c.bias.as_mut(), p, f)
        }
        Layer::Linear(x) => visit_wb(x.weight.view_mut().into_dyn(), x.bias.as_mut(), p, f),
        Layer::BatchNorm1d(b) | Layer::BatchNorm2d(b) => visit_bn(b, p, f),
        Layer::Container(c) => {
            for (name, child) in c.children_mut() {
                for_each_param_mut(child, &key(p, name), f);
            }
        }
        Layer::Fused(x) => {
            if fused_is_sequential(x) {
                visit_fused_head(&mut x.head, &key(p, "0"), f);
                if let Some(b) = x.bn.as_mut() {
                    visit_bn(b, &key(p, "1"), f);
                }
            } else {
                visit_fused_head(&mut x.head, p, f);
            }
        }
        Layer::Qat(q) => {
            match &mut q.head {
                super::QatHead::Conv1d(c) | super::QatHead::Conv2d(c) => {
                    visit_wb(c.weight.view_mut(), c.bias.as_mut(), p, f)
                }
                super::QatHead::Linear(x) => {
                    visit_wb(x.weight.view_mut().into_dyn(), x.bias.as_mut(), p, f)
                }
            }
            if let Some(b) = q.bn.as_mut() {
                visit_bn(b, &key(p, "bn"), f);
            }
        }
        _ => {}
    }
}
