#!/usr/bin/env python3
"""Generates the ONNX test models of tests/onnx/ (development tooling only; cargo test does not
run Python).

    pip install torch onnx onnxruntime safetensors numpy
    python3 tools/gen_onnx.py tests/onnx fuzz/seeds/onnx
    for m in mobilenet resnet; do
        cargo run --release -- quantize tests/onnx/$m.onnx --calib tests/onnx/calib.safetensors \
            --backend cpu -o tests/onnx/$m.int8.onnx
    done
    python3 tools/gen_onnx.py --qdq tests/onnx
    python3 tools/gen_onnx.py --int-ops tests/onnx

resnet, mobilenet and mnist are PyTorch nn.Modules (seeded random weights, randomized
BatchNorm weights, biases and running statistics) exported by torch.onnx.export: the
TorchScript exporter (dynamo=False), opset 13 (14 for HardSwish), the eval-mode model exported
with training=TrainingMode.PRESERVE so that every BatchNorm stays a BatchNormalization node
with its own epsilon (the default EVAL mode folds them into the convs); initializers are
named by the state-dict keys, nodes /module/path/Op. decoder and the fuzz seeds cover ops
torch.onnx.export does not write for any module (Identity, a Gemm with transB = 0, a Conv
with asymmetric pads — PyTorch exports those as a Pad node); they are built with onnx.helper,
node for node. For each model NAME it writes

  NAME.onnx            the model (each < 1 MB)
  NAME.io.safetensors  a fixed input (`input`) and onnxruntime's outputs for it (`output`)

and calib.safetensors (calibration inputs for `qfuse quantize`); with --qdq, onnxruntime's
outputs for the QDQ models `qfuse quantize` wrote (NAME.int8.io.safetensors) (and, with a second folder, the fuzz target's seeds: two tiny models covering every imported
op) so that the Rust tests compare qfuse's evaluation with a real runtime without Python;
with --fresh DIR, only fresh.onnx (below); with --int-ops, onnxruntime's codes for the
integer ops of qfuse's IntModel (global average pooling, HardSwish / LeakyRelu tables, padded
max pooling, the residual add as QLinearAdd on uint8 and int8 codes) between
DequantizeLinear and QuantizeLinear (int_ops.safetensors).
Models:

  resnet.onnx     ResNet-style: conv-bn-relu stem, max pool, a basic block with a residual Add,
                  a strided block with a 1x1 conv-bn shortcut, global average pool, linear head
  mobilenet.onnx  MobileNetV2-style: conv-bn-ReLU6 (Clip 0..6), depthwise conv-bn-ReLU6,
                  linear bottleneck, an inverted residual with Add, a conv-bn-HardSwish, a
                  linear-bn-ReLU (Gemm + BatchNorm1d) and a linear head; BatchNorm eps 1e-3 in
                  half of the layers (as torchvision's EfficientNet), 1e-5 in the others
  mnist.onnx      NNI's Mnist (conv1-batchnorm1-ReLU6, max pool, conv2-ReLU6, max pool,
                  view, fc1-ReLU6, fc2), log_softmax left out (not an imported op) and fc1
                  narrowed from 500 to 64 units to keep the file under 1 MB
  decoder.onnx    the other imported ops: a grouped ConvTranspose-bn-LeakyRelu, Identity,
                  Concat, AveragePool (pads, ceil_mode), Mul, a Conv with asymmetric pads,
                  Reshape, and a Gemm with transB = 0 followed by a BatchNorm1d
  fresh.onnx      a freshly initialized convnet exported by torch.onnx.export: its equal
                  BatchNorm tensors are deduplicated and shared through Identity nodes
"""

import os
import sys

import io

import numpy as np
import onnx
import torch
import torch.nn as nn
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file, save_file

OPSET = 13


