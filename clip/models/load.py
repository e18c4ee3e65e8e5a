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


def load_model(model: str, pretrained: str | bool | None = None, *, random_init: bool = False) -> Encoder:
    """Build an image-text model.

    model: a registry name (pathoclip-lite, quiltnet-b-16, plip, conch, ...), an open_clip
        architecture (ViT-B-16, ViT-L-14, ...), a generic encoder name (open_clip:<arch>@<tag>,
        hf-hub:<repo>) or a `clip train` RUN_DIR.
    pretrained: for an architecture, an open_clip tag (`openai`: needs the hub), `hf-hub:<repo>`,
        or a local weights file (safetensors, or a `.pt`/`.bin` state dict read with
        `torch.load(weights_only=True)`); for a registry name, a local weights file replacing its own.
    random_init: random weights (tests, benchmarks)."""
    import open_clip

    from .pathoclip import add_configs

    add_configs()
    if is_run_dir(model):  # an absolute name: features cached in a store under it do not depend on the cwd
        enc = create_encoder(f"pathoclip:{Path(model).resolve()}")
    elif Path(model).exists() and Path(model).is_dir():
        raise EncoderError(f"{model}: not a PathoCLIP run folder (needs open_clip_config.json and "
                           "model.safetensors from `clip train`)")
    elif model in REGISTRY:
        file = pretrained if isinstance(pretrained, str) else None
        if file and not Path(file).is_file():
            raise EncoderError(f"--pretrained {file}: no such weights file (for {model!r} pass a local file, or "
                               "nothing for its own weights)")
        enc = create_encoder(model, pretrained=not random_init, weights=file)
    elif model in open_clip.list_models():
        if random_init or not pretrained:
            enc = create_encoder(f"open_clip:{model}", pretrained=False)
        elif isinstance(pretrained, str) and pretrained.startswith("hf-hub:"):
            enc = create_encoder(pretrained)
        elif isinstance(pretrained, str) and Path(pretrained).is_file():
            enc = create_encoder(f"open_clip:{model}", pretrained=False, weights=pretrained)
        elif isinstance(pretrained, str) and (pretrained.endswith((".pt", ".bin", ".pth", ".safetensors"))
                                              or "/" in pretrained):
            raise EncoderError(f"--pretrained {pretrained}: no such weights file")
        else:
            enc = create_encoder(f"open_clip:{model}@{pretrained}")
    else:
        enc = create_encoder(model, pretrained=not random_init)  # generic names; unknown ones list the choices
    if enc.task != "image-text":
        raise EncoderError(f"{model!r} is an image encoder without a text tower; PathoCLIP needs an image-text "
                           f"model: {', '.join(model_choices())}, an open_clip architecture or a run folder")
    return enc
