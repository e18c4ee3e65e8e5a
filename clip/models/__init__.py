"""PathoCLIP's models: every image-text entry of the one encoder registry (`wsi encoders` lists them
with task image-text), pathmil's own open_clip configs (pathoclip-lite, pathoclip-tiny), any open_clip
architecture by name with `--pretrained`, and trained runs (a RUN_DIR from `clip train`).

    enc = load_model("pathoclip-lite")                 # a wsi.encoders.Encoder, task image-text
    enc = load_model("ViT-B-16", pretrained="Patho-CLIP-B.pt")
    enc = load_model("runs/pathoclip")                 # a clip train RUN_DIR (= `pathoclip:runs/pathoclip`)

This module is also the `pathmil.encoders` entry-point plugin: importing it registers the entries, so
`wsi embed --encoder pathoclip-lite` works without wsi importing clip.
"""
from __future__ import annotations

from . import pathoclip  # noqa: F401  (registers pathoclip-lite, pathoclip-tiny)
from .load import encoder_args, is_run_dir, load_model, model_choices

__all__ = ["load_model", "encoder_args", "is_run_dir", "model_choices"]
