"""Builders shared by the families, and the generic forms `timm:`, `hf-hub:`, `open_clip:`, `local:`.

Each builder takes the entry's `EncoderSpec` (hub id, gated, name) and the architecture, and loads
weights one of three ways: from the hub (a cached snapshot folder, else downloaded by the library),
from a local safetensors file (strictly: a file for another model is an error, never random
weights), or none (random init, for tests and benchmarks).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from .registry import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, EncoderError, EncoderSpec
from .weights import hub_file, hub_snapshot, load_safetensors, read_state_dict, resolve_hub


def build_timm(spec: EncoderSpec, arch: str, *, pretrained: bool, weights: str | None, **kwargs):
    """A timm model: from the hub (`spec.hub_id`), from a local safetensors file, or randomly initialised."""
    import timm

    kwargs.setdefault("num_classes", 0)
    if pretrained and spec.hub_id:
        local = resolve_hub(spec.hub_id, spec.gated, spec.name)
        source = f"local-dir:{local}" if local else f"hf-hub:{spec.hub_id}"
        return timm.create_model(source, pretrained=True, **kwargs)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    return load_safetensors(model, weights, what=arch) if weights else model


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


def _safetensors_keys(path: str | Path) -> list[str]:
    """Tensor names of a weights file (module./model. prefixes dropped), [] when unreadable."""
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return [k.removeprefix("module.").removeprefix("model.") for k in f.keys()]
        except Exception:
            return []
    try:
        return [k.removeprefix("model.") for k in read_state_dict(path)]
    except EncoderError:
        return []


# ---- open_clip -------------------------------------------------------------------------------------
def load_open_clip_weights(model, path: str | Path, what: str) -> bool:
    """Local safetensors weights into an open_clip model, strictly: the whole model's state dict, or the
    image tower's alone (keys without the `visual.` prefix). Returns whether the whole model was loaded."""
    keys = _safetensors_keys(path)  # [] when unreadable: load_safetensors reports it
    whole = any(k.startswith("visual.") for k in keys) or not keys
    load_safetensors(model if whole else model.visual, path, what=what if whole else f"{what} image tower")
    return whole


@contextlib.contextmanager
def _quiet_root_warnings(enabled: bool = True):
    """Silence warnings logged on the root logger (random weights are asked for, not an accident)."""
    import logging

    root = logging.getLogger()
    before = root.level
    if enabled:
        root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(before)


def open_clip_config(source: str) -> dict:
    """{"model_cfg", "preprocess_cfg"} of an open_clip model named as open_clip names it: an
    architecture (its built-in config), `local-dir:<dir>` or `hf-hub:<repo>` (the folder's
    open_clip_config.json). What a trained model's folder must hold to be rebuilt."""
    import open_clip

    kind, _, rest = source.partition(":")
    if kind == "local-dir":
        cfg = json.loads((Path(rest) / "open_clip_config.json").read_text())
    elif kind == "hf-hub":
        from open_clip.factory import _get_hf_config

        cfg = _get_hf_config(rest)
    else:
        cfg = {"model_cfg": open_clip.get_model_config(source)}
    return {"model_cfg": cfg["model_cfg"], "preprocess_cfg": cfg.get("preprocess_cfg", {})}


def open_clip_model(spec: EncoderSpec, arch: str, *, pretrained: bool | str, weights: str | None):
    """An `OpenClipImageText`: from the hub (`spec.hub_id`), a pretrained tag of open_clip, a local
    weights file (safetensors, or a tensors-only `.pt` state dict such as Patho-CLIP's), or random
    weights. `arch` may also be `local-dir:<dir>` (a folder open_clip can load: a PathoCLIP run)."""
    import open_clip

    from .imagetext import OpenClipImageText

    whole = True
    if pretrained and spec.hub_id and isinstance(pretrained, bool):
        local = resolve_hub(spec.hub_id, spec.gated, spec.name)
        source = tokenizer = f"local-dir:{local}" if local else f"hf-hub:{spec.hub_id}"
        model = open_clip.create_model(source)
    else:
        with _quiet_root_warnings(not pretrained):  # open_clip warns on the root logger about random init
            model = open_clip.create_model(arch, pretrained=pretrained or None)
        source = tokenizer = arch
        if weights:
            whole = load_open_clip_weights(model, weights, what=f"open_clip {arch}")
    out = OpenClipImageText(model, lambda: open_clip.get_tokenizer(tokenizer))
    out.without_text = None if whole else f"{weights} holds the image tower only"
    out.open_clip_cfg = open_clip_config(source)
    return out


