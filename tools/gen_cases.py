#!/usr/bin/env python3
"""Generates conformance cases with real PyTorch, in the format of tests/golden/README.md
(the golden format: `op`, `params`, `atol`, `rtol`, `torch`, `format` metadata; `in.*` inputs,
`out.*` expected outputs; float32, zero points int32).

These cases cover configurations PyTorch accepts that qfuse once refused (issue 10, item 6):
  * fake quantization with quant_min == quant_max (per tensor and per channel);
  * padding='same' with even kernels (the extra row / column at the bottom / right), on
    conv2d and the fused conv+bn+act eval (PyTorch's QAT ConvBn2d itself fails on
    padding='same' in 2.15, so there is no QAT case);
  * negative channel axes in per-channel observers (PerChannelMinMaxObserver(ch_axis=-1));
    torch.fake_quantize_per_channel_affine itself refuses a negative axis ("`axis` must be
    between 0 and number of dimensions of input"), so there is no fake-quant case for it;
  * the quint8 symmetric zero point of a customized range (has_customized_qrange: an explicit
    quant_min / quant_max gives (quant_min + quant_max) // 2, 127 for [0, 255]; only the
    default range gives 128).

Usage: python3 tools/gen_cases.py [OUT_DIR, default tests/golden]   (needs torch and safetensors; CPU is enough)
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.ao.quantization import (
    MinMaxObserver,
    PerChannelMinMaxObserver,
)

OUT = sys.argv[1] if len(sys.argv) > 1 else "tests/golden"


def save(op, name, params, tensors, atol, rtol):
    meta = {
        "op": op,
        "params": json.dumps(params, sort_keys=True),
        "atol": repr(float(atol)),
        "rtol": repr(float(rtol)),
        "torch": torch.__version__.split("+")[0],
        "format": "1",
    }
    tensors = {k: v.detach().contiguous() for k, v in tensors.items() if v is not None}
    path = os.path.join(OUT, f"{op}__{name}.safetensors")
    save_file(tensors, path, metadata=meta)
    print(path)


def grad_of(fn, x, dy):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.backward(dy)
    return y.detach(), x.grad.detach()


def fake_quant_single_value_range(g):
    # quant_min == quant_max: every value becomes that one code; the gradient passes only
    # where round(x / scale) + zero_point is that code.
    x = torch.randn(2000, generator=g) * 0.3
    dy = torch.randn(2000, generator=g)
    scale, zp, q = 0.1, 3, 3
    y, dx = grad_of(lambda t: torch.fake_quantize_per_tensor_affine(t, scale, zp, q, q), x, dy)
    save("fake_quant_per_tensor", "single_value_range",
         {"scale": scale, "zero_point": zp, "quant_min": q, "quant_max": q},
         {"in.x": x, "in.dy": dy, "out.y": y, "out.dx": dx}, 0.0, 0.0)

    x = torch.randn(3, 4, 50, generator=g) * 0.5
    dy = torch.randn(3, 4, 50, generator=g)
    s = torch.rand(4, generator=g) * 0.2 + 0.05
    z = torch.full((4,), -2, dtype=torch.int32)
    y, dx = grad_of(
        lambda t: torch.fake_quantize_per_channel_affine(t, s, z, 1, -2, -2), x, dy)
    save("fake_quant_per_channel", "single_value_range",
         {"axis": 1, "quant_min": -2, "quant_max": -2},
         {"in.x": x, "in.dy": dy, "in.scale": s, "in.zero_point": z, "out.y": y, "out.dx": dx},
         0.0, 0.0)


def conv_same(g):
    # Even kernels: PyTorch pads total = dilation * (k - 1), total // 2 before, the rest after.
    for name, xs, ws, dil, groups in [
        ("same_even_kernel", (2, 3, 7, 8), (4, 3, 2, 4), (1, 1), 1),
        ("same_dilated_grouped", (1, 6, 9, 6), (4, 3, 4, 2), (1, 3), 2),
    ]:
        x = torch.randn(*xs, generator=g)
        w = torch.randn(*ws, generator=g) * 0.3
        b = torch.randn(ws[0], generator=g) * 0.1
        y = F.conv2d(x, w, b, stride=1, padding="same", dilation=dil, groups=groups)
        assert y.shape[2:] == x.shape[2:]
        save("conv2d", name,
             {"stride": [1, 1], "padding": "same", "dilation": list(dil), "groups": groups},
             {"in.x": x, "in.weight": w, "in.bias": b, "out.y": y}, 1e-4, 1e-4)


def bn_inputs(g, c):
    return {
        "weight": torch.rand(c, generator=g) + 0.5,
        "bias": torch.randn(c, generator=g) * 0.1,
        "running_mean": torch.randn(c, generator=g) * 0.1,
        "running_var": torch.rand(c, generator=g) + 0.5,
    }


def conv_bn_eval_same(g):
    x = torch.randn(2, 3, 6, 7, generator=g)
    conv = torch.nn.Conv2d(3, 5, (4, 2), padding="same", bias=True)
    bn = torch.nn.BatchNorm2d(5, eps=1e-5)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(5, 3, 4, 2, generator=g) * 0.3)
        conv.bias.copy_(torch.randn(5, generator=g) * 0.1)
        for k, v in bn_inputs(g, 5).items():
            getattr(bn, k).copy_(v)
    conv.eval()
    bn.eval()
    with torch.no_grad():
        y_unfused = F.relu(bn(conv(x)))
        fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
        y = F.relu(fused(x))
    save("conv_bn_act_eval", "same_even_kernel",
         {"stride": [1, 1], "padding": "same", "dilation": [1, 1], "groups": 1, "eps": 1e-5,
          "activation": "relu"},
         {"in.x": x, "in.conv.weight": conv.weight, "in.conv.bias": conv.bias,
          "in.bn.weight": bn.weight, "in.bn.bias": bn.bias,
          "in.bn.running_mean": bn.running_mean, "in.bn.running_var": bn.running_var,
          "out.y": y, "out.y_unfused": y_unfused, "out.weight": fused.weight,
          "out.bias": fused.bias}, 1e-4, 1e-4)


def observers(g):
    # Negative channel axes: PerChannelMinMaxObserver(ch_axis=-1) observes the last dim.
    x = torch.randn(3, 4, 5, generator=g) * 2
    for name, axis, dtype, scheme, (qmin, qmax) in [
        ("per_channel_affine_axis_minus1", -1, torch.quint8, torch.per_channel_affine, (0, 255)),
        ("per_channel_symmetric_axis_minus2", -2, torch.qint8, torch.per_channel_symmetric,
         (-128, 127)),
    ]:
        o = PerChannelMinMaxObserver(ch_axis=axis, dtype=dtype, qscheme=scheme,
                                     quant_min=qmin, quant_max=qmax)
        o(x)
        s, z = o.calculate_qparams()
        save("calc_qparams", name,
             {"dtype": str(dtype).split(".")[1], "qscheme": str(scheme).split(".")[1],
              "quant_min": qmin, "quant_max": qmax, "axis": axis, "customized_range": True},
             {"in.x": x, "out.scale": s, "out.zero_point": z.to(torch.int32)}, 0.0, 1e-6)

    # quint8 symmetric: the customized range's midpoint; 128 only for the default range.
    x = torch.randn(500, generator=g) * 3
    for name, kwargs, (qmin, qmax), customized in [
        ("uint8_symmetric_customized", {"quant_min": 0, "quant_max": 255}, (0, 255), True),
        ("uint8_symmetric_default", {}, (0, 255), False),
        ("uint8_symmetric_customized_0_127", {"quant_min": 0, "quant_max": 127}, (0, 127), True),
    ]:
        o = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_symmetric, **kwargs)
        assert o.has_customized_qrange == customized
        o(x)
        s, z = o.calculate_qparams()
        save("calc_qparams", name,
             {"dtype": "quint8", "qscheme": "per_tensor_symmetric", "quant_min": qmin,
              "quant_max": qmax, "customized_range": customized},
             {"in.x": x, "out.scale": s, "out.zero_point": z.to(torch.int32)}, 0.0, 1e-6)
    o = PerChannelMinMaxObserver(ch_axis=-1, dtype=torch.quint8,
                                 qscheme=torch.per_channel_symmetric, quant_min=0, quant_max=255)
    x = torch.randn(6, 3, generator=g)
    o(x)
    s, z = o.calculate_qparams()
    save("calc_qparams", "uint8_per_channel_symmetric_customized_axis_minus1",
         {"dtype": "quint8", "qscheme": "per_channel_symmetric", "quant_min": 0,
          "quant_max": 255, "axis": -1, "customized_range": True},
         {"in.x": x, "out.scale": s, "out.zero_point": z.to(torch.int32)}, 0.0, 1e-6)


def main():
    os.makedirs(OUT, exist_ok=True)
    g = torch.Generator().manual_seed(20261203)
    fake_quant_single_value_range(g)
    conv_same(g)
    conv_bn_eval_same(g)
    observers(g)


if __name__ == "__main__":
    main()
