"""One registry for tile encoders: `@register_encoder(...)` on a builder, `create_encoder(name)` to get one.

Named entries live one family per file (uni.py, virchow.py, ...), their metadata on the decorator,
as timm's `@register_model` and LazySlide do; the builder receives that spec, so a hub id or a name
is written once per entry. Generic names are parsed here: `timm:<arch>`, `hf-hub:<repo>`,
`open_clip:<arch>[@<pretrained>]`, `local:<dir>`.

Every entry has a `task`:
- "image": `encoder(preprocessed images) -> (B, dim)` features, what `wsi embed` stores.
- "image-text": the same features, plus the image-text protocol of `wsi.encoders.imagetext`:
  `encode_image(x)`, `encode_text(tokens)`, `tokenize(texts)` and `logit_scale`, embeddings in
  the shared image-text space (zero-shot classification, retrieval). QuiltNet, PLIP, CONCH and any
  open_clip or CLIP model offer it; PathoCLIP (`clip/`) implements the same protocol, so a trained
  PathoCLIP is an encoder for `wsi embed` as well.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Callable

from ..errors import EncoderError
from ..registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TASKS = ("image", "image-text")


@dataclass(frozen=True)
class EncoderSpec:
    """What a user and the embedder need to know about an encoder."""

    name: str
    dim: int                       # output feature size
    input_size: int = 224          # side of the image the model sees
    resize: int | None = None      # resize tiles to this side first, then center-crop input_size (None: resize to input_size)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    precision: str = "bf16"        # preferred on an accelerator: bf16 | fp16 | fp32 (CPU always runs fp32)
    license: str = "unknown"
    gated: bool = False            # the hub repo needs an accepted access request and HF_TOKEN
    hub_id: str | None = None      # where pretrained weights come from
    family: str = "timm"           # timm | transformers | open_clip | conch
    task: str = "image"            # image | image-text (also encodes text: see wsi.encoders.imagetext)
    requires: str | None = None    # extra package needed to build it
    train: dict | None = field(default=None, compare=False)  # `clip train` defaults (trainable image-text models)
    description: str = ""
    builder: Callable | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"encoder {self.name!r}: task must be one of {TASKS}, got {self.task!r}")

    def row(self) -> dict:
        return {"name": self.name, "task": self.task, "dim": self.dim, "input": self.input_size,
                "precision": self.precision, "license": self.license, "gated": self.gated,
                "hub_id": self.hub_id or "-", "family": self.family}


PLUGIN_GROUP = "pathmil.encoders"
_plugins_loaded: list[bool] = []


def _load_families() -> None:
    # Importing a family module runs its decorators; the list of families lives only here.
    from . import conch, efficientnet, gigapath, hoptimus, phikon, plip, quilt, resnet, uni, virchow  # noqa: F401

    if not _plugins_loaded:  # packages above wsi (clip: PathoCLIP) add entries as entry-point plugins,
        _plugins_loaded.append(True)  # so wsi never imports them by name
        from importlib.metadata import entry_points

        for ep in entry_points(group=PLUGIN_GROUP):
            try:
                ep.load()
            except Exception as e:  # a broken or shadowed plugin must not take the built-in encoders down
                import logging
                import sys

                why = f"{type(e).__name__}: {e}"
                top = sys.modules.get(ep.value.split(".")[0])
                if top is not None and not getattr(top, "PATHMIL", False):  # OpenAI's `clip` shadows pathmil's
                    why = (f"the `{top.__name__}` package at {getattr(top, '__file__', '?')} is not pathmil's "
                           "(openai-clip / clip-anytorch install a top-level `clip` too); uninstall it")
                logging.getLogger(__name__).warning("encoder plugin %s (%s) not loaded: %s", ep.name, ep.value, why)


REGISTRY: Registry[EncoderSpec] = Registry("encoder", EncoderSpec, _load_families, EncoderError)


def register_encoder(name: str, **meta) -> Callable:
    """Decorator: register `builder(spec: EncoderSpec, pretrained: bool, weights: str | None) -> nn.Module`
    under `name`, with the EncoderSpec metadata (dim, hub_id, task, ...) as keywords; the builder
    reads them from `spec`. The module maps normalised images (B, 3, S, S) to features (B, dim); for
    task="image-text" it is an `imagetext.ImageTextModel`."""
    return REGISTRY.register(name, **meta)


def list_encoders() -> list[EncoderSpec]:
    return REGISTRY.specs()


def get_spec(name: str) -> EncoderSpec:
    """The registered spec of a named encoder (generic names have theirs once built)."""
    return REGISTRY.get(name, hint=", or timm:<arch>, hf-hub:<repo>, open_clip:<arch>[@<pretrained>], local:<dir>")


class Encoder:
    """A built encoder: the module, its spec, and the batch preprocessing it expects. Image-text
    encoders also offer `encode_image`, `encode_text`, `tokenize` and `logit_scale`."""

    def __init__(self, model, spec: EncoderSpec, weights: str):
        self.model, self.spec, self.weights = model.eval(), spec, weights
        from .imagetext import ImageTextModel

        if (spec.task == "image-text") != isinstance(model, ImageTextModel):
            raise EncoderError(f"encoder {spec.name!r}: its builder returned a {type(model).__name__} "
                               f"for task {spec.task!r}")

    @property
    def task(self) -> str:
        return self.spec.task

    def _image_text(self):
        if self.spec.task != "image-text":
            raise EncoderError(f"encoder {self.spec.name!r} is an image model (task 'image'): it has no text "
                               "tower; use an image-text encoder (`wsi encoders` lists each one's task)")
        return self.model

    def encode_image(self, images, normalize: bool = True):
        """Preprocessed images (B, 3, S, S) -> (B, E) embeddings in the shared image-text space."""
        return self._image_text().encode_image(images, normalize=normalize)

    def encode_text(self, tokens, normalize: bool = True):
        """Token ids from `tokenize` -> (B, E) embeddings in the shared image-text space."""
        return self._image_text().encode_text(tokens, normalize=normalize)

    def tokenize(self, texts):
        """A list of strings -> a LongTensor of token ids (B, context length)."""
        return self._image_text().tokenize(list(texts))

    @property
    def logit_scale(self):
        """exp(learnt temperature): logits = logit_scale * image @ text.T on normalised embeddings."""
        return self._image_text().logit_scale

    def preprocess(self, tiles):
        """uint8 tiles (B, H, W, 3) on any device -> normalised float (B, 3, S, S), on that device."""
        import torch
        import torch.nn.functional as F

        s = self.spec
        x = tiles.permute(0, 3, 1, 2).float().div_(255)
        size = s.resize or s.input_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if s.resize and s.resize != s.input_size:
            o = (s.resize - s.input_size) // 2
            x = x[..., o:o + s.input_size, o:o + s.input_size]
        mean = torch.tensor(s.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(s.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def __call__(self, x):
        return self.model(x)

    def transform_attrs(self) -> dict:
        s = self.spec
        return {"input_size": s.input_size, "resize": s.resize or s.input_size, "center_crop": s.input_size,
                "interpolation": "bilinear-antialias", "mean": list(s.mean), "std": list(s.std)}

    def digest(self) -> str:
        """A short fingerprint of the parameters (a sample of every tensor), cheap even for ViT-g."""
        h = hashlib.sha256()
        for k, v in self.model.state_dict().items():
            flat = v.detach().reshape(-1)
            sample = flat[:64].float().cpu().numpy().tobytes() + flat[-64:].float().cpu().numpy().tobytes()
            h.update(k.encode() + str(tuple(v.shape)).encode() + sample)
        return h.hexdigest()[:16]


def create_encoder(name: str, *, pretrained: bool = True, weights: str | None = None) -> Encoder:
    """Build encoder `name`. `weights`: a local safetensors file (or hub-style folder) to load instead of
    the hub; `pretrained=False` gives random weights from the architecture config (for tests)."""
    from .generic import build_generic

    if name not in REGISTRY:
        built = build_generic(name, pretrained, weights)
        if built is None:
            get_spec(name)  # raises with the list of valid names
        model, spec = built
        return Encoder(model, spec, weights or (spec.hub_id if pretrained else "random-init"))
    spec = REGISTRY.get(name)
    if spec.requires:
        import importlib.util

        if importlib.util.find_spec(spec.requires) is None:
            raise EncoderError(f"encoder {name!r} needs the '{spec.requires}' package; install it first "
                               f"({spec.description})")
    builder, spec = spec.builder, replace(spec, builder=None)
    model = builder(spec, pretrained=pretrained and weights is None, weights=weights)
    source = weights or (spec.hub_id if pretrained else "random-init")
    return Encoder(model, spec, source)
