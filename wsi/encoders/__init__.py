"""Tile encoders: one registry, one small file per family.

    from wsi.encoders import create_encoder, list_encoders
    enc = create_encoder("uni")                 # hub weights (cached, or fails at once offline)
    enc = create_encoder("uni", weights="uni.safetensors")   # local weights, loaded strictly
    enc = create_encoder("timm:resnet18")       # any timm / hf-hub / open_clip / local model

Each entry's metadata (task, dim, input size, normalisation, precision, license, gated, hub id) is on
its `@register_encoder` decorator; `wsi encoders` prints them. Image-text entries (task
"image-text") also offer `encode_image`, `encode_text`, `tokenize` and `logit_scale`
(`wsi.encoders.imagetext`, imported on use: it needs torch, this package does not).
"""
from .registry import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, TASKS, Encoder, EncoderError, EncoderSpec,
                       create_encoder, get_spec, list_encoders, register_encoder)

__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "TASKS", "Encoder", "EncoderError",
           "EncoderSpec", "create_encoder", "get_spec", "list_encoders", "register_encoder"]
