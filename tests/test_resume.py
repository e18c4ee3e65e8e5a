"""A `wsi tile` run killed mid-cohort loses nothing complete and resumes to the same store."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from wsi.store import StoreError, TileStore


def statuses(store: Path) -> dict[str, str]:
    """Each slide's status, read through the store while another process writes it."""
    try:
        st = TileStore.open(store, readonly=True)
    except StoreError:          # not made yet
        return {}
    out = {}
    for sid in st.slide_ids():
        try:
            out[sid] = st.status(sid)
        except StoreError:
            pass
    return out


def all_tiles(view) -> np.ndarray:
    return np.concatenate([t for _, t in view.iter_tiles()])


def tile_cmd(src: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "wsi.cli", "-q", "tile", str(src), "--store", str(store), "--workers", "1",
            "--no-progress"]


def test_kill_mid_run_then_resume(tmp_path, synth_cohort):
    reference = tmp_path / "reference.zarr"
    assert subprocess.run(tile_cmd(synth_cohort, reference), capture_output=True).returncode == 0

    store = tmp_path / "killed.zarr"
    proc = subprocess.Popen(tile_cmd(synth_cohort, store), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    seen: dict[str, str] = {}
    while time.time() < deadline and proc.poll() is None:
        seen = statuses(store)
        if "complete" in seen.values() and "writing" in seen.values():
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "writing" in seen.values(), f"run ended before it could be killed mid-slide: {seen}"

    after_kill = statuses(store)
    done = {k for k, v in after_kill.items() if v == "complete"}
    assert done and len(done) < 5
    ref = TileStore.open(reference, readonly=True)
    killed = TileStore.open(store, readonly=True)
    for sid in done:  # what was complete is complete for real
        np.testing.assert_array_equal(all_tiles(killed[sid]), all_tiles(ref[sid]))

    r = subprocess.run(tile_cmd(synth_cohort, store), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"{5 - len(done)} tiled, {len(done)} skipped (already complete), 0 failed" in r.stdout
    resumed = TileStore.open(store, readonly=True)
    assert set(statuses(store).values()) == {"complete"}
    assert resumed.complete_ids() == ref.slide_ids() == sorted(statuses(store))
    for sid in ref.slide_ids():
        np.testing.assert_array_equal(resumed[sid].coords, ref[sid].coords)
        np.testing.assert_array_equal(all_tiles(resumed[sid]), all_tiles(ref[sid]))
