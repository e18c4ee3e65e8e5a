"""Cohorts: many slides, QuPath-style GeoJSON tumor annotations and labels.csv."""

from __future__ import annotations

import csv
import json
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .writer import DEFAULT_HEIGHT, DEFAULT_MPP, DEFAULT_TILE_SIZE, DEFAULT_WIDTH, write_slide

logger = logging.getLogger(__name__)


@dataclass
class SynthSlide:
    """One slide of a synthetic cohort."""

    slide_id: str
    path: Path
    label: str  # "tumor" or "normal"
    width: int
    height: int
    mpp: float
    annotation_path: Path | None  # GeoJSON, only for tumor slides


def _geojson(polygons: list[np.ndarray]) -> dict:
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [poly.tolist()]},
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}},
        }
        for poly in polygons
    ]
    return {"type": "FeatureCollection", "features": features}


def _write_one(job: dict) -> list[np.ndarray]:
    return write_slide(**job)


def make_cohort(
    out: str | Path,
    *,
    n_slides: int = 8,
    seed: int = 0,
    width: int = DEFAULT_WIDTH,
    height: int = DEFAULT_HEIGHT,
    mpp: float = DEFAULT_MPP,
    tile_size: int = DEFAULT_TILE_SIZE,
    positive_fraction: float = 0.5,
    workers: int = 1,
    progress: bool = True,
) -> list[SynthSlide]:
    """Write OUT/<slide_id>.svs, OUT/labels.csv (header `slide_id,label`), OUT/annotations/<slide_id>.geojson.

    Exactly ``round(n_slides * positive_fraction)`` slides are "tumor" (at least
    one of each class when n_slides >= 2), each with 1–3 annotated tumor
    regions. Everything is a deterministic function of ``seed``, whatever
    ``workers`` is.
    """
    out = Path(out)
    ann_dir = out / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_pos = round(n_slides * positive_fraction)
    if n_slides >= 2:
        n_pos = min(max(n_pos, 1), n_slides - 1)
    positives = set(rng.permutation(n_slides)[:n_pos].tolist())

    jobs = []
    for i in range(n_slides):
        slide_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        n_tumor = int(rng.integers(1, 4)) if i in positives else 0
        jobs.append(
            dict(
                path=out / f"synth_{i:03d}.svs",
                width=width,
                height=height,
                mpp=mpp,
                tile_size=tile_size,
                n_tumor=n_tumor,
                seed=slide_seed,
                progress=progress and workers <= 1,
            )
        )

    bar = dict(total=n_slides, unit="slide", desc="cohort", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(tqdm(pool.map(_write_one, jobs), **bar))
    else:
        results = [_write_one(job) for job in tqdm(jobs, **bar)]

    slides = []
    for i, (job, polygons) in enumerate(zip(jobs, results)):
        slide_id = f"synth_{i:03d}"
        ann = ann_dir / f"{slide_id}.geojson"
        tumor = i in positives
        if tumor:
            if not polygons:
                logger.warning("%s is labelled tumor but no tumor region fitted in its tissue", slide_id)
            ann.write_text(json.dumps(_geojson(polygons)))
        else:
            ann.unlink(missing_ok=True)  # stale file from an earlier cohort in the same folder
        slides.append(
            SynthSlide(
                slide_id=slide_id,
                path=job["path"],
                label="tumor" if tumor else "normal",
                width=width,
                height=height,
                mpp=mpp,
                annotation_path=ann if tumor else None,
            )
        )
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "label"])
        writer.writerows((s.slide_id, s.label) for s in slides)
    logger.info("cohort of %d slides (%d tumor) in %s", n_slides, len(positives), out)
    return slides