class Builder:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes = []
        self.inits = []

    def init(self, name, array):
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, name, shape, fan_in):
        w = self.rng.normal(0.0, 1.0 / np.sqrt(fan_in), size=shape).astype(np.float32)
        return self.init(name, w)

    def node(self, op, inputs, name, **attrs):
        out = name + "_output_0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def conv(self, x, mod, cin, cout, k, stride=1, pad=0, group=1, bias=False):
        w = self.weight(mod + ".weight", (cout, cin // group, k, k), cin // group * k * k)
        inputs = [x, w]
        if bias:
            inputs.append(self.init(mod + ".bias", self.rng.normal(0, 0.1, cout).astype(np.float32)))
        return self.node(
            "Conv", inputs, f"/{mod}/Conv", kernel_shape=[k, k], strides=[stride, stride],
            pads=[pad] * 4, group=group, dilations=[1, 1])

    def bn(self, x, mod, c, eps=1e-5):
        r = self.rng
        names = [
            self.init(mod + ".weight", r.uniform(0.5, 1.5, c).astype(np.float32)),
            self.init(mod + ".bias", r.normal(0, 0.2, c).astype(np.float32)),
            self.init(mod + ".running_mean", r.normal(0, 0.5, c).astype(np.float32)),
            self.init(mod + ".running_var", r.uniform(0.5, 2.0, c).astype(np.float32)),
        ]
        return self.node("BatchNormalization", [x] + names, f"/{mod}/BatchNormalization",
                         epsilon=eps, momentum=0.9)

    def relu(self, x, mod):
        return self.node("Relu", [x], f"/{mod}/Relu")

    def relu6(self, x, mod):
        lo = self.init(f"/{mod}/min", np.array(0.0, np.float32))
        hi = self.init(f"/{mod}/max", np.array(6.0, np.float32))
        return self.node("Clip", [x, lo, hi], f"/{mod}/Clip")

    def gemm(self, x, mod, fin, fout):
        w = self.weight(mod + ".weight", (fout, fin), fin)
        b = self.init(mod + ".bias", self.rng.normal(0, 0.1, fout).astype(np.float32))
        return self.node("Gemm", [x, w, b], f"/{mod}/Gemm", alpha=1.0, beta=1.0, transB=1)

    def model(self, name, x_shape, out, y_shape, opset=OPSET):
        x = helper.make_tensor_value_info("input", TensorProto.FLOAT, x_shape)
        y = helper.make_tensor_value_info(out, TensorProto.FLOAT, y_shape)
        g = helper.make_graph(self.nodes, name, [x], [y], initializer=self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="qfuse tools/gen_onnx.py")
        m.ir_version = 8
        onnx.checker.check_model(m, full_check=True)
        return m


def randomize_bn(model, seed):
    """Random affine parameters and running statistics in every BatchNorm (a trained-looking
    model: folding then changes the weights)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
    return model


def export(model, name, x_shape, seed, opset=OPSET):
    """torch.onnx.export of `model` (eval mode) with its BatchNorms kept as nodes: the
    TorchScript exporter (`dynamo=False`) with `training=TrainingMode.PRESERVE` (the default
    EVAL mode folds each BatchNorm into the conv before it)."""
    model = randomize_bn(model.eval(), seed)
    f = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(x_shape),), f, dynamo=False, opset_version=opset,
                      input_names=["input"], output_names=["output"],
                      training=torch.onnx.TrainingMode.PRESERVE)
    m = onnx.load_from_string(f.getvalue())
    m.graph.name = name
    onnx.checker.check_model(m, full_check=True)
    return m


def conv_bn(cin, cout, k, stride=1, groups=1, eps=1e-5, act=None):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout, eps=eps)]
    return nn.Sequential(*layers, *([act] if act is not None else []))


class BasicBlock(nn.Module):
    """torchvision's resnet BasicBlock (one ReLU module applied twice)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = x if self.downsample is None else self.downsample(x)
        return self.relu(y + s)


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, c, hidden):
        super().__init__()
        self.conv = nn.Sequential(conv_bn(c, hidden, 1, act=nn.ReLU6()),
                                  conv_bn(hidden, hidden, 3, groups=hidden, eps=1e-3,
                                          act=nn.ReLU6()),
                                  nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.conv(x)


class Bottleneck(nn.Module):
    """MobileNetV2's first block: depthwise conv-bn-ReLU6, then a linear 1x1 bottleneck."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Sequential(conv_bn(cin, cin, 3, groups=cin, act=nn.ReLU6()),
                                  nn.Conv2d(cin, cout, 1, bias=False),
                                  nn.BatchNorm2d(cout, eps=1e-3))

    def forward(self, x):
        return self.conv(x)


class MobileNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 8, 3, 2, eps=1e-3, act=nn.ReLU6()),
            Bottleneck(8, 16),
            InvertedResidual(16, 32),
            # features.3: conv-bn-hardswish (MobileNetV3's last conv).
            conv_bn(16, 32, 1, eps=1e-3, act=nn.Hardswish()))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(32, 24), nn.BatchNorm1d(24), nn.ReLU(),
                                        nn.Linear(24, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class Mnist(nn.Module):
    """NNI's Mnist (examples/model_compress/models/mnist), fc1 narrowed to 64 units and
    log_softmax left out."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(4 * 4 * 50, 64)
        self.fc2 = nn.Linear(64, 10)
        self.relu1 = nn.ReLU6()
        self.relu2 = nn.ReLU6()
        self.relu3 = nn.ReLU6()
        self.max_pool1 = nn.MaxPool2d(2, 2)
        self.max_pool2 = nn.MaxPool2d(2, 2)
        self.batchnorm1 = nn.BatchNorm2d(20)

    def forward(self, x):
        x = self.relu1(self.batchnorm1(self.conv1(x)))
        x = self.max_pool1(x)
        x = self.relu2(self.conv2(x))
        x = self.max_pool2(x)
        x = x.view(-1, 4 * 4 * 50)
        x = self.relu3(self.fc1(x))
        return self.fc2(x)


def resnet():
    torch.manual_seed(1)
    return export(ResNet(), "resnet", [1, 3, 16, 16], 1)


def mobilenet():
    torch.manual_seed(2)
    return export(MobileNet(), "mobilenet", [2, 3, 16, 16], 2, opset=14)  # HardSwish: 14


def mnist():
    torch.manual_seed(3)
    return export(Mnist(), "mnist", [2, 1, 28, 28], 3)


def decoder():
    b = Builder(4)
    x = b.relu(b.bn(b.conv("input", "enc", 4, 8, 3, stride=2, pad=1), "enc_bn", 8), "enc_act")
    # up: grouped ConvTranspose (weight [Cin, Cout/g, k, k]) + bn + LeakyRelu.
    w = b.weight("up.weight", (8, 4, 2, 2), 8)
    up = b.node("ConvTranspose", [x, w], "/up/ConvTranspose", kernel_shape=[2, 2],
                strides=[2, 2], group=2)
    up = b.bn(up, "up_bn", 8, eps=1e-3)
    up = b.node("LeakyRelu", [up], "/up_act/LeakyRelu", alpha=0.1)
    # skip connection, concat, average pool with padding and ceil_mode.
    skip = b.node("Identity", ["input"], "/skip/Identity")
    x = b.node("Concat", [up, skip], "/Concat", axis=1)
    x = b.node("AveragePool", [x], "/pool/AveragePool", kernel_shape=[3, 3], strides=[2, 2],
               pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=0)
    scale = b.init("scale", b.rng.uniform(0.5, 1.5, (1, 12, 1, 1)).astype(np.float32))
    x = b.node("Mul", [x, scale], "/Mul")
    # a Conv with asymmetric pads, then Gemm with transB = 0 followed by a BatchNorm1d.
    x = b.node("Conv", [x, b.weight("head.weight", (6, 12, 2, 2), 48)], "/head/Conv",
               kernel_shape=[2, 2], pads=[0, 0, 1, 1])
    shape = b.init("/shape", np.array([0, -1], np.int64))
    x = b.node("Reshape", [x, shape], "/Reshape")
    w = b.weight("proj.weight", (6 * 7 * 7, 5), 294)
    x = b.node("Gemm", [x, w], "/proj/Gemm")
    x = b.bn(x, "proj_bn", 5)
    return b.model("decoder", [1, 4, 12, 12], x, [1, 5])


class Fresh(nn.Module):
    """A freshly initialized convnet (BatchNorm weights 1, biases 0, running mean 0 and
    variance 1, as PyTorch creates them): torch.onnx.export deduplicates the equal
    BatchNorm tensors and shares them through Identity nodes, which qfuse must see through
    to fold every BatchNorm. The last BatchNorm is randomized (a trained one beside them)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 8, 3, 2, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def fresh():
    torch.manual_seed(5)
    model = Fresh().eval()
    randomize_bn(model.bn3, 5)
    f = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(2, 3, 8, 8),), f, dynamo=False, opset_version=OPSET,
                      input_names=["input"], output_names=["output"],
                      training=torch.onnx.TrainingMode.PRESERVE)
    m = onnx.load_from_string(f.getvalue())
    m.graph.name = "fresh"
    onnx.checker.check_model(m, full_check=True)
    return m


def seed_conv():
    b = Builder(10)
    x = b.relu6(b.bn(b.conv("input", "c", 2, 2, 3, pad=1), "bn", 2), "act")
    x = b.node("MaxPool", [x], "/pool/MaxPool", kernel_shape=[2, 2], strides=[2, 2])
    x = b.node("Flatten", [x], "/Flatten", axis=1)
    x = b.relu(b.bn(b.gemm(x, "fc", 8, 3), "bnfc", 3), "fcact")
    return b.model("seed_conv", [1, 2, 4, 4], x, [1, 3])


def seed_decoder():
    b = Builder(11)
    w = b.weight("up.weight", (2, 1, 2, 2), 2)
    up = b.node("ConvTranspose", ["input", w], "/up/ConvTranspose", kernel_shape=[2, 2],
                strides=[2, 2], group=2)
    up = b.node("LeakyRelu", [b.bn(up, "upbn", 2)], "/act/LeakyRelu", alpha=0.1)
    x = b.node("AveragePool", [up], "/pool/AveragePool", kernel_shape=[3, 3], strides=[2, 2],
               pads=[1, 1, 1, 1])
    x = b.node("Concat", [x, b.node("Identity", ["input"], "/id/Identity")], "/Concat", axis=1)
    x = b.node("Mul", [x, b.init("k", np.array([0.5], np.float32))], "/Mul")
    x = b.node("Add", [x, x], "/Add")
    x = b.node("GlobalAveragePool", [x], "/gap/GlobalAveragePool")
    x = b.node("Reshape", [x, b.init("shape", np.array([0, -1], np.int64))], "/Reshape")
    x = b.node("MatMul", [x, b.weight("mm", (4, 2), 4)], "/MatMul")
    return b.model("seed_decoder", [1, 2, 2, 2], x, [1, 2], opset=14)


def qdq_reference(out_dir):
    """onnxruntime's output for the QDQ models qfuse wrote (`qfuse quantize`), on the same
    fixed input as the float models: the reference for qfuse's QuantizeLinear /
    DequantizeLinear evaluation."""
    for name in ("mobilenet", "resnet"):
        path = os.path.join(out_dir, name + ".int8.onnx")
        onnx.checker.check_model(onnx.load(path), full_check=True)
        x = load_file(os.path.join(out_dir, name + ".io.safetensors"))["input"]
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        (y,) = sess.run(None, {"input": x})
        save_file({"input": x, "output": y.astype(np.float32)},
                  os.path.join(out_dir, name + ".int8.io.safetensors"))
        print(f"{path}: {os.path.getsize(path)} bytes, output {list(y.shape)}")


def qdq_op(op, in_qp, out_qp, x_shape, **attrs):
    """DequantizeLinear -> op -> QuantizeLinear on int8 codes, per-tensor qparams."""
    inits = [numpy_helper.from_array(np.array(v, t), n) for v, t, n in [
        (in_qp[0], np.float32, "si"), (in_qp[1], np.int8, "zi"),
        (out_qp[0], np.float32, "so"), (out_qp[1], np.int8, "zo")]]
    nodes = [helper.make_node("DequantizeLinear", ["x", "si", "zi"], ["xf"]),
             helper.make_node(op, ["xf"], ["yf"], **attrs),
             helper.make_node("QuantizeLinear", ["yf", "so", "zo"], ["y"])]
    g = helper.make_graph(nodes, op, [helper.make_tensor_value_info("x", TensorProto.INT8,
                                                                    x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.INT8, None)],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    return m.SerializeToString()


def qdq_add(in_a, in_b, out_qp, dtype):
    """DequantizeLinear(a), DequantizeLinear(b) -> Add -> QuantizeLinear on 1-D codes of
    `dtype` (TensorProto.UINT8 or INT8), per-tensor qparams: onnxruntime fuses it into
    QLinearAdd (MLAS)."""
    npdt = np.uint8 if dtype == TensorProto.UINT8 else np.int8
    inits = [numpy_helper.from_array(np.array(v, t), n) for v, t, n in [
        (in_a[0], np.float32, "sa"), (in_a[1], npdt, "za"),
        (in_b[0], np.float32, "sb"), (in_b[1], npdt, "zb"),
        (out_qp[0], np.float32, "so"), (out_qp[1], npdt, "zo")]]
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["af"]),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bf"]),
             helper.make_node("Add", ["af", "bf"], ["yf"]),
             helper.make_node("QuantizeLinear", ["yf", "so", "zo"], ["y"])]
    g = helper.make_graph(nodes, "add", [helper.make_tensor_value_info("a", dtype, [None]),
                                         helper.make_tensor_value_info("b", dtype, [None])],
                          [helper.make_tensor_value_info("y", dtype, None)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m.SerializeToString()


def mlas_add(a, b, in_a, in_b, out_qp, contract=True):
    """MLAS's AVX2 QLinearAdd on stored codes (numpy; float64 holds each fma exactly)."""
    f32 = np.float32
    ra, rb = f32(f32(in_a[0]) / f32(out_qp[0])), f32(f32(in_b[0]) / f32(out_qp[0]))
    za, zb, zo = in_a[1], in_b[1], out_qp[1]
    if contract:
        inner = f32(np.float64(ra) * za + np.float64(f32(rb * f32(zb))))
    else:
        inner = f32(f32(ra * f32(za)) + f32(rb * f32(zb)))
    fixed = f32(f32(zo) - inner)
    t = (b.astype(np.float64) * np.float64(rb) + np.float64(fixed)).astype(f32)
    u = (a.astype(np.float64) * np.float64(ra) + t.astype(np.float64)).astype(f32)
    return np.rint(u).astype(np.int64)


def int_ops(out_dir):
    """onnxruntime's results for the integer ops qfuse's IntModel adds for ONNX graphs, each
    DequantizeLinear -> op -> QuantizeLinear on int8 codes (onnxruntime fuses
    GlobalAveragePool into QLinearGlobalAveragePool): int_ops.safetensors holds, per case K,
    `K.x` (input codes), `K.y` (onnxruntime's output codes), both as float32, and `K.qp`
    ([s_in, z_in, s_out, z_out]; max pooling keeps s_in = s_out)."""
    rng = np.random.default_rng(13)
    out = {}

    def case(key, op, in_qp, out_qp, x, **attrs):
        sess = ort.InferenceSession(qdq_op(op, in_qp, out_qp, list(x.shape), **attrs),
                                    providers=["CPUExecutionProvider"])
        out[key + ".x"] = x.astype(np.float32)
        out[key + ".y"] = sess.run(None, {"x": x})[0].astype(np.float32)
        out[key + ".qp"] = np.array([in_qp[0], in_qp[1], out_qp[0], out_qp[1]], np.float32)

    # Global average pooling: extents 2x2 (many exact ties) and 7x7, odd channel counts.
    for k, (h, si, so) in enumerate([(2, 0.1, 0.05), (7, 0.0371, 0.0213), (3, 0.02, 0.013)]):
        x = rng.integers(-128, 128, (2, 13, h, h)).astype(np.int8)
        case(f"gap{k}", "GlobalAveragePool", (si, -7), (so, 3), x)
    # HardSwish and LeakyRelu: every code through the table.
    codes = np.arange(-128, 128, dtype=np.int8).reshape(1, 256, 1, 1)
    for k, (si, zi, so, zo) in enumerate([(0.05, 0, 0.03, -100), (0.031, -20, 0.022, -80),
                                         (0.1, 10, 0.1, 10)]):
        case(f"hardswish{k}", "HardSwish", (si, zi), (so, zo), codes)
    case("leaky_relu0", "LeakyRelu", (0.05, 3), (0.04, 20), codes, alpha=0.1)
    # Max pooling with padding: same qparams in and out (exact on codes).
    x = rng.integers(-128, 128, (2, 5, 9, 8)).astype(np.int8)
    case("maxpool0", "MaxPool", (0.05, -3), (0.05, -3), x, kernel_shape=[3, 3],
         strides=[2, 2], pads=[1, 1, 1, 1])
    case("maxpool1", "MaxPool", (0.05, -3), (0.05, -3), x, kernel_shape=[3, 2],
         strides=[1, 2], pads=[1, 0, 1, 0])
    # Quantized add (onnxruntime's QLinearAdd, MLAS's AVX2 kernel on x86-64), uint8 and int8
    # codes. Random qparams are tried until, for each type, two settings where onnxruntime
    # differs from the float formula round((s_a (a - z_a) + s_b (b - z_b)) / s_out) + z_out,
    # two where it differs from MLAS without the FMA contraction of its constant and two
    # where it differs from MLAS on the codes stored as the other type are found (every code
    # pair run); each case keeps those pairs plus 256 random ones, as int8 codes (uint8 ones
    # - 128); K.qp = [s_a, z_a, s_b, z_b, s_out, z_out, uint8] with int8 zero points.
    grid = np.arange(256)
    ga, gb = [v.ravel() for v in np.meshgrid(grid, grid, indexing="ij")]
    for dtype in (TensorProto.UINT8, TensorProto.INT8):
        u8 = dtype == TensorProto.UINT8
        off, o2 = (128, 0) if u8 else (0, 128)  # this type's / the other's offset from int8
        lo, hi = (0, 255) if u8 else (-128, 127)
        npdt = np.uint8 if u8 else np.int8
        a, b = ga - 128 + off, gb - 128 + off
        wanted = {"float": 2, "uncontracted": 2, "other": 2}
        k = 0
        for attempt in range(400):
            if not any(wanted.values()):
                break
            sa, sb, so = [float(np.float32(v)) for v in np.exp(rng.uniform(-6, -1, 3))]
            za, zb, zo = [int(z) for z in rng.integers(-128, 128, 3)]
            qa, qb, qo = (sa, za + off), (sb, zb + off), (so, zo + off)
            sess = ort.InferenceSession(qdq_add(qa, qb, qo, dtype),
                                        providers=["CPUExecutionProvider"])
            y = sess.run(None, {"a": a.astype(npdt), "b": b.astype(npdt)})[0].astype(np.int64)
            mlas = np.clip(mlas_add(a, b, qa, qb, qo), lo, hi)
            assert (mlas == y).all(), "onnxruntime is not MLAS's AVX2 QLinearAdd here"
            real = np.float32(sa) * (a - qa[1]).astype(np.float32) \
                + np.float32(sb) * (b - qb[1]).astype(np.float32)
            diffs = {
                "float": np.clip(np.rint(real / np.float32(so)) + qo[1], lo, hi) != y,
                "uncontracted": np.clip(mlas_add(a, b, qa, qb, qo, contract=False), lo, hi) != y,
                "other": np.clip(mlas_add(a - off + o2, b - off + o2, (sa, za + o2),
                                          (sb, zb + o2), (so, zo + o2)) - o2, -128, 127)
                + off != y,
            }
            useful = [w for w in wanted if wanted[w] and diffs[w].any()]
            if not useful:
                continue
            for w in useful:
                wanted[w] -= 1
            pick = diffs["float"] | diffs["uncontracted"] | diffs["other"]
            pick[rng.choice(a.size, 256, replace=False)] = True
            key = f"add{k}_{'uint8' if u8 else 'int8'}"
            k += 1
            out[key + ".a"] = (a[pick] - off).astype(np.float32)
            out[key + ".b"] = (b[pick] - off).astype(np.float32)
            out[key + ".y"] = (y[pick] - off).astype(np.float32)
            out[key + ".qp"] = np.array([sa, za, sb, zb, so, zo, float(u8)], np.float32)
            print(f"{key}: {int(pick.sum())} pairs; onnxruntime differs from "
                  + ", ".join(f"{w} {int(d.sum())}" for w, d in diffs.items()))
        assert not any(wanted.values()), f"no discriminating settings found: {wanted}"
    path = os.path.join(out_dir, "int_ops.safetensors")
    save_file(out, path)
    print(f"{path}: {os.path.getsize(path)} bytes, {len(out) // 3} cases")


def main():
    if sys.argv[1:2] == ["--qdq"]:
        qdq_reference(sys.argv[2])
        return
    if sys.argv[1:2] == ["--int-ops"]:
        int_ops(sys.argv[2])
        return
    if sys.argv[1:2] == ["--fresh"]:
        save_model(fresh(), sys.argv[2])
        return
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "tests/onnx"
    # Calibration data for `qfuse quantize` (8 samples of 3x16x16).
    save_file({"input": np.random.default_rng(7).normal(0, 1, (8, 3, 16, 16)).astype(np.float32)},
              os.path.join(out_dir, "calib.safetensors"))
    if len(sys.argv) > 2:
        # The fuzz target's seeds: tiny models covering every imported op.
        os.makedirs(sys.argv[2], exist_ok=True)
        for fn in (seed_conv, seed_decoder):
            m = fn()
            onnx.save(m, os.path.join(sys.argv[2], m.graph.name + ".onnx"))
    os.makedirs(out_dir, exist_ok=True)
    for fn in (resnet, mobilenet, mnist, decoder, fresh):
        save_model(fn(), out_dir)


def save_model(m, out_dir):
    """NAME.onnx and NAME.io.safetensors (a fixed input, onnxruntime's output)."""
    name = m.graph.name
    path = os.path.join(out_dir, name + ".onnx")
    onnx.save(m, path)
    shape = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(100).normal(0, 1, shape).astype(np.float32)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"input": x})
    save_file({"input": x, "output": y.astype(np.float32)},
              os.path.join(out_dir, name + ".io.safetensors"))
    print(f"{path}: {os.path.getsize(path)} bytes, {len(m.graph.node)} nodes, "
          f"output {list(y.shape)}")


if __name__ == "__main__":
    main()
