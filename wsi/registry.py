"""The one registry pattern of pathmil, for tile encoders (`wsi.encoders`) and MIL models (`mil.models`).

As timm's `@register_model`: a decorator on a builder records a spec (its metadata, and the builder)
under a name; the modules holding the entries are imported lazily, the first time anyone asks.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

S = TypeVar("S")


class Registry(Generic[S]):
    """Named specs of one kind (`spec_cls(name=..., builder=..., **meta)`), filled by `register`."""

    def __init__(self, kind: str, spec_cls: type[S], load: Callable[[], None], error: type[Exception] = ValueError):
        self.kind, self.spec_cls, self._load, self.error = kind, spec_cls, load, error
        self.entries: dict[str, S] = {}

    def register(self, name: str, **meta) -> Callable:
        """Decorator: record `spec_cls(name=name, builder=<the function>, **meta)`."""
        def wrap(builder: Callable) -> Callable:
            if name in self.entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self.entries[name] = self.spec_cls(name=name, builder=builder, **meta)
            return builder
        return wrap

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self.entries

    def specs(self) -> list[S]:
        """Every entry, sorted by name."""
        self._load()
        return [self.entries[k] for k in sorted(self.entries)]

    def get(self, name: str, hint: str = "") -> S:
        """The spec of `name`; an unknown name raises `error` listing the choices (and `hint`)."""
        self._load()
        if name not in self.entries:
            raise self.error(f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self.entries))}{hint}")
        return self.entries[name]
