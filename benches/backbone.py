#!/usr/bin/env python3
"""Backbone benchmark: tract (through `scout bench backbone`) and onnxruntime on the same
model files, the same slice and the same number of threads, in one run.

    venv/bin/python benches/backbone.py [--scout target/release/scout] [--runs 10]

Needs onnxruntime and numpy (models/requirements.txt). Prints a table and ends with one JSON
line: per-slice latency of each encoder variant in both runtimes, their ratio, the SAM
decoder, and peak RSS of each side.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scout", default=str(ROOT / "target/release/scout"))
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    out = subprocess.run(
        [args.scout, "bench", "backbone", "--runs", str(args.runs), "--threads", str(args.threads),
         "--manifest", str(MODELS / "models.toml"), "--slice", str(MODELS / "testdata/slice.dcm")],
        check=True, capture_output=True, text=True, cwd=ROOT)
    tract = json.loads(out.stdout.strip().splitlines()[-1])

    manifest = tomllib.loads((MODELS / "models.toml").read_text())
    # The exact tensor tract was fed: the reference slice after scout's preprocessing.
    image = np.fromfile(MODELS / "testdata/slice_input.f32", "<f4").reshape(256, 256)
    x = np.broadcast_to(image, (1, 3, 256, 256)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    rows = []
    for f in tract["tract"]:
        entry = manifest["backbones"][f["backbone"]]
        sess = ort.InferenceSession(str(MODELS / entry["file"]), opts, providers=["CPUExecutionProvider"])
        sess.run(None, {"image": x})
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            emb = sess.run(None, {"image": x})[0]
            times.append((time.perf_counter() - t) * 1000)
        ort_ms = statistics.median(times)
        rows.append({"backbone": f["backbone"], "tract_ms": f["median_ms"], "onnxruntime_ms": ort_ms,
                     "ratio": f["median_ms"] / ort_ms,
                     "tract_9_slices_intra_op_ms": f["localizer9_intra_op_ms"],
                     "tract_9_slices_slice_per_thread_ms": f["localizer9_slice_per_thread_ms"]})
    dec = ort.InferenceSession(str(MODELS / manifest["decoders"]["litemedsam"]["file"]), opts,
                               providers=["CPUExecutionProvider"])
    pts = np.array([[[100.0 + 3 * i, 128.0] for i in range(10)]], np.float32)
    lab = np.ones((1, 10), np.float32)
    feeds = {"image_embeddings": emb, "point_coords": pts, "point_labels": lab}
    dec.run(None, feeds)
    dt = []
    for _ in range(max(args.runs, 5)):
        t = time.perf_counter()
        dec.run(None, feeds)
        dt.append((time.perf_counter() - t) * 1000)
    ort_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"{args.threads} threads, median of {args.runs} runs, same slice and files")
    print(f"{'model':<18} {'tract ms':>9} {'ort ms':>9} {'ratio':>6}   9 slices (tract): intra-op / slice-per-thread")
    for r in rows:
        print(f"{r['backbone']:<18} {r['tract_ms']:9.1f} {r['onnxruntime_ms']:9.1f} {r['ratio']:6.2f}   "
              f"{r['tract_9_slices_intra_op_ms']:.0f} / {r['tract_9_slices_slice_per_thread_ms']:.0f} ms")
    dec_ort = statistics.median(dt)
    print(f"{'decoder (10 pts)':<18} {tract['decoder_ms']:9.1f} {dec_ort:9.1f} {tract['decoder_ms'] / dec_ort:6.2f}")
    print(f"peak RSS: tract process {tract['peak_rss_mib']:.0f} MiB, python+onnxruntime {ort_rss:.0f} MiB")
    print(json.dumps({"threads": args.threads, "encoders": rows, "decoder_tract_ms": tract["decoder_ms"],
                      "decoder_onnxruntime_ms": dec_ort, "peak_rss_tract_mib": tract["peak_rss_mib"],
                      "peak_rss_onnxruntime_mib": ort_rss}))


if __name__ == "__main__":
    sys.exit(main())
