"""The inheritance baseline (mil/baseline.py): what it scores, and that `mil train` reports it next to the
student and the attention (metrics.json, the summary table), or skips it with --no-baseline."""
import json

import numpy as np
import pytest

from mil.baseline import inheritance_scores, sample_instances
from mil.cli import main
from mil.cohort import Bag
from mil.metrics import instance_metrics
from mil.simulate import SimConfig, make_feature_cohort
from wsi.store import TileStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Tumour a tissue type of its own (an obvious one), 5-15 % of a positive slide; no confounder, no mimic,
# a small per-slide batch effect (with a large one, 13 training slides are too few not to learn slide identity).
OBVIOUS = SimConfig(n_slides=32, dim=32, grid=(8, 10), tumour_fraction=(0.05, 0.15), margin_prob=0.0,
                    confounder_slides=0.0, mimic_slides=0.0, batch_effect=0.3)


def _auc(bags, scores) -> float:
    return instance_metrics(np.concatenate([b.instance_labels for b in bags]), np.concatenate(scores))["auc"]


def test_baseline_finds_an_obvious_tumour_and_nothing_in_noise():
    cohort = make_feature_cohort(OBVIOUS, seed=3)
    train, test = cohort.bags[:20], cohort.bags[20:]
    scores = inheritance_scores(train, test, seed=0)
    assert [len(s) for s in scores] == [b.n_instances for b in test]
    assert all(((s >= 0) & (s <= 1)).all() for s in scores)
    assert _auc(test, scores) > 0.8
    again = inheritance_scores(train, test[:3], seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(scores, again))      # seeded

    rng = np.random.default_rng(0)
    noise = [Bag(f"n{i}", f"n{i}", i % 2, rng.standard_normal((80, 32)).astype(np.float32), np.zeros((80, 2), np.int64),
                 (rng.random(80) < 0.2).astype(np.float32)) for i in range(24)]
    assert abs(_auc(noise[16:], inheritance_scores(noise[:16], noise[16:], seed=0)) - 0.5) < 0.1

    one_class = [b for b in cohort.bags if b.label == 0]
    assert all(np.isnan(s).all() for s in inheritance_scores(one_class, test[:2]))   # nothing to learn


def test_sample_is_bounded_and_class_balanced():
    cohort = make_feature_cohort(OBVIOUS, seed=3)
    targets = [b.label for b in cohort.bags]
    x, y = sample_instances(cohort.bags, targets, 600, np.random.default_rng(0))
    assert x.shape == (600, 32) and (y == 0).sum() == (y == 1).sum() == 300
    total = sum(b.n_instances for b in cohort.bags)
    x, y = sample_instances(cohort.bags, targets, 10 * total, np.random.default_rng(0))
    assert len(y) == total                                                # all of them, none twice
    assert len(np.unique(x, axis=0)) == total


@pytest.fixture(scope="module")
def sim_store(tmp_path_factory):
    """A store holding the obvious-tumour cohort's features and tile labels, and its labels CSV."""
    root = tmp_path_factory.mktemp("milbaseline")
    store = TileStore.create(root / "sim.zarr")
    for b in make_feature_cohort(OBVIOUS, seed=3).bags:
        view = store.add_slide(b.slide_id, b.coords, target_mpp=0.5, slide_mpp=0.25, patch_size=256,
                               tile_size_level0=512, width=512 * 12, height=512 * 12, source="/nonexistent.svs")
        view.write_features("sim", b.features, {})
        view.write_labels("tumor", b.instance_labels, {})
    (root / "labels.csv").write_text("slide_id,label\n" + "".join(
        f"{b.slide_id},{'tumor' if b.label else 'normal'}\n" for b in make_feature_cohort(OBVIOUS, seed=3).bags))
    return root


@pytest.mark.parametrize("off", [False, True])
def test_mil_train_reports_the_baseline(sim_store, tmp_path, capsys, off):
    run = tmp_path / "run"
    rc = main(["-q", "train", "--store", str(sim_store / "sim.zarr"), "--labels", str(sim_store / "labels.csv"),
               "--encoder", "sim", "--model", "abmil", "--model-kwargs", '{"hidden": 32, "attn_hidden": 16}',
               "--folds", "2", "--epochs", "2", "--min-epochs", "1", "--instance-labels", "tumor", "--out", str(run),
               *(["--no-baseline"] if off else [])])
    assert rc == 0
    out = capsys.readouterr().out
    m = json.loads((run / "metrics.json").read_text())
    header = next(line for line in out.splitlines() if "inst AUC (student)" in line)
    assert "inst AUC (baseline)" in header
    if off:
        assert m["instance_auc_baseline"] is None and m["baseline_seconds"] is None
        assert "inheritance baseline" not in out
        return
    assert len(m["instance_auc_baseline"]["folds"]) == 2 and m["instance_auc_baseline"]["mean"] > 0.8
    assert 0 < m["instance_ap_baseline"]["mean"] <= 1 and m["baseline_seconds"]["mean"] > 0
    assert "inheritance baseline" in out and f"{m['instance_auc_baseline']['mean']:.3f}" in out
    fold = json.loads((run / "fold_0" / "result.json").read_text())
    assert set(fold["instance"]) == {"student", "attention", "baseline"} and fold["instance"]["baseline"]["auc"] > 0.8
