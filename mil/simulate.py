"""Feature-level synthetic cohorts with a margin confounder: slides as bags of encoder-like features.

Each slide is a grid of tiles; every tile has a tissue type and a D-dim feature drawn from that type's
distribution. Features are shaped like a foundation model's: a type mean, variation in a low-rank
type-specific subspace, a little isotropic noise, and a per-slide batch effect (a random shift along a
few shared "stain / scanner" directions). Tissue types:

- normal: `n_normal` types laid out in large regions (a coarse Voronoi of the grid);
- tumour: positive slides only, `tumour_fraction` (0.5-5 %) of the tiles in 1-2 compact clusters,
  one of `n_grades` tumour grades per cluster;
- confounder (inflammation-like): gathers at the tumour margin (a ring of `margin` tiles around each
  tumour cluster) in positive slides, and also occurs, less often and in small patches, in slides of
  both classes: commoner in tumour slides, but not tumour;
- mimic (benign, tumour-like): close to tumour in feature space, patches in slides of both classes.

Tile labels are 1 for tumour, 0 else (`Bag.instance_labels`), coords are the tiles' level-0 corners.
`make_feature_cohort` returns a `mil.cohort.Cohort` held in memory; tests and
`scripts/bench/bench_w2s.py --setting features` train on it. The cohort is what the w2s back-off was measured
on: a bag classifier can reach a high AUC by counting the confounder.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .cohort import Bag, Cohort

NORMAL, TUMOUR, CONFOUNDER, MIMIC = "normal", "tumour", "confounder", "mimic"


@dataclass
class SimConfig:
    """Settings of a feature-level cohort (defaults: the margin-confounder setting, 384-d)."""

    n_slides: int = 96
    dim: int = 384
    grid: tuple[int, int] = (14, 26)        # tiles per side: min, max (slides are grid x grid-ish)
    n_normal: int = 4
    n_grades: int = 2
    tumour_fraction: tuple[float, float] = (0.005, 0.05)
    margin: int = 2                         # ring width in tiles of the confounder around tumour
    margin_prob: float = 0.85               # share of margin tiles that are confounder
    confounder_slides: float = 0.4          # share of slides (either class) with confounder patches
    confounder_patch: tuple[float, float] = (0.01, 0.06)   # their area, as a share of the slide
    mimic_slides: float = 0.5               # share of slides (either class) with a mimic patch
    mimic_patch: tuple[float, float] = (0.005, 0.03)
    type_sep: float = 3.0                   # norm of the distance between type means
    mimic_sep: float = 1.6                  # distance tumour grade -> its mimic
    rank: int = 8                           # within-type variation: rank and scale
    within: float = 0.6
    noise: float = 0.12                     # isotropic noise per dim
    batch_effect: float = 0.8               # norm scale of the per-slide shift
    positive_share: float = 0.5
    # Subtle tumour: each grade a small step (`tumour_shift`, in feature norm) from the common normal type
    # normal0, sharing its variation, instead of a type of its own (None: a type of its own).
    tumour_shift: float | None = None
    common_normal: float | None = None      # share of normal regions of type normal0 (None: uniform)
    confounder_scatter: float = 0.0         # share of every slide's tiles (either class) that is confounder

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def subtle(cls, **overrides) -> "SimConfig":
        """The subtle-tumour setting: tumour a small shift from one common normal type, a confounder in
        about 3 % of every slide's tiles (either class) and dense at tumour margins, tumour 0.5-6 % of a
        positive slide. The bag task is solved by counting the confounder; the tiles are not."""
        base = dict(tumour_shift=0.6, common_normal=0.7, confounder_scatter=0.03, confounder_slides=0.0,
                    margin_prob=0.9, tumour_fraction=(0.005, 0.06), mimic_slides=0.0)
        return cls(**{**base, **overrides})


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.standard_normal((n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class _Tissues:
    """The tissue types' feature distributions (one draw per cohort seed)."""

    def __init__(self, cfg: SimConfig, rng: np.random.Generator):
        d = cfg.dim
        names = [f"{NORMAL}{i}" for i in range(cfg.n_normal)] + [f"{TUMOUR}{g}" for g in range(cfg.n_grades)] \
            + [CONFOUNDER] + [f"{MIMIC}{g}" for g in range(cfg.n_grades)]
        self.names = names
        # Means: distinct types about type_sep apart; each mimic mimic_sep from its tumour grade.
        means = {n: v * cfg.type_sep / np.sqrt(2) for n, v in zip(names, _unit(rng, len(names), d))}
        for g in range(cfg.n_grades):
            means[f"{MIMIC}{g}"] = means[f"{TUMOUR}{g}"] + _unit(rng, 1, d)[0] * cfg.mimic_sep
        self.means = means
        self.loadings = {n: rng.standard_normal((cfg.rank, d)) * cfg.within / np.sqrt(d) for n in names}
        self.stain = _unit(rng, 4, d)
        if cfg.tumour_shift is not None:       # drawn last: cohorts without the knob stay as they were
            steps = _unit(rng, cfg.n_grades, d) * cfg.tumour_shift
            for g in range(cfg.n_grades):
                t, m = f"{TUMOUR}{g}", f"{MIMIC}{g}"
                offset = means[m] - means[t]
                means[t] = means[f"{NORMAL}0"] + steps[g]
                means[m] = means[t] + offset
                self.loadings[t] = self.loadings[f"{NORMAL}0"]
        self.cfg = cfg

    def draw(self, name: str, n: int, rng: np.random.Generator) -> np.ndarray:
        c = self.cfg
        z = rng.standard_normal((n, c.rank))
        return self.means[name] + z @ self.loadings[name] + rng.standard_normal((n, c.dim)) * c.noise


