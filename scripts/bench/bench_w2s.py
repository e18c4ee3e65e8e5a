"""Does weak-to-strong correction work? Each MIL model with and without `--w2s` on `wsi synth` cohorts.

    .venv/bin/python scripts/bench/bench_w2s.py [--seeds 0 1 2] [--slides 32] [--models abmil dsmil]

Per seed: a synthetic cohort (half tumor, 1-3 annotated tumor regions each) is written, tiled at
0.5 µm/px, embedded with EfficientNet-Lite0 (real ImageNet weights) and labelled from its GeoJSON
annotations; cached under .cache/bench/w2s/. Then every model is cross-validated with and without
the correction on the same splits. Reported: bag AUC and instance AUC (the student's scores, and
the attention) as mean ± std over seeds of the per-seed fold means, and the change w2s makes.
Target: w2s raises mean instance AUC by >= 0.05 without lowering bag AUC beyond its seed spread.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def build_cohort(root: Path, seed: int, n_slides: int, size: int, encoder: str) -> Path:
    """Synthetic slides -> tiled, embedded, labelled store (each step skipped when already done)."""
    from wsi.annotations import label_store
    from wsi.cohort import resolve_sources
    from wsi.embed import EmbedConfig, embed_store
    from wsi.pipeline import TilingConfig, tile_cohort
    from wsi.synthetic import make_cohort

    d = root / f"seed{seed}"
    if not (d / "synth" / "labels.csv").exists():
        make_cohort(d / "synth", n_slides=n_slides, seed=seed, width=size, height=size * 3 // 4, workers=2,
                    progress=False)
    store = d / "cohort.zarr"
    tile_cohort(resolve_sources([d / "synth"]), store, TilingConfig(), workers=2, progress=False)
    embed_store(store, EmbedConfig(encoder, batch_size=64), progress=False)
    label_store(store, d / "synth" / "annotations", name="tumor", progress=False)
    return d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--slides", type=int, default=32)
    p.add_argument("--size", type=int, default=8192, help="synthetic slide width in px at 0.25 µm/px")
    p.add_argument("--models", nargs="+", default=["abmil", "clam-sb", "dsmil", "transmil"])
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--encoder", default="efficientnet-lite0")
    p.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench" / "w2s")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import numpy as np
    import torch

    from mil.cohort import load_cohort
    from mil.train import TrainConfig, train_cohort
    from mil.w2s import W2SConfig

    if a.threads:
        torch.set_num_threads(a.threads)
    runs: dict[tuple[str, bool], list[dict]] = {}
    for seed in a.seeds:
        t0 = time.perf_counter()
        d = build_cohort(a.cache, seed, a.slides, a.size, a.encoder)
        cohort = load_cohort(d / "synth" / "labels.csv", store=d / "cohort.zarr", encoder=a.encoder,
                             instance_labels="tumor", progress=False)
        n_inst = sum(len(b.features) for b in cohort.bags)
        pos = sum(float((b.instance_labels > 0.5).sum()) for b in cohort.bags if b.instance_labels is not None)
        print(f"seed {seed}: {len(cohort.bags)} slides, {n_inst} tiles, {pos / n_inst:.1%} tumor tiles "
              f"(cohort ready in {time.perf_counter() - t0:.0f} s)", flush=True)
        for model in a.models:
            for w2s in (False, True):
                t0 = time.perf_counter()
                cfg = TrainConfig(model=model, epochs=a.epochs, folds=a.folds, seed=seed, device="cpu",
                                  w2s=W2SConfig(enabled=w2s))
                out = d / "runs" / f"{model}{'-w2s' if w2s else ''}"
                m = train_cohort(cohort, cfg, out, instance_labels="tumor", progress=False)
                runs.setdefault((model, w2s), []).append(m)
                print(f"  {model:9s} w2s={'yes' if w2s else 'no ':3s} bag AUC {m['bag_auc']['mean']:.3f}  "
                      f"instance AUC student {m['instance_auc']['mean']:.3f} attention "
                      f"{m['instance_auc_attention']['mean']:.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)

    def stat(ms: list[dict], key: str) -> tuple[float, float]:
        v = [m[key]["mean"] for m in ms if m.get(key)]
        return float(np.mean(v)), float(np.std(v))

    print(f"\nmean ± std over seeds {a.seeds} of the per-seed fold means ({a.folds} folds, {a.slides} slides)")
    head = f"{'model':9s} {'w2s':4s} {'bag AUC':>15s} {'inst AUC (student)':>19s} {'inst AUC (attention)':>21s}"
    print(head + "\n" + "-" * len(head))
    table = []
    for model in a.models:
        for w2s in (False, True):
            ms = runs[(model, w2s)]
            b, s, at = stat(ms, "bag_auc"), stat(ms, "instance_auc"), stat(ms, "instance_auc_attention")
            table.append({"model": model, "w2s": w2s, "bag_auc": b, "instance_auc": s, "instance_auc_attention": at,
                          "per_seed": [{k: m[k] for k in ("bag_auc", "instance_auc", "instance_auc_attention")}
                                       for m in ms]})
            print(f"{model:9s} {'yes' if w2s else 'no':4s} {b[0]:7.3f} ± {b[1]:.3f} {s[0]:11.3f} ± {s[1]:.3f} "
                  f"{at[0]:13.3f} ± {at[1]:.3f}")
        base, corr = table[-2], table[-1]
        d_inst = corr["instance_auc"][0] - base["instance_auc"][0]
        d_bag = corr["bag_auc"][0] - base["bag_auc"][0]
        ok = d_inst >= 0.05 and d_bag >= -max(base["bag_auc"][1], corr["bag_auc"][1], 1e-9)
        print(f"{'':9s} w2s: instance AUC {d_inst:+.3f}, bag AUC {d_bag:+.3f}  -> {'meets' if ok else 'misses'} "
              "the target")
    if a.json:
        a.json.write_text(json.dumps({"seeds": a.seeds, "slides": a.slides, "folds": a.folds, "rows": table}, indent=1))


if __name__ == "__main__":
    main()
