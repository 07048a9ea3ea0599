"""Parity fixtures for `mone import-hf`: tiny random ViViT and VideoMAE video classifiers
saved by HuggingFace transformers, an input and the logits transformers computes for it.

Not run in CI (it needs torch and transformers); the files it writes are committed under
tests/fixtures/hf/. Run: python3 scripts/hf_fixtures.py [OUT_DIR]

Every parameter is drawn with std STD (LayerNorm weights around 1), biases included, so a
wrong GELU variant, token order, bias mapping or epsilon moves the logits by far more than
the 1e-4 the parity test allows.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import (
    VideoMAEConfig,
    VideoMAEForVideoClassification,
    VivitConfig,
    VivitForVideoClassification,
)

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf")
# Large enough that the GELU variant alone moves the logits ~10x past the test's tolerance.
STD = 0.5
LABELS = ["wave", "run", "jump", "sit", "clap"]


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * STD
            is_norm_weight = ("norm" in name) and name.endswith("weight")
            p.copy_(noise + 1.0 if is_norm_weight else noise)


def write(name, model, preprocessor, seed):
    out = os.path.join(OUT, name)
    os.makedirs(out, exist_ok=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor, f, indent=2)
    c = model.config
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((2, c.num_frames, c.num_channels, c.image_size, c.image_size), generator=g)
    with torch.no_grad():
        logits = model(pixel_values=x).logits
    save_file(
        {"pixel_values": x.contiguous(), "logits": logits.contiguous()},
        os.path.join(out, "parity.safetensors"),
    )
    print(name, "logits", logits.numpy().round(4).tolist())


def main():
    torch.manual_seed(0)
    id2label = dict(enumerate(LABELS))
    vivit = VivitConfig(
        image_size=32,
        num_frames=8,
        tubelet_size=[2, 8, 8],
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu_fast",
        layer_norm_eps=1e-6,
        qkv_bias=True,
        initializer_range=STD,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    m = VivitForVideoClassification(vivit)
    randomise(m, 1)
    write(
        "vivit",
        m,
        {
            "image_processor_type": "VivitImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": 36},
            "do_center_crop": True,
            "crop_size": {"height": 32, "width": 32},
            "do_rescale": True,
            "rescale_factor": 1 / 127.5,
            "offset": True,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
        10,
    )
    videomae = VideoMAEConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        num_frames=8,
        tubelet_size=2,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        use_mean_pooling=True,
        initializer_range=STD,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    m = VideoMAEForVideoClassification(videomae)
    randomise(m, 2)
    write(
        "videomae",
        m,
        {
            "image_processor_type": "VideoMAEImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": 32},
            "do_center_crop": True,
            "crop_size": {"height": 32, "width": 32},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225],
        },
        20,
    )


if __name__ == "__main__":
    main()
