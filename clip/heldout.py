"""The slides a `clip train` run learned from, left out of its evaluations.

A RUN_DIR's config.json records the slides of its captions ("data": {"slides": [...]}, training and
validation both: validation chose the best epoch, so it is not held out either); for a run trained
from shards they are read from the shards' per-sample records, for an older run from its captions
CSV. Zero-shot, retrieval
and the probe of a run leave those slides out by default; `include_training=True`
(`--include-training-slides`) keeps them. The result file says which slides were left out
("data": {"training_slides": {"run", "excluded", "included"}}).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

from wsi.errors import PathmilError, RunError

from .checkpoint import CONFIG

PREFIX = "pathoclip:"       # the encoder name of a RUN_DIR (`clip.models.load_model`)


def run_dir_of(model: Any) -> Path | None:
    """The RUN_DIR of a model: a built Encoder of a run, an encoder name `pathoclip:RUN_DIR`, or a
    RUN_DIR path; None for every other model (registry names, architectures: no training slides)."""
    from .models import is_run_dir

    name = getattr(getattr(model, "spec", None), "name", model)
    if not isinstance(name, (str, Path)):
        return None
    name = str(name)
    if name.startswith(PREFIX):
        return Path(name[len(PREFIX):])
    return Path(name).resolve() if is_run_dir(name) else None


def _slides_of_captions(source: str) -> list[str] | None:
    """The slide_id column of a captions CSV (runs whose config.json predates the slides record)."""
    try:
        with open(source, newline="", encoding="utf-8-sig") as f:
            first = f.readline()
            f.seek(0)
            rows = csv.DictReader(f, delimiter="\t" if "\t" in first and "," not in first else ",")
            key = next((c for c in rows.fieldnames or [] if c.strip().lower() == "slide_id"), None)
            return None if key is None else sorted({r[key].strip() for r in rows if (r.get(key) or "").strip()})
    except OSError:
        return None


def _slides_of_shards(source: str) -> list[str] | None:
    """The slide ids in the per-sample .json records of local shards (`clip shards` writes them); only
    the small .json members are read (tarfile seeks past the images). None when a shard is remote or
    a sample has no slide id."""
    import tarfile

    from .shards import shard_urls

    try:
        urls = shard_urls(source)
    except PathmilError:
        return None
    slides: set[str] = set()
    for url in urls:
        if "://" in url or url.startswith("pipe:"):
            return None
        with tarfile.open(url, mode="r:") as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".json"):
                    sid = json.loads(tar.extractfile(m).read()).get("slide_id")
                    if not sid:
                        return None
                    slides.add(str(sid))
    return sorted(slides)


def training_slides(run_dir: str | Path) -> list[str]:
    """The slides RUN_DIR was trained (and validated) on, from its config.json; RunError (one line) when
    the run does not record them."""
    path = Path(run_dir) / CONFIG
    try:
        data = json.loads(path.read_text()).get("data", {})
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: cannot read the run's record ({type(e).__name__}); evaluate another run or pass "
                       "--include-training-slides") from None
    slides = data.get("slides")
    source = data.get("source")
    if slides is None and source and Path(source).is_file() and not source.endswith(".tar"):
        slides = _slides_of_captions(source)
    elif slides is None and source:
        slides = _slides_of_shards(source)
    if slides is None:
        raise RunError(f"{path}: the run does not record which slides it was trained on (its captions or shards "
                       "are gone, or name no slide_id); pass --include-training-slides if you know the slides you "
                       "evaluate on are held out")
    return sorted(str(s) for s in slides)


def leave_out_training(model: Any, slides: Sequence[str], include_training: bool = False
                       ) -> tuple[list[str], dict[str, Any]]:
    """(`slides` less the training slides of `model`'s run, the record for the result file:
    {"run": RUN_DIR or None, "excluded": [...], "included": [training slides kept]})."""
    run = run_dir_of(model)
    if run is None:
        return list(slides), {"run": None, "excluded": [], "included": []}
    trained = set(training_slides(run))
    hit = [s for s in slides if s in trained]
    if include_training:
        return list(slides), {"run": str(run), "excluded": [], "included": hit}
    return [s for s in slides if s not in trained], {"run": str(run), "excluded": hit, "included": []}
