"""Observer export of a ~100M-parameter llava (random weights), in one run: issue 17's benchmark row.

The model: a CLIP vision tower of ViT-S/16's sizes (224 px images, 196 image tokens) and a llama
text model with grouped-query attention (8 query heads, 2 key/value heads, head_dim 64, 12 layers,
32000 tokens). Measured: export wall time and peak RSS (`optimum_observer.export` without
validation, in its own subprocess), ONNX size, and ONNX Runtime latency (median of repeated runs,
2 intra-op threads) of one vision-encoder call on one image and one decode step (batch 1) with a
cache of 128 positions. optimum-onnx 0.1.0 exports no image-text-to-text model, so there is no
legacy column.

    python benchmarks/bench_vision_language.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers

from measure import cache_layout, export_in_subprocess, onnx_size_mb, paired_latency_ms

TASK = "image-text-to-text"
PAST = 128
VISION = dict(
    model_type="clip_vision_model",
    hidden_size=384,
    intermediate_size=1536,
    num_hidden_layers=12,
    num_attention_heads=6,
    image_size=224,
    patch_size=16,
)
TEXT = dict(
    model_type="llama",
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=12,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=32064,
    max_position_embeddings=2048,
)


def save_model(source: Path) -> float:
    """Saves the random llava; returns its parameters in millions."""
    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        vision_config=VISION, text_config=TEXT, image_token_index=32000, vision_feature_layer=-2
    )
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(source)
    return sum(p.numel() for p in model.parameters()) / 1e6


def vision_feeds(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    return {"pixel_values": np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)}


def decode_feeds(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    feeds = {
        "inputs_embeds": np.random.default_rng(0).standard_normal((1, 1, TEXT["hidden_size"]), dtype=np.float32),
        "attention_mask": np.ones((1, PAST + 1), dtype=np.int64),
        "position_ids": np.array([[PAST]], dtype=np.int64),
    }
    for item in session.get_inputs():
        if item.name.startswith("past_key_values."):
            heads, head_size = cache_layout(session, item.name)
            feeds[item.name] = np.zeros((1, heads, PAST, head_size), dtype=np.float32)
    return feeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source, output = Path(tmp) / "llava-100M", Path(tmp) / "onnx"
        parameters = save_model(source)
        export = export_in_subprocess("observer", source, output, TASK)
        vision = paired_latency_ms({"observer": output / "vision_encoder.onnx"}, vision_feeds, args.repeat)
        decode = paired_latency_ms({"observer": output / "decoder_model_merged.onnx"}, decode_feeds, args.repeat)
        rows = [
            ("parameters (M)", parameters),
            ("export wall (s)", export["seconds"]),
            ("export peak RSS (MB)", export["peak_rss_mb"]),
            ("ONNX size (MB)", onnx_size_mb(output)),
            ("vision encoder, 1 image (ms)", vision["observer"]),
            (f"decode step @{PAST} (ms)", decode["observer"]),
        ]
    for label, value in rows:
        print(f"{label:<30} {value:>10.1f}")


if __name__ == "__main__":
    main()
