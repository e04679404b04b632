#!/usr/bin/env python3
"""Issue #3 levers that rewrite the encoder's ONNX graph, measured on both runtimes.

    venv/bin/python benches/encoder_variants.py OUT_DIR
    target/release/scout bench backbone --manifest OUT_DIR/models.toml --runs 7

Writes into OUT_DIR (nothing is committed; the shipped encoder stays as exported):
  fp32.onnx           the shipped encoder, copied
  basic.onnx          onnxruntime's basic graph optimisations (constant folding, redundant
                      nodes, MatMul+Add -> Gemm), standard ONNX ops only, so tract runs it
  qop_matmul.onnx     static int8, QOperator format (QLinearMatMul), MatMul only, per tensor
  qdq_matmul_pc.onnx  static int8, QDQ format, MatMul only, weights per channel
and a manifest for `scout bench backbone`. Calibration: 12 slices of the shared decubitus
series, 7 others for the cosine against fp32 (scout's preprocessing). Prints the cosine and
onnxruntime's median latency (2 threads) of each variant.
Needs onnx, onnxruntime, numpy, pydicom (models/requirements.txt, no torch).
"""
import glob
import hashlib
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))
from preprocess import normalize, read_slice, resize_bilinear  # noqa: E402
ENCODER = ROOT / "models/litemedsam_encoder.onnx"
SERIES = ROOT.parent / "shared/data/dicom/decubitus-t1-sag"


def slice_input(path):
    """As scout feeds the encoder (models/preprocess.py): 1 x 3 x 256 x 256."""
    x = resize_bilinear(normalize(read_slice(path)), 256, 256)
    return np.broadcast_to(x, (1, 3, 256, 256)).copy()


class Calibration(CalibrationDataReader):
    def __init__(self, inputs):
        self.it = iter(inputs)

    def get_next(self):
        x = next(self.it, None)
        return None if x is None else {"image": x}


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(glob.glob(str(SERIES / "*/*.dcm")))
    calibration = [slice_input(f) for f in files[5::12]]
    test = [slice_input(f) for f in files[11::20]]

    shutil.copy(ENCODER, out / "fp32.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(out / "basic.onnx")
    ort.InferenceSession(str(ENCODER), so, providers=["CPUExecutionProvider"])
    quantize_static(str(ENCODER), str(out / "qop_matmul.onnx"), Calibration(calibration),
                    quant_format=QuantFormat.QOperator, op_types_to_quantize=["MatMul"],
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=False)
    quantize_static(str(ENCODER), str(out / "qdq_matmul_pc.onnx"), Calibration(calibration),
                    quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)

    names = ["fp32", "basic", "qop_matmul", "qdq_matmul_pc"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    reference = ort.InferenceSession(str(out / "fp32.onnx"), opts, providers=["CPUExecutionProvider"])
    manifest = [f'default_backbone = "fp32"\n']
    for name in names:
        sess = ort.InferenceSession(str(out / f"{name}.onnx"), opts, providers=["CPUExecutionProvider"])
        cosines = []
        for x in test:
            a = reference.run(None, {"image": x})[0].reshape(256, -1)
            b = sess.run(None, {"image": x})[0].reshape(256, -1)
            cosines.append(float(np.mean(np.sum(a * b, 0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0) + 1e-12))))
        times = []
        for _ in range(7):
            t = time.perf_counter()
            sess.run(None, {"image": test[0]})
            times.append((time.perf_counter() - t) * 1000)
        print(f"{name:15} cosine vs fp32 {min(cosines):.4f}..{max(cosines):.4f}  onnxruntime {statistics.median(times):.0f} ms")
        sha = hashlib.sha256((out / f"{name}.onnx").read_bytes()).hexdigest()
        manifest.append(f'[backbones.{name}]\nfile = "{name}.onnx"\nsha256 = "{sha}"\n'
                        'input_size = [256, 256]\nformat = "feature-map"\nmean = [0.0, 0.0, 0.0]\n'
                        'std = [1.0, 1.0, 1.0]\nsource = "benches/encoder_variants.py"\nlicense = "Apache-2.0 (LICENSE-LiteMedSAM)"\n')
    (out / "models.toml").write_text("\n".join(manifest))


if __name__ == "__main__":
    main()
