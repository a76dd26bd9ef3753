#!/usr/bin/env python3
"""Generates the ONNX test models of tests/onnx/ (development tooling only; cargo test does not
run Python).

    pip install onnx onnxruntime safetensors numpy
    python3 tools/gen_onnx.py tests/onnx fuzz/seeds/onnx
    for m in mobilenet resnet; do
        cargo run --release -- quantize tests/onnx/$m.onnx --calib tests/onnx/calib.safetensors \
            --backend cpu -o tests/onnx/$m.int8.onnx
    done
    python3 tools/gen_onnx.py --qdq tests/onnx

PyTorch is not needed: the graphs are built with onnx.helper, node for node as
torch.onnx.export writes them for the equivalent nn.Modules (eval mode, BatchNorm kept,
opset 13, 14 for HardSwish, initializers named by the module's state-dict keys, nodes named /module/Op), with
random weights and randomized BatchNorm statistics. For each model NAME it writes

  NAME.onnx            the model (each < 1 MB)
  NAME.io.safetensors  a fixed input (`input`) and onnxruntime's outputs for it (`output`)

and calib.safetensors (calibration inputs for `qfuse quantize`); with --qdq, onnxruntime's
outputs for the QDQ models `qfuse quantize` wrote (NAME.int8.io.safetensors) (and, with a second folder, the fuzz target's seeds: two tiny models covering every imported
op) so that the Rust tests compare qfuse's evaluation with a real runtime without Python.
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
"""

import os
import sys

import numpy as np
import onnx
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


def resnet():
    b = Builder(1)
    x = b.relu(b.bn(b.conv("input", "conv1", 3, 8, 3, pad=1), "bn1", 8), "relu")
    x = b.node("MaxPool", [x], "/maxpool/MaxPool", kernel_shape=[3, 3], strides=[2, 2],
               pads=[1, 1, 1, 1])
    # layer1.0: basic block, identity shortcut.
    y = b.relu(b.bn(b.conv(x, "layer1.0.conv1", 8, 8, 3, pad=1), "layer1.0.bn1", 8), "layer1.0.relu")
    y = b.bn(b.conv(y, "layer1.0.conv2", 8, 8, 3, pad=1), "layer1.0.bn2", 8)
    x = b.node("Relu", [b.node("Add", [y, x], "/layer1.0/Add")], "/layer1.0/relu_1/Relu")
    # layer2.0: strided block, 1x1 conv + bn shortcut.
    y = b.relu(b.bn(b.conv(x, "layer2.0.conv1", 8, 16, 3, stride=2, pad=1), "layer2.0.bn1", 16),
               "layer2.0.relu")
    y = b.bn(b.conv(y, "layer2.0.conv2", 16, 16, 3, pad=1), "layer2.0.bn2", 16)
    s = b.bn(b.conv(x, "layer2.0.downsample.0", 8, 16, 1, stride=2), "layer2.0.downsample.1", 16)
    x = b.node("Relu", [b.node("Add", [y, s], "/layer2.0/Add")], "/layer2.0/relu_1/Relu")
    x = b.node("GlobalAveragePool", [x], "/avgpool/GlobalAveragePool")
    x = b.node("Flatten", [x], "/Flatten", axis=1)
    x = b.gemm(x, "fc", 16, 10)
    return b.model("resnet", [1, 3, 16, 16], x, [1, 10])


def mobilenet():
    b = Builder(2)
    x = b.relu6(b.bn(b.conv("input", "features.0.0", 3, 8, 3, stride=2, pad=1),
                     "features.0.1", 8, eps=1e-3), "features.0.2")
    # features.1: depthwise + linear bottleneck.
    x = b.relu6(b.bn(b.conv(x, "features.1.conv.0.0", 8, 8, 3, pad=1, group=8),
                     "features.1.conv.0.1", 8), "features.1.conv.0.2")
    x = b.bn(b.conv(x, "features.1.conv.1", 8, 16, 1), "features.1.conv.2", 16, eps=1e-3)
    # features.2: inverted residual with Add.
    y = b.relu6(b.bn(b.conv(x, "features.2.conv.0.0", 16, 32, 1), "features.2.conv.0.1", 32),
                "features.2.conv.0.2")
    y = b.relu6(b.bn(b.conv(y, "features.2.conv.1.0", 32, 32, 3, pad=1, group=32),
                     "features.2.conv.1.1", 32, eps=1e-3), "features.2.conv.1.2")
    y = b.bn(b.conv(y, "features.2.conv.2", 32, 16, 1), "features.2.conv.3", 16)
    x = b.node("Add", [x, y], "/features.2/Add")
    # features.3: conv-bn-hardswish (MobileNetV3's last conv).
    x = b.node("HardSwish", [b.bn(b.conv(x, "features.3.0", 16, 32, 1), "features.3.1", 32,
                                  eps=1e-3)], "/features.3.2/HardSwish")
    x = b.node("GlobalAveragePool", [x], "/avgpool/GlobalAveragePool")
    x = b.node("Flatten", [x], "/Flatten", axis=1)
    # classifier: linear-bn1d-relu, then the linear head.
    x = b.relu(b.bn(b.gemm(x, "classifier.0", 32, 24), "classifier.1", 24), "classifier.2")
    x = b.gemm(x, "classifier.3", 24, 10)
    return b.model("mobilenet", [2, 3, 16, 16], x, [2, 10], opset=14)  # HardSwish: 14


def mnist():
    b = Builder(3)
    x = b.relu6(b.bn(b.conv("input", "conv1", 1, 20, 5, bias=True), "batchnorm1", 20), "relu1")
    x = b.node("MaxPool", [x], "/max_pool1/MaxPool", kernel_shape=[2, 2], strides=[2, 2])
    x = b.relu6(b.conv(x, "conv2", 20, 50, 5, bias=True), "relu2")
    x = b.node("MaxPool", [x], "/max_pool2/MaxPool", kernel_shape=[2, 2], strides=[2, 2])
    shape = b.init("/Constant_output_0", np.array([-1, 800], np.int64))
    x = b.node("Reshape", [x, shape], "/Reshape")
    x = b.relu6(b.gemm(x, "fc1", 800, 64), "relu3")
    x = b.gemm(x, "fc2", 64, 10)
    return b.model("mnist", [2, 1, 28, 28], x, [2, 10])


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


def main():
    if sys.argv[1:2] == ["--qdq"]:
        qdq_reference(sys.argv[2])
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
    for fn in (resnet, mobilenet, mnist, decoder):
        m = fn()
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
