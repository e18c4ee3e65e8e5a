"""What makes a synthetic cohort hard: the options of `make_cohort` / `wsi synth`, the presets, and the
per-slide draw (`SlideSpec`) they turn into.

The defaults (preset "easy") are the cohort as it always was: one carcinoma texture, 1–3 tumour regions
of 4–12 % of tissue each, a mild per-slide stain scaling, no blur, JPEG quality 80. Every help text lives
in the field metadata here; the docstring of `make_cohort` and the `wsi synth` help are made from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .textures import TUMOR_TEXTURES


def _doc(help: str, metavar: str | None = None) -> dict:
    return {"help": help, **({"metavar": metavar} if metavar else {})}


@dataclass(frozen=True)
class Difficulty:
    """The difficulties of real slides, each off by default (see the module docstring)."""

    tumor_textures: int = field(default=1, metadata=_doc(
        f"how many tumour textures (grades) the cohort uses, 1-{len(TUMOR_TEXTURES)}: the carcinoma crop, then "
        "a high-grade (enlarged dark nuclei), a dense (small crowded cells) and an eosinophilic variant of it", "N"))
    textures_per_slide: int = field(default=1, metadata=_doc(
        "each tumour slide draws 1 to this many of the cohort's tumour textures (one per tumour region)", "N"))
    tumor_fraction: tuple[float, float] | None = field(default=None, metadata=_doc(
        "tumour area of a tumour slide as a fraction of its tissue, drawn uniformly in LO,HI and shared by its "
        "1-3 regions ('none': each region 4-12%% of tissue)", "LO,HI"))
    clusters: tuple[int, int] = field(default=(0, 0), metadata=_doc(
        "isolated tumour-cell clusters (50-200 µm across, a tile or less) per tumour slide, drawn in LO,HI; "
        "annotated as tumour", "LO,HI"))
    mimics: tuple[int, int] = field(default=(0, 0), metadata=_doc(
        "benign tumour mimics per slide of either class, drawn in LO,HI (reactive cells made from the carcinoma "
        "crop, hyperplastic epidermis): NOT tumour, listed as 'Mimic' in annotations/extra/", "LO,HI"))
    inflammation: float = field(default=0.0, metadata=_doc(
        "probability that a tumour region or cluster has a lymphocyte-like inflammatory rim on part of its "
        "margin: NOT tumour, listed as 'Inflammation' in annotations/extra/", "P"))
    inflammation_elsewhere: float = field(default=0.0, metadata=_doc(
        "probability that a slide of either class has 1-2 inflammation patches away from any tumour", "P"))
    stain_jitter: float = field(default=0.0, metadata=_doc(
        "per-slide H&E variation: haematoxylin, eosin and residual optical densities each scaled by a factor "
        "drawn in [1-S, 1+S] (HED space), on top of the mild per-slide scaling every slide has", "S"))
    blur: float = field(default=0.0, metadata=_doc(
        "per-slide scanner blur: Gaussian sigma drawn in [0, B] µm", "B"))
    jpeg_quality: tuple[int, int] = field(default=(80, 80), metadata=_doc(
        "JPEG quality of each written slide, drawn in LO,HI (one number: fixed)", "LO,HI"))

    def __post_init__(self):
        def pair(name, cast):
            v = getattr(self, name)
            v = (v, v) if np.isscalar(v) else tuple(v)
            if len(v) != 2 or v[0] > v[1]:
                raise ValueError(f"{name} must be LO,HI with LO <= HI, got {getattr(self, name)!r}")
            object.__setattr__(self, name, (cast(v[0]), cast(v[1])))

        pair("clusters", int)
        pair("mimics", int)
        pair("jpeg_quality", int)
        if self.tumor_fraction is not None:
            pair("tumor_fraction", float)
            lo, hi = self.tumor_fraction
            if not 0 < lo <= hi <= 0.5:
                raise ValueError(f"tumor_fraction must lie in (0, 0.5], got {self.tumor_fraction}")
        if not 1 <= self.tumor_textures <= len(TUMOR_TEXTURES):
            raise ValueError(f"tumor_textures must be 1-{len(TUMOR_TEXTURES)}, got {self.tumor_textures}")
        if self.textures_per_slide < 1:
            raise ValueError(f"textures_per_slide must be >= 1, got {self.textures_per_slide}")
        if min(self.clusters) < 0 or min(self.mimics) < 0:
            raise ValueError("clusters and mimics must be >= 0")
        for name in ("inflammation", "inflammation_elsewhere"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.stain_jitter < 1:
            raise ValueError(f"stain_jitter must be in [0, 1), got {self.stain_jitter}")
        if self.blur < 0:
            raise ValueError(f"blur must be >= 0 µm, got {self.blur}")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(f"jpeg_quality must be in 1-100, got {self.jpeg_quality}")


PRESETS: dict[str, Difficulty] = {
    "easy": Difficulty(),
    "hard": Difficulty(tumor_textures=len(TUMOR_TEXTURES), textures_per_slide=2, tumor_fraction=(0.005, 0.05),
                       clusters=(0, 3), mimics=(0, 2), inflammation=0.8, inflammation_elsewhere=0.35,
                       stain_jitter=0.25, blur=1.0, jpeg_quality=(60, 95)),
}


def resolve(preset: str = "easy", **options) -> Difficulty:
    """A preset with some of its options replaced (None: the preset's value)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    names = {f.name for f in dataclasses.fields(Difficulty)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"unknown cohort option(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return dataclasses.replace(PRESETS[preset], **{k: v for k, v in options.items() if v is not None})


def _show(v) -> str:
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    return "none" if v is None else str(v)


def options_doc(indent: str = "    ") -> str:
    """One line per option: name, help, easy and hard values (for make_cohort's docstring)."""
    import textwrap

    lines = []
    for f in dataclasses.fields(Difficulty):
        help = f.metadata["help"].replace("%%", "%")
        lines += textwrap.wrap(f"- ``{f.name}`` (easy {_show(getattr(PRESETS['easy'], f.name))}, "
                               f"hard {_show(getattr(PRESETS['hard'], f.name))}): {help}.", 100,
                               initial_indent=indent, subsequent_indent=indent + "  ")
    return "\n".join(lines)


@dataclass
class SlideSpec:
    """One slide's draw from a `Difficulty` (made by `make_cohort`; picklable for worker processes)."""

    seed: int  # for the extra placements (clusters, rims, mimics, patches)
    tumor_textures: tuple[str, ...] = (TUMOR_TEXTURES[0],)
    tumor_fraction: float | None = None
    n_clusters: int = 0
    n_mimics: int = 0
    inflammation: float = 0.0  # probability of a rim per tumour region / cluster
    n_inflammation: int = 0  # patches away from tumour
    stain: tuple[float, float, float] | None = None  # HED density factors
    blur_um: float = 0.0
    quality: int = 80

    @property
    def changes_layout(self) -> bool:
        return (self.tumor_fraction is not None or self.n_clusters > 0 or self.n_mimics > 0
                or self.inflammation > 0 or self.n_inflammation > 0 or len(self.tumor_textures) > 1
                or self.tumor_textures != (TUMOR_TEXTURES[0],))

    @classmethod
    def draw(cls, d: Difficulty, rng: np.random.Generator, tumor: bool) -> SlideSpec:
        seed = int(rng.integers(2**63))
        k = int(rng.integers(1, min(d.textures_per_slide, d.tumor_textures) + 1))
        textures = tuple(str(t) for t in rng.choice(TUMOR_TEXTURES[: d.tumor_textures], size=k, replace=False))
        frac = float(rng.uniform(*d.tumor_fraction)) if d.tumor_fraction is not None else None
        n_clusters = int(rng.integers(d.clusters[0], d.clusters[1] + 1))
        n_mimics = int(rng.integers(d.mimics[0], d.mimics[1] + 1))
        n_inflammation = int(rng.integers(1, 3)) if rng.random() < d.inflammation_elsewhere else 0
        stain = tuple(float(x) for x in rng.uniform(1 - d.stain_jitter, 1 + d.stain_jitter, size=3))
        blur = float(rng.uniform(0, d.blur))
        quality = int(rng.integers(d.jpeg_quality[0], d.jpeg_quality[1] + 1))
        return cls(seed=seed, tumor_textures=textures if tumor else (TUMOR_TEXTURES[0],),
                   tumor_fraction=frac if tumor else None, n_clusters=n_clusters if tumor else 0,
                   n_mimics=n_mimics, inflammation=d.inflammation if tumor else 0.0, n_inflammation=n_inflammation,
                   stain=None if d.stain_jitter == 0 else stain, blur_um=blur, quality=quality)



def _parse(hint, text: str):
    text = text.strip()
    if hint in (int, float):
        return hint(text)
    cast = int if hint == tuple[int, int] else float
    if text.lower() == "none":
        if hint == tuple[int, int]:
            raise ValueError("expected LO,HI")
        return None
    parts = [p for p in text.replace(":", ",").split(",") if p.strip()]
    if len(parts) not in (1, 2):
        raise ValueError(f"expected LO,HI or one number, got {text!r}")
    lo, hi = cast(parts[0]), cast(parts[-1])
    return (lo, hi)


def add_cli_options(parser) -> list[str]:
    """`--preset` and one option per `Difficulty` field (default: the preset's value); returns the field names.

    Help texts come from the field metadata, with each preset's value appended."""
    import argparse
    import typing

    parser.add_argument("--preset", choices=list(PRESETS), default="easy",
                        help="difficulty preset: 'easy' (the default) is the plain cohort; 'hard' turns on all "
                             "of the options below (their preset values are given in each help)")
    hints = typing.get_type_hints(Difficulty)
    names = []
    for f in dataclasses.fields(Difficulty):
        hint = hints[f.name]
        if hint == (tuple[float, float] | None):
            hint = tuple[float, float]

        def convert(text, hint=hint, name=f.name):
            try:
                return _parse(hint, text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None

        convert.__name__ = f.name  # argparse names the type in its error
        text = (f"{f.metadata['help']} (easy: {_show(getattr(PRESETS['easy'], f.name))}; "
                f"hard: {_show(getattr(PRESETS['hard'], f.name))})")
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=convert, default=None,
                            metavar=f.metadata.get("metavar"), help=text)
        names.append(f.name)
    return names
