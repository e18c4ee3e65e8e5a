"""One registry for MIL models: `@register_model(...)` on a bag-branch builder, `create_model(name, ...)`.

Each model lives in its own file (abmil.py, clam.py, ...) with its metadata on the decorator, the same
pattern as `wsi.encoders.registry`. `create_model` pairs the bag branch with an `InstanceStudent`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from wsi.errors import RunError
from wsi.registry import Registry


@dataclass(frozen=True)
class MILSpec:
    """What a user needs to know about a MIL model, and how to build its bag branch."""

    name: str
    paper: str = ""                # citation
    url: str = ""                  # reference implementation
    license: str = "unknown"       # of the reference code
    description: str = ""
    defaults: dict = field(default_factory=dict)   # bag-branch hyper-parameters create_model accepts
    w2s_filter: bool = True        # may --w2s mask rejected instances out of the bag branch?
    builder: Callable | None = field(default=None, compare=False, repr=False)

    def row(self) -> dict:
        return {"name": self.name, "paper": self.paper, "license": self.license,
                "defaults": ", ".join(f"{k}={v}" for k, v in self.defaults.items())}


def _load_models() -> None:
    # Importing a model module runs its decorator; the list of model files lives only here.
    from . import abmil, clam, dsmil, transmil  # noqa: F401


REGISTRY: Registry[MILSpec] = Registry("MIL model", MILSpec, _load_models, error=RunError)


def register_model(name: str, **meta) -> Callable:
    """Decorator: register `builder(in_dim, n_classes, *, dropout, **defaults) -> bag branch` under
    `name`, with the MILSpec metadata as keywords. The bag branch maps (x (B,N,D), mask (B,N) bool) to
    (bag_logits (B,C), attention (B,N), extras dict) and may define `extra_loss(extras, y) -> Tensor`."""
    return REGISTRY.register(name, **meta)


def list_models() -> list[MILSpec]:
    return REGISTRY.specs()


def get_spec(name: str) -> MILSpec:
    """The spec of a registered model; an unknown name raises RunError (a ValueError) listing the choices."""
    return REGISTRY.get(name)


def create_model(name: str, in_dim: int, n_classes: int, *, student_hidden: int = 256,
                 dropout: float = 0.25, **kwargs):
    """Build model `name` as a DualMIL (bag branch + instance student) for `in_dim` features and
    `n_classes` classes. `kwargs` override the spec's defaults; `dropout` is used by both branches."""
    from .base import DualMIL, InstanceStudent

    spec = get_spec(name)
    unknown = sorted(set(kwargs) - set(spec.defaults))
    if unknown:
        raise RunError(f"MIL model {name!r} has no option(s) {', '.join(unknown)}; "
                         f"it takes: {', '.join(sorted(spec.defaults)) or 'none'} (plus student_hidden, dropout)")
    bag = spec.builder(in_dim, n_classes, dropout=dropout, **{**spec.defaults, **kwargs})
    model = DualMIL(bag, InstanceStudent(in_dim, n_classes, student_hidden, dropout), name=name)
    model.w2s_filter = spec.w2s_filter
    return model
