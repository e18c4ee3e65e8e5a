"""Cohorts: many slides, QuPath-style GeoJSON tumor annotations, labels.csv, and (hard cohorts) the
non-tumour regions (inflammation, mimics) in annotations/extra/ and a per-slide record in synth.json."""

from __future__ import annotations

import csv
import json
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .difficulty import PRESETS, SlideSpec, options_doc, resolve
from .writer import DEFAULT_HEIGHT, DEFAULT_MPP, DEFAULT_TILE_SIZE, DEFAULT_WIDTH, _write_slide

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
    extra_annotation_path: Path | None = None  # annotations/extra/<id>.geojson: Inflammation, Mimic (not tumour)
    quality: int = 80  # JPEG quality of the slide's tiles
    info: dict = field(default_factory=dict)  # what was drawn and placed (also in synth.json)


EXTRA_DIR = "extra"  # annotations/extra/: non-tumour regions, out of reach of `wsi labels --annotations annotations/`
_COLOURS = {"Tumor": [200, 0, 0], "Inflammation": [0, 90, 200], "Mimic": [230, 150, 0]}


def _geojson(polygons: list[np.ndarray], names: list[str] | None = None) -> dict:
    names = names or ["Tumor"] * len(polygons)
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [poly.tolist()]},
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": _COLOURS[name]}},
        }
        for poly, name in zip(polygons, names)
    ]
    return {"type": "FeatureCollection", "features": features}


def _write_one(job: dict) -> tuple[list[np.ndarray], list[tuple[str, np.ndarray]], dict]:
    layout = _write_slide(**job)
    return layout.polygons, layout.extra, layout.info


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
    preset: str = "easy",
    **options,
) -> list[SynthSlide]:
    """Write OUT/<slide_id>.svs, OUT/labels.csv (header `slide_id,label`), OUT/annotations/<slide_id>.geojson.

    Exactly ``round(n_slides * positive_fraction)`` slides are "tumor" (at least
    one of each class when n_slides >= 2), each with 1–3 annotated tumor
    regions. Everything is a deterministic function of ``seed``, whatever
    ``workers`` is.

    Difficulty: ``preset`` ("easy", the default, or "hard") sets the options
    below; any of them given as a keyword replaces the preset's value (None:
    keep it). The easy values are the cohort as it always was, byte for byte.

    OPTIONS

    Ground truth: ``annotations/<id>.geojson`` holds the tumour regions only
    (class "Tumor": regions and clusters); inflammation and mimics, which are
    not tumour, go to ``annotations/extra/<id>.geojson`` (classes
    "Inflammation", "Mimic"; written only for slides that have some), a
    subfolder that `wsi labels --annotations OUT/annotations` does not read.
    ``OUT/synth.json`` records the options and, per slide, what was drawn:
    label, JPEG quality, blur, stain factors, tumour textures, tumour /
    inflammation / mimic fractions of tissue, counts.
    """
    difficulty = resolve(preset, **options)
    easy = difficulty == PRESETS["easy"]
    out = Path(out)
    ann_dir = out / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    extra_dir = ann_dir / EXTRA_DIR
    rng = np.random.default_rng(seed)
    n_pos = round(n_slides * positive_fraction)
    if n_slides >= 2:
        n_pos = min(max(n_pos, 1), n_slides - 1)
    positives = set(rng.permutation(n_slides)[:n_pos].tolist())

    jobs = []
    for i in range(n_slides):
        slide_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        n_tumor = int(rng.integers(1, 4)) if i in positives else 0
        # The hard draws come from their own stream, so the easy cohort's draws stay as they were.
        spec = None if easy else SlideSpec.draw(difficulty, np.random.default_rng([seed, i, 1]), i in positives)
        jobs.append(
            dict(
                path=out / f"synth_{i:03d}.svs",
                width=width,
                height=height,
                mpp=mpp,
                tile_size=tile_size,
                n_tumor=n_tumor,
                seed=slide_seed,
                quality=80,
                progress=progress and workers <= 1,
                spec=spec,
            )
        )

    bar = dict(total=n_slides, unit="slide", desc="cohort", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(tqdm(pool.map(_write_one, jobs), **bar))
    else:
        results = [_write_one(job) for job in tqdm(jobs, **bar)]

    slides = []
    for i, (job, (polygons, extra, info)) in enumerate(zip(jobs, results)):
        slide_id = f"synth_{i:03d}"
        ann = ann_dir / f"{slide_id}.geojson"
        extra_ann = extra_dir / f"{slide_id}.geojson"
        tumor = i in positives
        if tumor:
            if not polygons:
                logger.warning("%s is labelled tumor but no tumor region fitted in its tissue", slide_id)
            ann.write_text(json.dumps(_geojson(polygons)))
        else:
            ann.unlink(missing_ok=True)  # stale file from an earlier cohort in the same folder
        if extra:
            extra_dir.mkdir(exist_ok=True)
            extra_ann.write_text(json.dumps(_geojson([p for _, p in extra], [c for c, _ in extra])))
        else:
            extra_ann.unlink(missing_ok=True)
        spec = job["spec"]
        record = {"label": "tumor" if tumor else "normal", "quality": spec.quality if spec else job["quality"],
                  "blur_um": round(spec.blur_um, 4) if spec else 0.0,
                  "stain": [round(x, 4) for x in spec.stain] if spec and spec.stain else None}
        record.update(info)
        slides.append(
            SynthSlide(
                slide_id=slide_id,
                path=job["path"],
                label="tumor" if tumor else "normal",
                width=width,
                height=height,
                mpp=mpp,
                annotation_path=ann if tumor else None,
                extra_annotation_path=extra_ann if extra else None,
                quality=record["quality"],
                info=record,
            )
        )
    if extra_dir.is_dir() and not any(extra_dir.iterdir()):
        extra_dir.rmdir()
    (out / "synth.json").write_text(json.dumps({
        "preset": preset, "options": asdict(difficulty), "seed": seed,
        "width": width, "height": height, "mpp": mpp, "tile_size": tile_size,
        "slides": {s.slide_id: s.info for s in slides}}, indent=1))
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "label"])
        writer.writerows((s.slide_id, s.label) for s in slides)
    logger.info("cohort of %d slides (%d tumor) in %s", n_slides, len(positives), out)
    return slides


if make_cohort.__doc__:  # the options' help lives in one place: difficulty.Difficulty
    make_cohort.__doc__ = make_cohort.__doc__.replace("    OPTIONS", options_doc())