# ---- transformers ----------------------------------------------------------------------------------
def build_transformers(spec: EncoderSpec, auto_cls: str, config, *, pretrained: bool, weights: str | None,
                       pool: str = "cls", **from_kwargs):
    """A transformers vision model; `pool` = cls (first token), mean (of patch tokens) or embeds (projection)."""
    import transformers

    cls = getattr(transformers, auto_cls)
    if pretrained and spec.hub_id:
        local = resolve_hub(spec.hub_id, spec.gated, spec.name)
        inner = cls.from_pretrained(str(local or spec.hub_id), trust_remote_code=False, **from_kwargs)
    else:
        inner = cls(config)
        if weights:
            load_safetensors(inner, weights, what=f"{auto_cls}")

    def forward(m, x):
        out = m(pixel_values=x)
        if pool == "embeds":
            return out.image_embeds
        h = out.last_hidden_state
        return h[:, 0] if pool == "cls" else h[:, 1:].mean(1)

    return wrap(inner, forward)


def transformers_clip_model(spec: EncoderSpec, config, *, pretrained: bool, weights: str | None):
    """A `TransformersCLIPImageText` (CLIPModel): from the hub, a local safetensors file, or random."""
    import transformers

    from .imagetext import TransformersCLIPImageText

    local, remote, without_text = None, False, None
    if pretrained and spec.hub_id:
        local = resolve_hub(spec.hub_id, spec.gated, spec.name)
        remote = local is None
        inner = transformers.CLIPModel.from_pretrained(str(local or spec.hub_id), trust_remote_code=False)
    else:
        inner = transformers.CLIPModel(config)
        if weights:  # the whole CLIPModel, or its image tower with projection (text keys then stay random)
            text = ("text_model.", "text_projection.", "logit_scale")
            load_safetensors(inner, weights, what="CLIPModel", optional=text)
            if not any(k.startswith(text) for k in _safetensors_keys(weights)):
                without_text = f"{weights} holds the image tower only"

    def tokenizer():  # the hub repo's tokenizer files: from the cache, or downloaded with the model
        src = local or (hub_snapshot(spec.hub_id) if spec.hub_id else None)
        if src is not None and hub_file(src, "tokenizer.json", "vocab.json"):
            return transformers.AutoTokenizer.from_pretrained(str(src))
        if remote:
            return transformers.AutoTokenizer.from_pretrained(spec.hub_id)
        # CLIP's BPE, the one PLIP (and OpenAI's CLIP) use: open_clip ships it, so text works offline
        import open_clip

        n = min(int(inner.config.text_config.max_position_embeddings), 77)
        return open_clip.SimpleTokenizer(context_length=n)

    out = TransformersCLIPImageText(inner, tokenizer)
    out.without_text = without_text
    return out


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


def _timm_meta(model, hub_id: str | None) -> dict:
    pc = model.pretrained_cfg
    return {"input_size": int(pc.get("input_size", (3, 224, 224))[-1]), "mean": tuple(pc.get("mean", IMAGENET_MEAN)),
            "std": tuple(pc.get("std", IMAGENET_STD)), "family": "timm", "hub_id": hub_id,
            "license": pc.get("license", "unknown")}


def _timm_generic(arch: str, pretrained: bool, weights: str | None, name: str):
    import timm

    hub = None
    if pretrained and not weights:
        cfg = timm.models.get_pretrained_cfg(arch)
        hub = getattr(cfg, "hf_hub_id", None) if cfg else None
        if hub is None:
            raise EncoderError(f"{name}: timm has no hub weights for {arch!r}; pass --weights model.safetensors")
    if hub:
        local = resolve_hub(hub, False, name)
        if local is not None:  # the cached file, through timm's own override: no hub call
            file = hub_file(local, "model.safetensors", "pytorch_model.bin")
            model = timm.create_model(arch, pretrained=True, num_classes=0,
                                      pretrained_cfg_overlay={"file": str(file)})
        else:
            model = timm.create_model(arch, pretrained=True, num_classes=0)
    else:
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    if weights:
        load_safetensors(model, weights, what=arch)
    return model.eval(), _timm_meta(model, hub)


def _hub_generic(repo: str, pretrained: bool, weights: str | None, name: str):
    if not pretrained or weights:
        raise EncoderError(f"{name}: an hf-hub: encoder is defined by its hub repo; for random or local weights "
                           "use timm:<arch>, open_clip:<arch> or local:<dir>")
    spec = EncoderSpec(name=name, dim=0, hub_id=repo)
    cached = resolve_hub(repo, False, name)  # a folder with weights; None: not cached, hub reachable
    if cached is None:  # fetch the configs only; each library below downloads the weights it needs
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo, allow_patterns=["*.json", "*.txt", "*.model"]))
    else:
        folder = cached
    cfg_file = hub_file(folder, "config.json")
    cfg = json.loads(cfg_file.read_text()) if cfg_file else {}
    if "architecture" in cfg:  # a timm repo
        import timm

        source = f"local-dir:{cached}" if cached else f"hf-hub:{repo}"
        model = timm.create_model(source, pretrained=True, num_classes=0)
        return model.eval(), _timm_meta(model, repo)
    if hub_file(folder, "open_clip_config.json"):
        model = open_clip_model(spec, "", pretrained=True, weights=None)
        return model.eval(), {"input_size": _open_clip_size(model), "mean": CLIP_MEAN, "std": CLIP_STD,
                              "family": "open_clip", "hub_id": repo, "task": "image-text"}
    if cfg.get("model_type") == "clip":
        model = transformers_clip_model(spec, None, pretrained=True, weights=None)
        size = int(cfg.get("vision_config", {}).get("image_size", 224))
        return model.eval(), {"input_size": size, "mean": CLIP_MEAN, "std": CLIP_STD, "family": "transformers",
                              "hub_id": repo, "task": "image-text"}
    model = build_transformers(spec, "AutoModel", None, pretrained=True, weights=None)
    size = cfg.get("image_size", 224)
    return model.eval(), {"input_size": size if isinstance(size, int) else 224, "family": "transformers",
                          "hub_id": repo}


