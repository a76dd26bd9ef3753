#!/usr/bin/env python3
"""Measures issue 13's targets on torchvision's resnet18 and mobilenet_v2 (development tooling:
the models are too big to commit and cargo test does not run Python).

    pip install torch torchvision onnx onnxruntime safetensors numpy
    cargo build --release --example int_model_forward --example tract_run
    python3 tools/torchvision_targets.py [WORKDIR] [--images N] [--backend cpu|gpu]

For each model it

1. builds it with `weights=None`, randomizes every BatchNorm's weight, bias, running mean and
   running variance, and exports it with `torch.onnx.export` (TorchScript exporter, opset 13,
   `training=TrainingMode.PRESERVE` on the eval-mode model: the BatchNormalization nodes are
   kept with their own epsilon; the default EVAL mode would fold them into the convs);
2. runs `qfuse fold MODEL.onnx -o MODEL.fused.onnx` with no flags, timed (import, fold and
   export; wall and CPU seconds, with the host's load average), and checks that it folded
   every BatchNormalization node (resnet18: 20, mobilenet_v2: 52);
3. runs both files in onnxruntime on random images: the largest |folded - original| must be
   <= 1e-4;
4. runs `qfuse quantize MODEL.onnx --calib CALIB --int-model MODEL.DTYPE.int.safetensors
   --activation-dtype DTYPE` for DTYPE int8 and uint8, loads each QDQ model in onnxruntime
   (after onnx.checker), runs it on the test images and compares its output codes
   (round(y / scale) + zero point of the final DequantizeLinear's output) with qfuse's
   integer model's codes (`examples/int_model_forward.rs` on the same images, fed ONNX's
   input codes with `--onnx-input`: `x / scale` where qfuse rounds `x * (1/scale)`; and fed
   qfuse's own): the identical fraction (target >= 99.9%) and the largest step difference;
5. runs the same QDQ file in tract, a Rust engine (`examples/tract_run.rs`, tract-onnx 0.23)
   on the same images and compares its output codes with the integer model's and with
   onnxruntime's the same way.
   With uint8 activations (onnxruntime's own QDQ default) onnxruntime's x86 CPU EP runs its
   integer kernels (QLinearConv, QLinearAdd, QLinearGlobalAveragePool, QGemm); with int8
   activations it runs DequantizeLinear -> float Conv -> QuantizeLinear.

It prints one JSON line per model with every figure it measured.
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper as nh
import torch
import torchvision
from safetensors.numpy import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QFUSE = os.path.join(ROOT, "target", "release", "qfuse")
FORWARD = os.path.join(ROOT, "target", "release", "examples", "int_model_forward")
TRACT = os.path.join(ROOT, "target", "release", "examples", "tract_run")
EXPECTED_BN = {"resnet18": 20, "mobilenet_v2": 52}
SEED = {"resnet18": 0, "mobilenet_v2": 1}


def randomize_bn(model, gen):
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)


def export(name, path, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None).eval()
    randomize_bn(model, gen)
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), path, dynamo=False,
                      opset_version=13, input_names=["input"], output_names=["output"],
                      training=torch.onnx.TrainingMode.PRESERVE)
    m = onnx.load(path)
    return sum(n.op_type == "BatchNormalization" for n in m.graph.node)


def timed(cmd):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}")
    return p.stdout, wall, cpu


def codes_of(y, scale, zp):
    return np.clip(np.round(y / np.float32(scale)) + zp, -128, 127).astype(np.int32)


def compare(ort_codes, im_codes, key, r):
    d = np.abs(ort_codes - im_codes.reshape(ort_codes.shape))
    r[key + "_identical"] = f"{int((d == 0).sum())}/{d.size}"
    r[key + "_identical_fraction"] = float((d == 0).mean())
    r[key + "_max_step"] = int(d.max())


def session(path):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def run_images(sess, images):
    return np.concatenate([sess.run(None, {"input": x[None]})[0] for x in images])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", nargs="?", default="/tmp/qfuse_torchvision")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    w = lambda f: os.path.join(args.workdir, f)
    rng = np.random.default_rng(0)
    images = rng.normal(0, 1, (args.images, 3, 224, 224)).astype(np.float32)
    save_file({"input": images}, w("images.safetensors"))
    calib = rng.normal(0, 1, (args.calib, 3, 224, 224)).astype(np.float32)
    save_file({"input": calib}, w("calib.safetensors"))
    for k, name in enumerate(args.models.split(",")):
        seed = SEED.get(name, k)
        r = {"model": name}
        src = w(f"{name}.onnx")
        r["bn_nodes"] = export(name, src, seed)
        r["onnx_bytes"] = os.path.getsize(src)
        # 2. fold with no flags, timed.
        out, wall, cpu = timed([QFUSE, "fold", src, "-o", w(f"{name}.fused.onnx"),
                                "--backend", args.backend])
        m = re.search(r"\((\d+) BatchNorms folded", out)
        r["folded"] = int(m.group(1)) if m else None
        r["fold_wall_s"], r["fold_cpu_s"] = round(wall, 3), round(cpu, 3)
        r["load_avg"] = os.getloadavg()
        r["all_folded"] = r["folded"] == r["bn_nodes"] == EXPECTED_BN.get(name, r["bn_nodes"])
        # 3. folded vs original in onnxruntime.
        a = run_images(session(src), images)
        b = run_images(session(w(f"{name}.fused.onnx")), images)
        r["fold_max_abs_diff"] = float(np.abs(a - b).max())
        r["output_max_abs"] = float(np.abs(a).max())
        # 4. quantize: QDQ in onnxruntime vs qfuse's integer model, with int8 activations
        # (onnxruntime's x86 CPU EP runs DequantizeLinear -> float op -> QuantizeLinear) and
        # with uint8 activations (--activation-dtype uint8: its integer kernels).
        for dtype in ("int8", "uint8"):
            qdq, im = w(f"{name}.{dtype}.onnx"), w(f"{name}.{dtype}.int.safetensors")
            out, wall, cpu = timed([QFUSE, "quantize", src, "--calib", w("calib.safetensors"),
                                    "--batch", "1", "--int-model", im, "-o", qdq,
                                    "--activation-dtype", dtype, "--backend", args.backend])
            r[f"quantize_{dtype}_wall_s"], r[f"quantize_{dtype}_cpu_s"] = round(wall, 3), round(cpu, 3)
            onnx.checker.check_model(onnx.load(qdq), full_check=True)
            y = run_images(session(qdq), images)
            r[f"qdq_{dtype}_vs_float_max_abs_diff"] = float(np.abs(y - a).max())
            codes = {}
            for flag in ("", "--onnx-input"):
                out = w(f"{name}.{dtype}.codes{flag}.safetensors")
                subprocess.run([FORWARD, im, w("images.safetensors"), out, args.backend]
                               + ([flag] if flag else []), check=True, capture_output=True)
                codes[flag] = load_file(out)
            c = codes[""]
            scale, zp = float(c["scale"][0]), int(c["zero_point"][0])
            r[f"int_{dtype}_forward_s"] = float(c["seconds"][0])
            # The integer model fed ONNX's input codes (x / s, where qfuse's quantize rounds
            # x * (1/s)) vs onnxruntime on the QDQ model; and fed qfuse's own input codes.
            ci = codes["--onnx-input"]["codes"].astype(np.int32)
            compare(codes_of(y, scale, zp), ci, f"int_vs_qdq_{dtype}", r)
            compare(codes_of(y, scale, zp), c["codes"].astype(np.int32),
                    f"int_qfuse_input_vs_qdq_{dtype}", r)
            # 5. tract (Rust) on the same QDQ file and images.
            out = w(f"{name}.{dtype}.tract.safetensors")
            _, wall, _ = timed([TRACT, qdq, w("images.safetensors"), out])
            t = load_file(out)
            yt = t["output"].reshape(y.shape)
            r[f"tract_{dtype}_load_s"], r[f"tract_{dtype}_run_s"] = (
                round(float(t["seconds"][0]), 3), round(float(t["seconds"][1]), 3))
            compare(codes_of(yt, scale, zp), ci, f"int_vs_tract_{dtype}", r)
            compare(codes_of(yt, scale, zp), c["codes"].astype(np.int32),
                    f"int_qfuse_input_vs_tract_{dtype}", r)
            compare(codes_of(yt, scale, zp), codes_of(y, scale, zp), f"tract_vs_ort_{dtype}", r)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
