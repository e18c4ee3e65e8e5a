"""Builders shared by the families, and the generic forms `timm:`, `hf-hub:`, `open_clip:`, `local:`."""
from __future__ import annotations

import json
from pathlib import Path

from .registry import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, EncoderError, EncoderSpec
from .weights import load_safetensors, require_hub


def build_timm(arch: str, *, hub_id: str | None, pretrained: bool, weights: str | None, gated: bool = False,
               name: str | None = None, **kwargs):
    """A timm model: from the hub (`hf-hub:<hub_id>`), from a local safetensors file, or randomly initialised."""
    import timm

    kwargs.setdefault("num_classes", 0)
    if pretrained and hub_id:
        require_hub(hub_id, gated, name)
        return timm.create_model(f"hf-hub:{hub_id}", pretrained=True, **kwargs)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    return load_safetensors(model, weights) if weights else model


def wrap(inner, forward):
    """An nn.Module computing `forward(inner, x)`; its state dict is `inner`'s."""
    import torch.nn as nn

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return forward(self.inner, x)

    return Wrapped()


def build_open_clip(arch: str, *, hub_id: str | None, pretrained: bool | str, weights: str | None,
                    gated: bool = False, name: str | None = None):
    """The image tower of an open_clip model, returning projected image embeddings."""
    import open_clip

    if pretrained and hub_id:
        require_hub(hub_id, gated, name)
        model = open_clip.create_model(f"hf-hub:{hub_id}")
    elif isinstance(pretrained, str) and pretrained:
        model = open_clip.create_model(arch, pretrained=pretrained)
    else:
        model = open_clip.create_model(arch, pretrained=None)
        if weights:
            load_safetensors(model, weights, strict=False)
    return wrap(model.visual, lambda m, x: m(x))


def build_transformers(auto_cls: str, config, *, hub_id: str | None, pretrained: bool, weights: str | None,
                       pool: str = "cls", gated: bool = False, name: str | None = None, **from_kwargs):
    """A transformers vision model; `pool` = cls (first token), mean (of patch tokens) or embeds (projection)."""
    import transformers

    cls = getattr(transformers, auto_cls)
    if pretrained and hub_id:
        require_hub(hub_id, gated, name)
        inner = cls.from_pretrained(hub_id, trust_remote_code=False, **from_kwargs)
    else:
        inner = cls(config)
        if weights:
            load_safetensors(inner, weights)

    def forward(m, x):
        out = m(pixel_values=x)
        if pool == "embeds":
            return out.image_embeds
        h = out.last_hidden_state
        return h[:, 0] if pool == "cls" else h[:, 1:].mean(1)

    return wrap(inner, forward)


# ---- generic names ---------------------------------------------------------------------------------
def _probe_dim(model, size: int) -> int:
    import torch

    with torch.no_grad():
        return int(model(torch.zeros(1, 3, size, size)).shape[-1])


def build_generic(name: str, pretrained: bool, weights: str | None):
    """(model, spec) for a `timm:`, `hf-hub:`, `open_clip:` or `local:` name, or None for any other name.

    The output size is learnt by running the model once on a blank image."""
    kind, _, rest = name.partition(":")
    if not rest or kind not in _GENERIC:
        return None
    model, meta = _GENERIC[kind](rest, pretrained, weights, name)
    return model, EncoderSpec(name=name, dim=_probe_dim(model, meta["input_size"]), **meta)


