//! The built-in pattern table and fusers.

use crate::error::{Error, Result};
use crate::nn::{
    BatchNormLayer, ConvLayer, ConvTransposeLayer, Fused, FusedHead, Layer, LinearLayer, Module,
};
use crate::ops::Activation;
use crate::reference::fold;

/// Heads that take a BatchNorm, with the BatchNorm type they take.
const HEADS: &[(&str, &str)] = &[
    ("Conv1d", "BatchNorm1d"),
    ("Conv2d", "BatchNorm2d"),
    ("ConvTranspose2d", "BatchNorm2d"),
    ("Linear", "BatchNorm1d"),
];

/// BatchNorms that fuse with a following activation.
const BN_HEADS: &[&str] = &["BatchNorm1d", "BatchNorm2d"];

/// The activation module types that close a pattern.
pub(crate) const ACTIVATIONS: &[&str] = &["ReLU", "ReLU6", "LeakyReLU", "Hardswish"];

/// Every built-in pattern (module type-name tuples), in table order: for each head
/// (`Conv1d`, `Conv2d`, `ConvTranspose2d`, `Linear`) `head + bn`, `head + bn + act` and
/// `head + act` for each activation (`ReLU`, `ReLU6`, `LeakyReLU`, `Hardswish`), then
/// `BatchNorm1d + act` and `BatchNorm2d + act`. The union of PyTorch's
/// `_DEFAULT_OP_LIST_TO_FUSER_METHOD` (restricted to 1-D and 2-D), NNI's table and MQBench's
/// transposed-conv patterns, with ReLU6, LeakyReLU and Hardswish wherever ReLU appears.
pub fn default_patterns() -> Vec<Vec<&'static str>> {
    let mut out = Vec::new();
    for &(head, bn) in HEADS {
        out.push(vec![head, bn]);
        for &a in ACTIVATIONS {
            out.push(vec![head, bn, a]);
        }
        for &a in ACTIVATIONS {
            out.push(vec![head, a]);
        }
    }
    for &bn in BN_HEADS {
        for &a in ACTIVATIONS {
            out.push(vec![bn, a]);
        }
    }
    out
}

/// Whether `types` is a built-in pattern.
pub(crate) fn is_builtin<S: AsRef<str>>(types: &[S]) -> bool {
    let t: Vec<&str> = types.iter().map(AsRef::as_ref).collect();
    let is_act = |s: &str| ACTIVATIONS.contains(&s);
    let bn_of = |h: &str| HEADS.iter().find(|(head, _)| *head == h).map(|(_, b)| *b);
    match t.as_slice() {
        [h, b] => {
            bn_of(h) == Some(*b)
                || (bn_of(h).is_some() && is_act(b))
                || (BN_HEADS.contains(h) && is_act(b))
        }
        [h, b, a] => bn_of(h) == Some(*b) && is_act(a),
        _ => false,
    }
}

/// The longest built-in pattern.
pub(crate) const MAX_BUILTIN_LEN: usize = 3;

fn activation_of(m: &Module) -> Option<Activation> {
    m.layer().as_activation()
}

fn bn_of(m: &Module) -> Option<&BatchNormLayer> {
    match m.layer() {
        Layer::BatchNorm1d(b) | Layer::BatchNorm2d(b) => Some(b),
        _ => None,
    }
}

fn internal(what: &str) -> Error {
    Error::invalid(format!(
        "internal: built-in fuser called on a non-matching group ({what})"
    ))
}