def _blob(rng: np.random.Generator, yx: np.ndarray, free: np.ndarray, size: int) -> np.ndarray:
    """Indices of `size` free tiles nearest to a random free seed tile (a compact patch)."""
    cand = np.flatnonzero(free)
    if size <= 0 or not len(cand):
        return np.zeros(0, np.int64)
    seed = yx[rng.choice(cand)]
    d = np.abs(yx[cand] - seed).sum(1) + rng.uniform(0, 0.5, len(cand))
    return cand[np.argsort(d)[:size]]


def _slide(cfg: SimConfig, tissues: _Tissues, label: int, rng: np.random.Generator):
    h, w = (int(rng.integers(cfg.grid[0], cfg.grid[1] + 1)) for _ in range(2))
    yy, xx = np.mgrid[0:h, 0:w]
    yx = np.stack([yy.ravel(), xx.ravel()], 1)
    n = len(yx)
    # Normal regions: Voronoi cells of a few seeds, each one normal type.
    seeds = yx[rng.choice(n, 5, replace=False)]
    cell = np.abs(yx[:, None] - seeds[None]).sum(-1).argmin(1)
    if cfg.common_normal is None:
        types = [rng.integers(cfg.n_normal) for _ in range(len(seeds))]
    else:
        types = [0 if rng.random() < cfg.common_normal or cfg.n_normal == 1 else rng.integers(1, cfg.n_normal)
                 for _ in range(len(seeds))]
    kinds = np.array([f"{NORMAL}{t}" for t in types], dtype=object)[cell]
    free = np.ones(n, bool)
    if label == 1:
        n_tum = max(2, int(round(rng.uniform(*cfg.tumour_fraction) * n)))
        parts = [n_tum] if n_tum < 6 or rng.random() < 0.5 else [n_tum // 2, n_tum - n_tum // 2]
        for size in parts:
            idx = _blob(rng, yx, free, size)
            kinds[idx] = f"{TUMOUR}{rng.integers(cfg.n_grades)}"
            free[idx] = False
            ring = np.abs(yx[:, None] - yx[idx][None]).max(-1).min(1)   # Chebyshev distance to the cluster
            margin = np.flatnonzero(free & (ring <= cfg.margin) & (rng.random(n) < cfg.margin_prob))
            kinds[margin] = CONFOUNDER
            free[margin] = False
    if cfg.confounder_scatter > 0:
        idx = np.flatnonzero(free & (rng.random(n) < cfg.confounder_scatter))
        kinds[idx], free[idx] = CONFOUNDER, False
    if rng.random() < cfg.confounder_slides:
        idx = _blob(rng, yx, free, max(1, int(round(rng.uniform(*cfg.confounder_patch) * n))))
        kinds[idx], free[idx] = CONFOUNDER, False
    if rng.random() < cfg.mimic_slides:
        idx = _blob(rng, yx, free, max(1, int(round(rng.uniform(*cfg.mimic_patch) * n))))
        kinds[idx], free[idx] = f"{MIMIC}{rng.integers(cfg.n_grades)}", False
    feats = np.empty((n, cfg.dim), np.float32)
    for name in np.unique(kinds):
        sel = np.flatnonzero(kinds == name)
        feats[sel] = tissues.draw(name, len(sel), rng)
    feats += (rng.standard_normal(len(tissues.stain)) * cfg.batch_effect / 2) @ tissues.stain  # batch effect
    inst = np.array([k.startswith(TUMOUR) for k in kinds], np.float32)
    coords = (yx[:, ::-1] * 256).astype(np.int64)   # x, y
    return feats.astype(np.float32), coords, inst, kinds


def make_feature_cohort(cfg: SimConfig | None = None, seed: int = 0, *, with_kinds: bool = False):
    """A cohort of `cfg.n_slides` bags (half positive by default), reproducible from `seed`.
    With `with_kinds`, also the per-slide arrays of tissue-type names (for diagnostics)."""
    cfg = cfg or SimConfig()
    rng = np.random.default_rng(seed)
    tissues = _Tissues(cfg, rng)
    n_pos = int(round(cfg.n_slides * cfg.positive_share))
    labels = np.array([1] * n_pos + [0] * (cfg.n_slides - n_pos))
    rng.shuffle(labels)
    bags, kinds = [], []
    for i, y in enumerate(labels):
        f, c, inst, k = _slide(cfg, tissues, int(y), rng)
        bags.append(Bag(f"sim_{i:03d}", f"sim_{i:03d}", int(y), f, c, inst))
        kinds.append(k)
    cohort = Cohort(bags, ["normal", "tumor"], "tumor", encoder=f"sim{cfg.dim}", source=f"simulate(seed={seed})")
    return (cohort, kinds) if with_kinds else cohort


def kind_of(kinds: np.ndarray) -> np.ndarray:
    """Tissue-type names without the grade / normal-type index (normal, tumour, confounder, mimic)."""
    return np.array([k.rstrip("0123456789") for k in kinds], dtype=object)