def _timm_generic(arch: str, pretrained: bool, weights: str | None, name: str):
    import timm

    hub = None
    if pretrained and not weights:
        cfg = timm.models.get_pretrained_cfg(arch)
        hub = getattr(cfg, "hf_hub_id", None) if cfg else None
        if hub is None:
            raise EncoderError(f"{name}: timm has no hub weights for {arch!r}; pass --weights model.safetensors")
        require_hub(hub, False, name)
    model = timm.create_model(arch, pretrained=bool(hub), num_classes=0)
    if weights:
        load_safetensors(model, weights)
    cfg = model.pretrained_cfg
    meta = {"input_size": int(cfg.get("input_size", (3, 224, 224))[-1]), "mean": tuple(cfg.get("mean", IMAGENET_MEAN)),
            "std": tuple(cfg.get("std", IMAGENET_STD)), "family": "timm", "hub_id": hub, "license": cfg.get("license", "unknown")}
    return model.eval(), meta


def _hub_generic(repo: str, pretrained: bool, weights: str | None, name: str):
    from huggingface_hub import hf_hub_download

    require_hub(repo, False, name)
    try:
        cfg = json.loads(Path(hf_hub_download(repo, "config.json")).read_text())
    except Exception:
        cfg = {}
    if "architecture" in cfg:  # a timm repo
        import timm

        model = timm.create_model(f"hf-hub:{repo}", pretrained=True, num_classes=0)
        pc = model.pretrained_cfg
        return model.eval(), {"input_size": int(pc.get("input_size", (3, 224, 224))[-1]),
                              "mean": tuple(pc.get("mean", IMAGENET_MEAN)), "std": tuple(pc.get("std", IMAGENET_STD)),
                              "family": "timm", "hub_id": repo}
    try:
        hf_hub_download(repo, "open_clip_config.json")
        model = build_open_clip("", hub_id=repo, pretrained=True, weights=None, name=name)
        return model.eval(), {"input_size": 224, "mean": CLIP_MEAN, "std": CLIP_STD, "family": "open_clip", "hub_id": repo}
    except EncoderError:
        raise
    except Exception:
        pass
    model = build_transformers("AutoModel", None, hub_id=repo, pretrained=True, weights=None, name=name)
    size = int(cfg.get("image_size", 224)) if isinstance(cfg.get("image_size", 224), int) else 224
    return model.eval(), {"input_size": size, "family": "transformers", "hub_id": repo}


def _open_clip_generic(rest: str, pretrained: bool, weights: str | None, name: str):
    arch, _, tag = rest.partition("@")
    if tag and not weights:
        import open_clip

        try:
            cfg = open_clip.get_pretrained_cfg(arch, tag)
        except Exception:
            cfg = {}
        if cfg.get("hf_hub"):
            require_hub("/".join(cfg["hf_hub"].strip("/").split("/")[:2]), False, name)  # "org/repo[/file]"
    model = build_open_clip(arch, hub_id=None, pretrained=tag if not weights else False, weights=weights, name=name)
    return model.eval(), {"input_size": 224, "mean": CLIP_MEAN, "std": CLIP_STD, "family": "open_clip",
                          "hub_id": f"open_clip:{rest}"}


def _local_generic(path: str, pretrained: bool, weights: str | None, name: str):
    """A folder with a timm-style config.json (architecture, model_args, pretrained_cfg) and model.safetensors."""
    import timm

    d = Path(path)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise EncoderError(f"{d}: a local encoder folder needs config.json (timm style: architecture, model_args) "
                           "and model.safetensors")
    cfg = json.loads(cfg_path.read_text())
    if "architecture" not in cfg:
        raise EncoderError(f"{cfg_path}: no 'architecture' key; expected a timm-style config")
    model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=0, **cfg.get("model_args", {}))
    load_safetensors(model, weights or d / "model.safetensors")
    pc = cfg.get("pretrained_cfg", {})
    return model.eval(), {"input_size": int(pc.get("input_size", [3, 224, 224])[-1]),
                          "mean": tuple(pc.get("mean", IMAGENET_MEAN)), "std": tuple(pc.get("std", IMAGENET_STD)),
                          "family": "timm", "hub_id": f"local:{d}"}


_GENERIC = {"timm": _timm_generic, "hf-hub": _hub_generic, "open_clip": _open_clip_generic, "local": _local_generic}