/// The fused module for a group that [`is_builtin`] accepted. `is_qat`: keep the BatchNorm
/// (intrinsic modules) instead of folding it.
pub(crate) fn builtin_fuse(is_qat: bool, names: &[String], mods: &[&Module]) -> Result<Module> {
    let head = mods.first().ok_or_else(|| internal("empty"))?;
    let head_kind = head.kind_name();
    let label = |i: usize| format!("`{}` ({})", names[i], mods[i].kind_name());
    // head + act, bn + act.
    if mods.len() == 2 {
        if let Some(act) = activation_of(mods[1]) {
            let fh = match head.layer() {
                Layer::Conv1d(c) => FusedHead::Conv1d(c.clone()),
                Layer::Conv2d(c) => FusedHead::Conv2d(c.clone()),
                Layer::ConvTranspose2d(c) => FusedHead::ConvTranspose2d(c.clone()),
                Layer::Linear(l) => FusedHead::Linear(l.clone()),
                Layer::BatchNorm1d(b) => FusedHead::BatchNorm1d(b.clone()),
                Layer::BatchNorm2d(b) => FusedHead::BatchNorm2d(b.clone()),
                _ => return Err(internal(&head_kind)),
            };
            return Ok(Module::fused(Fused::new(fh, None, act)?));
        }
    }
    // head + bn (+ act).
    let bn = mods
        .get(1)
        .and_then(|m| bn_of(m))
        .ok_or_else(|| internal("no BatchNorm"))?;
    let act = match mods.get(2) {
        Some(m) => activation_of(m).ok_or_else(|| internal("no activation"))?,
        None => Activation::None,
    };
    if is_qat {
        // PyTorch: "Conv and BN both must be in the same mode (train or eval)."
        if mods.iter().any(|m| m.is_training() != head.is_training()) {
            return Err(Error::FusionModeMismatch {
                names: names.to_vec(),
            });
        }
    } else if let Some(i) = mods.iter().position(|m| m.is_training()) {
        // PyTorch's fuse_conv_bn_eval: "Fusion only for eval!".
        return Err(Error::FusionTrainingMode {
            name: names[i].clone(),
            kind: mods[i].kind_name(),
        });
    }
    let out_channels = match head.layer() {
        Layer::Conv1d(c) | Layer::Conv2d(c) => c.out_channels(),
        Layer::ConvTranspose2d(c) => c.out_channels(),
        Layer::Linear(l) => l.out_features(),
        _ => return Err(internal(&head_kind)),
    };
    let features = bn.num_features();
    // PyTorch's fuse_linear_bn_eval broadcasts a one-feature BatchNorm; QAT requires equality.
    let broadcast_ok = !is_qat && matches!(head.layer(), Layer::Linear(_)) && features == 1;
    if features != out_channels && !broadcast_ok {
        return Err(Error::ChannelMismatch {
            layer: label(0),
            layer_channels: out_channels,
            bn_channels: features,
        });
    }
    bn.bn.validate()?;
    if is_qat {
        let fh = match head.layer() {
            Layer::Conv1d(c) => FusedHead::Conv1d(c.clone()),
            Layer::Conv2d(c) => FusedHead::Conv2d(c.clone()),
            Layer::ConvTranspose2d(c) => FusedHead::ConvTranspose2d(c.clone()),
            Layer::Linear(l) => FusedHead::Linear(l.clone()),
            _ => return Err(internal(&head_kind)),
        };
        return Ok(Module::fused(Fused::new(fh, Some(bn.clone()), act)?));
    }
    // Eval: fold.
    let (folded_head, plain) = match head.layer() {
        Layer::Conv1d(c) | Layer::Conv2d(c) => {
            let f = fold::fuse_conv_bn_weights(&c.weight, c.bias.as_ref(), &bn.bn, false)?;
            let conv = ConvLayer {
                weight: f.weight,
                bias: Some(f.bias),
                params: c.params,
            };
            if matches!(head.layer(), Layer::Conv1d(_)) {
                (FusedHead::Conv1d(conv.clone()), Layer::Conv1d(conv))
            } else {
                (FusedHead::Conv2d(conv.clone()), Layer::Conv2d(conv))
            }
        }
        Layer::ConvTranspose2d(c) => {
            let f = fold::fuse_conv_bn_weights(
                &c.weight.clone().into_dyn(),
                c.bias.as_ref(),
                &bn.bn,
                true,
            )?;
            let weight = f
                .weight
                .into_dimensionality::<ndarray::Ix4>()
                .map_err(|e| Error::invalid(format!("internal: {e}")))?;
            let conv = ConvTransposeLayer {
                weight,
                bias: Some(f.bias),
                params: c.params,
            };
            (
                FusedHead::ConvTranspose2d(conv.clone()),
                Layer::ConvTranspose2d(conv),
            )
        }
        Layer::Linear(l) => {
            let f = fold::fuse_linear_bn_weights(&l.weight, l.bias.as_ref(), &bn.bn)?;
            let weight = f
                .weight
                .into_dimensionality::<ndarray::Ix2>()
                .map_err(|e| Error::invalid(format!("internal: {e}")))?;
            let lin = LinearLayer {
                weight,
                bias: Some(f.bias),
            };
            (FusedHead::Linear(lin.clone()), Layer::Linear(lin))
        }
        _ => return Err(internal(&head_kind)),
    };
    if act == Activation::None {
        // PyTorch returns the folded layer itself (a Conv2d, a Linear, ...).
        Ok(Module::new(plain))
    } else {
        Ok(Module::fused(Fused::new(folded_head, None, act)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let p = default_patterns();
        assert_eq!(p.len(), 4 * 9 + 2 * 4);
        assert!(p.iter().all(|t| is_builtin(t)));
        assert!(is_builtin(&["Conv2d", "BatchNorm2d", "ReLU6"]));
        assert!(is_builtin(&["ConvTranspose2d", "BatchNorm2d", "LeakyReLU"]));
        assert!(is_builtin(&["BatchNorm1d", "Hardswish"]));
        assert!(!is_builtin(&["Conv1d", "BatchNorm2d"]));
        assert!(!is_builtin(&["Conv2d", "ReLU", "BatchNorm2d"]));
        assert!(!is_builtin(&["Conv2d"]));
        assert!(!is_builtin(&["Linear", "BatchNorm1d", "ReLU", "ReLU"]));
    }
}
