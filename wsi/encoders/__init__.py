"""Tile encoders: one registry, one small file per family.

    from wsi.encoders import create_encoder, list_encoders
    enc = create_encoder("uni")                 # hub weights (cached, or fails at once offline)
    enc = create_encoder("uni", weights="uni.safetensors")   # local weights
    enc = create_encoder("timm:resnet18")       # any timm / hf-hub / open_clip / local model

Each entry's metadata (dim, input size, normalisation, precision, license, gated, hub id) is on its
`@register_encoder` decorator; `wsi encoders` prints them.
"""
from .registry import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, Encoder, EncoderError, EncoderSpec,
                       create_encoder, get_spec, list_encoders, register_encoder)

__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "Encoder", "EncoderError", "EncoderSpec",
           "create_encoder", "get_spec", "list_encoders", "register_encoder"]