def _open_clip_size(model) -> int:
    size = getattr(model.inner.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _open_clip_tag_file(arch: str, tag: str, name: str) -> str | None:
    """The cached weights file of open_clip's pretrained tag (None: let open_clip download it)."""
    import open_clip

    try:
        cfg = open_clip.get_pretrained_cfg(arch, tag)
    except Exception:
        cfg = {}
    hub = cfg.get("hf_hub", "")
    if not hub:
        return None
    # open_clip's own convention: "org/repo/file.bin", or "org/repo/" for its default file name
    repo, fname = os.path.split(hub)
    fname = fname or "open_clip_pytorch_model.bin"
    local = resolve_hub(repo, False, name)
    if local is None:
        return None
    stem = fname.rsplit(".", 1)[0]
    file = hub_file(local, f"{stem}.safetensors", fname, "open_clip_model.safetensors")
    if file is None:
        raise EncoderError(f"{name}: {repo} is cached at {local} without the weights file {fname}; "
                           f"download it with `huggingface-cli download {repo} {fname}`")
    return str(file)


def _open_clip_generic(rest: str, pretrained: bool, weights: str | None, name: str):
    arch, _, tag = rest.partition("@")
    if pretrained and not weights and not tag:
        raise EncoderError(f"{name}: no weights named; use open_clip:{arch}@<pretrained tag> (open_clip."
                           f"list_pretrained() lists them), pass --weights model.safetensors, or random weights")
    spec = EncoderSpec(name=name, dim=0, hub_id=f"open_clip:{rest}", family="open_clip", task="image-text")
    chosen: bool | str = False
    if pretrained and tag and not weights:
        chosen = _open_clip_tag_file(arch, tag, name) or tag
    try:
        model = open_clip_model(spec, arch, pretrained=chosen, weights=weights)
    except RuntimeError as e:  # open_clip's "unknown model" / "unknown tag"
        raise EncoderError(f"{name}: {e}") from None
    return model.eval(), {"input_size": _open_clip_size(model), "mean": CLIP_MEAN, "std": CLIP_STD,
                          "family": "open_clip", "hub_id": spec.hub_id, "task": "image-text"}


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
    load_safetensors(model, weights or d / "model.safetensors", what=cfg["architecture"])
    pc = cfg.get("pretrained_cfg", {})
    return model.eval(), {"input_size": int(pc.get("input_size", [3, 224, 224])[-1]),
                          "mean": tuple(pc.get("mean", IMAGENET_MEAN)), "std": tuple(pc.get("std", IMAGENET_STD)),
                          "family": "timm", "hub_id": f"local:{d}"}


def _pathoclip_generic(path: str, pretrained: bool, weights: str | None, name: str):
    """A PathoCLIP run folder (`clip train`): open_clip_config.json + model.safetensors, which plain
    open_clip also loads (`open_clip.create_model("local-dir:RUN_DIR")`)."""
    d = Path(path).expanduser()
    if not (d / "open_clip_config.json").is_file() or not (d / "model.safetensors").is_file():
        raise EncoderError(f"{d}: not a PathoCLIP run folder (needs open_clip_config.json and model.safetensors "
                           "from `clip train`)")
    spec = EncoderSpec(name=name, dim=0, hub_id=f"pathoclip:{d}", family="open_clip", task="image-text")
    model = open_clip_model(spec, f"local-dir:{d.resolve()}", pretrained=False, weights=weights or None)
    pre = model.open_clip_cfg["preprocess_cfg"]
    return model.eval(), {"input_size": _open_clip_size(model), "mean": tuple(pre.get("mean", CLIP_MEAN)),
                          "std": tuple(pre.get("std", CLIP_STD)), "family": "open_clip", "hub_id": spec.hub_id,
                          "task": "image-text"}


_GENERIC = {"pathoclip": _pathoclip_generic, "timm": _timm_generic, "hf-hub": _hub_generic, "open_clip": _open_clip_generic, "local": _local_generic}
