"""`load_model`: a name, an open_clip architecture or a run folder -> a built image-text Encoder."""
from __future__ import annotations

from pathlib import Path

from wsi.encoders import create_encoder
from wsi.encoders.registry import REGISTRY, Encoder
from wsi.errors import EncoderError


def is_run_dir(path: str | Path) -> bool:
    """A `clip train` output folder (open_clip_config.json + model.safetensors)."""
    p = Path(path)
    return p.is_dir() and (p / "open_clip_config.json").is_file() and (p / "model.safetensors").is_file()


def model_choices() -> list[str]:
    """The registry's image-text entries (what `--model` accepts besides architectures and run folders)."""
    return [s.name for s in REGISTRY.specs() if s.task == "image-text"]


def encoder_args(model: str, pretrained: str | bool | None = None, *,
                 random_init: bool = False) -> tuple[str, str | None, bool]:
    """`load_model`'s arguments -> (the encoder name `create_encoder` and `wsi embed` take, a local weights
    file or None, pretrained): the one mapping, so a model loaded here and features embedded into a store
    for it (`clip probe`) are the same model. A run folder is `pathoclip:<absolute RUN_DIR>` (features
    cached under it do not depend on the working folder); an open_clip architecture with a tag is
    `open_clip:<arch>@<tag>`, with `hf-hub:<repo>` that name; a registry name stays itself."""
    import open_clip

    from .pathoclip import add_configs

    add_configs()
    if is_run_dir(model):
        return f"pathoclip:{Path(model).resolve()}", None, True
    if Path(model).is_dir():
        raise EncoderError(f"{model}: not a PathoCLIP run folder (needs open_clip_config.json and "
                           "model.safetensors from `clip train`)")
    file = pretrained if isinstance(pretrained, str) and Path(pretrained).is_file() else None
    if model not in REGISTRY and model in open_clip.list_models():
        if random_init or not pretrained:
            return f"open_clip:{model}", None, False
        if file or not isinstance(pretrained, str):
            return f"open_clip:{model}", file, True
        if pretrained.startswith("hf-hub:"):
            return pretrained, None, True
        if pretrained.endswith((".pt", ".bin", ".pth", ".safetensors")) or "/" in pretrained:
            raise EncoderError(f"--pretrained {pretrained}: no such weights file")
        return f"open_clip:{model}@{pretrained}", None, True
    if isinstance(pretrained, str) and not file:
        raise EncoderError(f"--pretrained {pretrained}: no such weights file (for {model!r} pass a local file, or "
                           "nothing for its own weights)")
    return model, file, not random_init   # registry and generic names; unknown ones list the choices


def load_model(model: str, pretrained: str | bool | None = None, *, random_init: bool = False) -> Encoder:
    """Build an image-text model.

    model: a registry name (pathoclip-lite, quiltnet-b-16, plip, conch, ...), an open_clip
        architecture (ViT-B-16, ViT-L-14, ...), a generic encoder name (open_clip:<arch>@<tag>,
        hf-hub:<repo>) or a `clip train` RUN_DIR.
    pretrained: for an architecture, an open_clip tag (`openai`: needs the hub), `hf-hub:<repo>`,
        or a local weights file (safetensors, or a `.pt`/`.bin` state dict read with
        `torch.load(weights_only=True)`); for a registry name, a local weights file replacing its own.
    random_init: random weights (tests, benchmarks)."""
    name, weights, use_pretrained = encoder_args(model, pretrained, random_init=random_init)
    enc = create_encoder(name, pretrained=use_pretrained, weights=weights)
    if enc.task != "image-text":
        raise EncoderError(f"{model!r} is an image encoder without a text tower; PathoCLIP needs an image-text "
                           f"model: {', '.join(model_choices())}, an open_clip architecture or a run folder")
    return enc
