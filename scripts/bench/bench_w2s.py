"""Does weak-to-strong correction work? Each MIL model with and without `--w2s`, on three settings.

    .venv/bin/python scripts/bench/bench_w2s.py [--setting synth|hard-synth|features] [--seeds 0 1 2] [--models abmil]

--setting synth (default): per seed, a `wsi synth` cohort (half tumor, 1-3 annotated tumor regions
each) is written, tiled at 0.5 µm/px, embedded with EfficientNet-Lite0 (real ImageNet weights) and
labelled from its GeoJSON annotations; cached under .cache/bench/w2s/.
--setting hard-synth: 48 slides of 16384 px with `wsi synth --preset hard` (tumour grades, benign mimics, margin
inflammation, small tumour fractions, stain / blur / JPEG variation); cached under
.cache/bench/w2s/hard/.
--setting features: per seed, a feature-level cohort with a margin confounder (mil/simulate.py:
384-d features, several normal types, tumour in 0.5-5 % of a positive slide's tiles, an
inflammation-like confounder at the tumour margin that also occurs in normal slides, benign mimics
in both classes, a per-slide batch effect); defaults 48 slides of ~200 tiles, 3 folds, 20 epochs. `--diagnose`
also prints, for ABMIL on the first seed's first fold, the student's mean score, the attention and
the share kept by the filter per tissue type (the mechanism of issue 9).

Every model is cross-validated with and without the correction on the same splits. Reported: bag
AUC and instance AUC (the student's scores, and the attention) as mean ± std over seeds of the
per-seed fold means, the change w2s makes, and how many folds backed off the feedback.
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


def build_cohort(root: Path, seed: int, n_slides: int, size: int, encoder: str, preset: str = "easy",
                 workers: int = 2) -> Path:
    """Synthetic slides -> tiled, embedded, labelled store (each step skipped when already done)."""
    from wsi.annotations import label_store
    from wsi.cohort import resolve_sources
    from wsi.embed import EmbedConfig, embed_store
    from wsi.pipeline import TilingConfig, tile_cohort
    from wsi.synthetic import make_cohort

    d = root / (f"seed{seed}" if preset == "easy" else f"{preset}/seed{seed}")
    if not (d / "synth" / "labels.csv").exists():
        make_cohort(d / "synth", n_slides=n_slides, seed=seed, width=size, height=size * 3 // 4, workers=workers,
                    progress=False, preset=preset)
    store = d / "cohort.zarr"
    tile_cohort(resolve_sources([d / "synth"]), store, TilingConfig(), workers=workers, progress=False)
    embed_store(store, EmbedConfig(encoder, batch_size=64), progress=False)
    label_store(store, d / "synth" / "annotations", name="tumor", progress=False)
    return d


def feature_cohort(seed: int, n_slides: int):
    from mil.simulate import SimConfig, make_feature_cohort

    # Slides of 10-18 x 10-18 tiles (~200): all four models, 3 seeds, in about 12 min on 2 cores.
    return make_feature_cohort(SimConfig(n_slides=n_slides, grid=(10, 18)), seed=seed, with_kinds=True)


def diagnose(cohort, kinds, seed: int, epochs: int, folds: int) -> None:
    """ABMIL on one fold, without and with --w2s (and with the pre-issue-9 method: no evidence, no
    back-off): per tissue type the student's mean score, the attention x n and the share of tiles the
    bag branch attends to, on the test slides."""
    import numpy as np
    import torch

    from mil.simulate import kind_of
    from mil.splits import make_splits
    from mil.train import TrainConfig, evaluate, train_fold
    from mil.w2s import W2SConfig

    split = make_splits(cohort, folds, seed=seed)[0]
    test = [cohort.bags[i] for i in split.test]
    kk = np.concatenate([kind_of(kinds[i]) for i in split.test])
    yy = np.concatenate([[cohort.bags[i].label] * len(cohort.bags[i].features) for i in split.test])
    for name, w in (("without --w2s", W2SConfig(enabled=False)),
                    ("old --w2s (no evidence, no back-off)", W2SConfig(evidence=False, backoff_tol=1e9)),
                    ("--w2s", W2SConfig())):
        cfg = TrainConfig(model="abmil", epochs=epochs, folds=folds, seed=seed, device="cpu", w2s=w)
        model, r = train_fold(cohort, split, cfg, progress=False)
        ev = evaluate(model, test, cfg, torch.device("cpu"), bool((r.w2s or {}).get("feedback", False)))
        s, a = np.concatenate(ev["instance"]), np.concatenate(ev["attention"])
        print(f"  [diagnose] {name}: bag AUC {r.metrics['auc']:.3f}, student instance AUC "
              f"{r.instance['student']['auc']:.3f}, attention {r.instance['attention']['auc']:.3f}; "
              f"back-off {[(b['epoch'], b['turned_off']) for b in (r.w2s or {}).get('backoff') or []]}")
        for y in (1, 0):
            cells = []
            for t in ("normal", "tumour", "confounder", "mimic"):
                m = (kk == t) & (yy == y)
                if m.any():
                    cells.append(f"{t} p={s[m].mean():.2f} att={a[m].mean():.2f} kept={(a[m] > 0).mean():.2f}")
            print(f"    {'tumour' if y else 'normal'} slides: " + "; ".join(cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=["synth", "hard-synth", "features"], default="synth",
                   help="synth: `wsi synth` slides, tiled and embedded; hard-synth: the same with --preset hard; "
                        "features: feature-level cohorts with a margin confounder (mil/simulate.py)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--slides", type=int, default=None, help="slides per cohort (default: 32 synth, 48 features)")
    p.add_argument("--size", type=int, default=None,
                   help="synthetic slide width in px at 0.25 µm/px (default 8192; 16384 for hard-synth)")
    p.add_argument("--models", nargs="+", default=["abmil", "clam-sb", "dsmil", "transmil"])
    p.add_argument("--folds", type=int, default=None, help="default: 4 synth, 3 features")
    p.add_argument("--epochs", type=int, default=None, help="default: 40 synth, 20 features")
    p.add_argument("--diagnose", action="store_true", help="features: per-tissue-type numbers of ABMIL (one fold)")
    p.add_argument("--encoder", default="efficientnet-lite0")
    p.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench" / "w2s")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="where MIL trains (cpu | cuda); embedding takes a GPU when there")
    p.add_argument("--workers", type=int, default=2, help="processes writing and tiling the synthetic slides")
    p.add_argument("--collect", action="store_true",
                   help="print the table of the runs already in --cache for --seeds (those that finished) and exit")
    p.add_argument("--build-only", action="store_true", help="build (tile, embed, label) the cohorts and stop")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="print one table from the --json files of earlier runs (e.g. one seed each) and exit")
    a = p.parse_args()
    feats = a.setting == "features"
    hard = a.setting == "hard-synth"
    a.slides = a.slides or (48 if feats or hard else 32)
    # hard slides hold tumour in 0.5-5 % of their tissue: at 8192 px (~100 tissue tiles) that is one or
    # two tiles, so the hard setting uses slides four times the area (~400 tissue tiles)
    a.size = a.size or (16384 if hard else 8192)
    a.folds = a.folds or (3 if feats else 4)
    a.epochs = a.epochs or (20 if feats else 40)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import numpy as np
    import torch

    from mil.cohort import load_cohort
    from mil.train import TrainConfig, train_cohort
    from mil.w2s import W2SConfig

    if a.threads:
        torch.set_num_threads(a.threads)
    runs: dict[tuple[str, bool], list[dict]] = {}
    if a.merge:  # per-seed JSON files (e.g. seeds run in parallel) -> one table
        parts = [json.loads(f.read_text()) for f in a.merge]
        a.seeds = [s for p in parts for s in p["seeds"]]
        a.setting, a.slides, a.folds, a.epochs = (parts[0][k] for k in ("setting", "slides", "folds", "epochs"))
        a.models = list(dict.fromkeys(r["model"] for p in parts for r in p["rows"]))
        a.seeds = sorted(set(a.seeds))
        for p in parts:
            for r in p["rows"]:
                runs.setdefault((r["model"], r["w2s"]), []).extend(r["per_seed"])
    if a.collect:  # the runs already in the cache (each run folder's metrics.json), whatever finished
        for seed in a.seeds:
            d = a.cache / (f"seed{seed}" if a.setting == "synth" else f"{'hard' if a.setting == 'hard-synth' else 'features'}/seed{seed}")
            for model in a.models:  # a seed counts for a model when both of its runs finished (paired)
                fs = [d / "runs" / f"{model}{'-w2s' if w2s else ''}" / "metrics.json" for w2s in (False, True)]
                if all(f.is_file() for f in fs):
                    for w2s, f in zip((False, True), fs):
                        runs.setdefault((model, w2s), []).append(json.loads(f.read_text()))
        a.models = [m for m in a.models if (m, False) in runs and (m, True) in runs]
    for seed in ([] if a.merge or a.collect else a.seeds):
        t0 = time.perf_counter()
        if feats:
            d = a.cache / "features" / f"seed{seed}"
            cohort, kinds = feature_cohort(seed, a.slides)
            if a.diagnose and seed == a.seeds[0]:
                diagnose(cohort, kinds, seed, a.epochs, a.folds)
        else:
            d = build_cohort(a.cache, seed, a.slides, a.size, a.encoder,
                             preset="hard" if a.setting == "hard-synth" else "easy", workers=a.workers)
            cohort = load_cohort(d / "synth" / "labels.csv", store=d / "cohort.zarr", encoder=a.encoder,
                                 instance_labels="tumor", progress=False)
        if a.build_only:
            print(f"seed {seed}: cohort ready in {time.perf_counter() - t0:.0f} s", flush=True)
            continue
        n_inst = sum(len(b.features) for b in cohort.bags)
        pos = sum(float((b.instance_labels > 0.5).sum()) for b in cohort.bags if b.instance_labels is not None)
        print(f"seed {seed}: {len(cohort.bags)} slides, {n_inst} tiles, {pos / n_inst:.1%} tumor tiles "
              f"(cohort ready in {time.perf_counter() - t0:.0f} s)", flush=True)
        for model in a.models:
            for w2s in (False, True):
                t0 = time.perf_counter()
                cfg = TrainConfig(model=model, epochs=a.epochs, folds=a.folds, seed=seed, device=a.device,
                                  w2s=W2SConfig(enabled=w2s))
                out = d / "runs" / f"{model}{'-w2s' if w2s else ''}"
                if feats and out.exists():   # in-memory cohorts: a fresh run each time (code may have changed)
                    import shutil

                    shutil.rmtree(out)
                m = train_cohort(cohort, cfg, out, instance_labels="tumor", progress=False)
                runs.setdefault((model, w2s), []).append(m)
                offs = [b[-1]["turned_off"] for b in m.get("w2s_backoff") or [] if b]
                f = lambda k: "-" if not m.get(k) else f"{m[k]['mean']:.3f}"  # noqa: E731
                print(f"  {model:9s} w2s={'yes' if w2s else 'no ':3s} bag AUC {f('bag_auc')}  "
                      f"instance AUC student {f('instance_auc')} attention "
                      f"{f('instance_auc_attention')}  ({time.perf_counter() - t0:.0f} s)"
                      f"{f'  back-off in {len(offs)}/{a.folds} folds: {offs}' if w2s else ''}", flush=True)

    def stat(ms: list[dict], key: str) -> tuple[float, float]:
        v = [m[key]["mean"] for m in ms if m.get(key)]
        return float(np.mean(v)), float(np.std(v))

    if a.build_only:
        return
    print(f"\n{a.setting}: mean ± std over seeds {a.seeds} of the per-seed fold means ({a.folds} folds, "
          f"{a.slides} slides, {a.epochs} epochs)")
    head = f"{'model':9s} {'w2s':4s} {'bag AUC':>15s} {'inst AUC (student)':>19s} {'inst AUC (attention)':>21s}"
    print(head + "\n" + "-" * len(head))
    table = []
    for model in a.models:
        for w2s in (False, True):
            ms = runs[(model, w2s)]
            b, s, at = stat(ms, "bag_auc"), stat(ms, "instance_auc"), stat(ms, "instance_auc_attention")
            table.append({"model": model, "w2s": w2s, "bag_auc": b, "instance_auc": s, "instance_auc_attention": at,
                          "per_seed": [{k: m.get(k) for k in ("bag_auc", "instance_auc", "instance_auc_attention",
                                                                      "w2s_backoff")} for m in ms]})
            print(f"{model:9s} {'yes' if w2s else 'no':4s} {b[0]:7.3f} ± {b[1]:.3f} {s[0]:11.3f} ± {s[1]:.3f} "
                  f"{at[0]:13.3f} ± {at[1]:.3f}  ({len(ms)} seed{'s' if len(ms) > 1 else ''})")
        base, corr = table[-2], table[-1]
        d_inst = corr["instance_auc"][0] - base["instance_auc"][0]
        d_bag = corr["bag_auc"][0] - base["bag_auc"][0]
        ok = d_inst >= 0.05 and d_bag >= -max(base["bag_auc"][1], corr["bag_auc"][1], 1e-9)
        print(f"{'':9s} w2s: instance AUC {d_inst:+.3f}, bag AUC {d_bag:+.3f}  -> {'meets' if ok else 'misses'} "
              "the target")
    if a.json:
        a.json.write_text(json.dumps({"setting": a.setting, "seeds": a.seeds, "slides": a.slides, "folds": a.folds,
                                      "epochs": a.epochs, "rows": table}, indent=1))


if __name__ == "__main__":
    main()
