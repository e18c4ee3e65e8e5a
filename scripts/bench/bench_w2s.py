"""Does weak-to-strong correction work? Each MIL model with and without `--w2s`, on three settings.

    .venv/bin/python scripts/bench/bench_w2s.py [--setting synth|hard-synth|features] [--seeds 0 1 2] [--models abmil]

--setting synth (default): per seed, a `wsi synth` cohort (half tumor, 1-3 annotated tumor regions
each) is written, tiled at 0.5 µm/px, embedded with EfficientNet-Lite0 (real ImageNet weights) and
labelled from its GeoJSON annotations; cached under .cache/bench/w2s/.
--setting hard-synth: 48 slides of 16384 px with `wsi synth --preset hard` (tumour grades, benign mimics, margin
inflammation, small tumour fractions, stain / blur / JPEG variation); cached under
.cache/bench/w2s/hard/.
--setting features: a sweep of the feature-level simulator's knobs (mil/simulate.py) around its
subtle-tumour setting (`SimConfig.subtle()`: tumour a small shift from one common normal type, a
confounder in ~3 % of every slide's tiles and dense at tumour margins, tumour 0.5-6 % of a positive
slide), one knob at a time: tumour shift (subtle -> obvious), confounder scatter in every slide
(the confounder rate of negative slides), confounder density at the tumour margin, tumour fraction.
Per point and seed: 96 slides of 8-14 x 8-14 tiles, 128-d, 3 folds, 12 epochs (`--quick`: one seed,
48 slides, 64-d, 8 epochs, the subtle point and each knob's far end). `--diagnose` also prints, for
ABMIL on the first seed's first fold of the subtle point, the student's mean score, the attention
and the share kept by the filter per tissue type. `--json` is rewritten after every point, so a
sweep cut short leaves what it finished; `--table` writes the markdown table.

Every model is cross-validated with and without the correction on the same splits. Reported: bag
AUC and instance AUC (the student's scores, the attention, and the inheritance baseline's: an instance
classifier trained on the slide label given to every tile, mil/baseline.py) as mean ± std over seeds
of the per-seed fold means, the change w2s makes, and how many folds backed off the feedback.
Target: the student with w2s reaches instance AUC >= 0.90 and >= the baseline + 0.05, without lowering
bag AUC below the run without w2s beyond its seed spread; a row that misses it is marked FAILS.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

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


# The sweep: each knob's values (the first is the subtle setting's own); --quick keeps the first and last.
KNOBS = {
    "shift": ("tumour_shift", [0.6, 1.2, 2.5]),                          # subtle -> obvious tumour
    "scatter": ("confounder_scatter", [0.03, 0.0, 0.10]),                # confounder in every slide
    "margin": ("margin_prob", [0.9, 0.0]),                                # confounder density at the margin
    "fraction": ("tumour_fraction", [(0.005, 0.06), (0.05, 0.15)]),      # tumour share of a positive slide
}


def sweep_points(knobs: list[str], quick: bool) -> list[tuple[str, dict]]:
    """(name, SimConfig overrides): the subtle point first, then each knob's other values."""
    points = [("subtle", {})]
    for k in knobs:
        field, values = KNOBS[k]
        for v in (values[-1:] if quick else values[1:]):
            points.append((f"{k}={v if not isinstance(v, tuple) else '-'.join(map(str, v))}", {field: v}))
    return points


def feature_cohort(seed: int, n_slides: int, dim: int = 128, overrides: dict | None = None):
    from mil.simulate import SimConfig, make_feature_cohort

    # Slides of 8-14 x 8-14 tiles (~120): one ABMIL run (3 folds, 12 epochs) in about half a minute.
    cfg = SimConfig.subtle(n_slides=n_slides, dim=dim, grid=(8, 14), **(overrides or {}))
    return make_feature_cohort(cfg, seed=seed, with_kinds=True)


def diagnose(cohort, kinds, seed: int, epochs: int, folds: int) -> None:
    """ABMIL on one fold, without and with --w2s (and with the method before negative-bag evidence: no evidence, no
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


def verdict(plain: dict, corr: dict) -> str:
    """Whether the student with w2s meets the target: instance AUC >= 0.90 and >= baseline + 0.05, bag
    AUC not below the run without w2s beyond the larger seed spread."""
    s, b = corr["instance_auc"][0], corr["instance_auc_baseline"][0]
    why = []
    if not s >= 0.90:
        why.append("student < 0.90")
    if np.isfinite(b) and not s >= b + 0.05:
        why.append("student < baseline + 0.05")
    if corr["bag_auc"][0] < plain["bag_auc"][0] - max(plain["bag_auc"][1], corr["bag_auc"][1], 1e-9):
        why.append("bag AUC lower")
    return "meets" if not why else "FAILS: " + ", ".join(why)


def stat(ms: list[dict], key: str) -> tuple[float, float]:
    v = [m[key]["mean"] for m in ms if m.get(key)]
    return (float(np.mean(v)), float(np.std(v))) if v else (float("nan"), float("nan"))


def summarize(runs: dict, points: list[str], models: list[str]) -> list[dict]:
    """One row per (point, model, w2s) with mean ± std over seeds; w2s rows carry the verdict."""
    rows = []
    for point in points:
        for model in models:
            pair = []
            for w2s in (False, True):
                ms = runs.get((point, model, w2s))
                if not ms:
                    continue
                row = {"point": point, "model": model, "w2s": w2s, "seeds": len(ms),
                       **{k: stat(ms, k) for k in ("bag_auc", "instance_auc", "instance_auc_attention",
                                                   "instance_auc_baseline")},
                       "backoff": [sum(1 for b in m.get("w2s_backoff") or [] if b) for m in ms] if w2s else None,
                       "seconds": [m.get("seconds") for m in ms],
                       "per_seed": [{k: m.get(k) for k in ("bag_auc", "instance_auc", "instance_auc_attention",
                                                            "instance_auc_baseline", "w2s_backoff")} for m in ms]}
                rows.append(row)
                pair.append(row)
            if len(pair) == 2:
                pair[1]["verdict"] = verdict(*pair)
    return rows


def markdown(rows: list[dict], folds: int) -> str:
    f = lambda v: "—" if not np.isfinite(v[0]) else f"{v[0]:.3f} ± {v[1]:.3f}"  # noqa: E731
    out = ["| point | model | w2s | bag AUC | inst AUC (student) | inst AUC (attention) | inst AUC (baseline) | "
           "backed off | verdict |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        off = "—" if r["backoff"] is None else ", ".join(f"{n}/{folds}" for n in r["backoff"])
        out.append(f"| {r['point']} | {r['model']} | {'yes' if r['w2s'] else 'no'} | {f(r['bag_auc'])} | "
                   f"{f(r['instance_auc'])} | {f(r['instance_auc_attention'])} | {f(r['instance_auc_baseline'])} | "
                   f"{off} | {r.get('verdict', '')} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=["synth", "hard-synth", "features"], default="synth",
                   help="synth: `wsi synth` slides, tiled and embedded; hard-synth: the same with --preset hard; "
                        "features: a sweep of the feature-level simulator's knobs (mil/simulate.py)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (--quick: 0)")
    p.add_argument("--slides", type=int, default=None,
                   help="slides per cohort (default: 32 synth, 48 hard-synth, 96 features, 48 --quick)")
    p.add_argument("--size", type=int, default=None,
                   help="synthetic slide width in px at 0.25 µm/px (default 8192; 16384 for hard-synth)")
    p.add_argument("--models", nargs="+", default=["abmil", "clam-sb", "dsmil", "transmil"])
    p.add_argument("--folds", type=int, default=None, help="default: 4 synth, 3 features")
    p.add_argument("--epochs", type=int, default=None, help="default: 40 synth, 12 features (--quick: 8)")
    p.add_argument("--knobs", nargs="*", choices=list(KNOBS), default=list(KNOBS),
                   help="features: the knobs swept (default: all), one at a time around the subtle point; "
                        "`--knobs` alone: the subtle point only")
    p.add_argument("--dim", type=int, default=None, help="features: feature dimension (default 128; --quick 64)")
    p.add_argument("--quick", action="store_true",
                   help="features: one seed, 48 slides, 64-d, 8 epochs, each knob's far end only")
    p.add_argument("--diagnose", action="store_true", help="features: per-tissue-type numbers of ABMIL (one fold)")
    p.add_argument("--encoder", default="efficientnet-lite0")
    p.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench" / "w2s")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--table", type=Path, default=None, help="also write the markdown table here")
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
    quick = a.quick and feats
    a.seeds = a.seeds or ([0] if quick else [0, 1, 2])
    a.slides = a.slides or (48 if quick or hard else 96 if feats else 32)
    # hard slides hold tumour in 0.5-5 % of their tissue: at 8192 px (~100 tissue tiles) that is one or
    # two tiles, so the hard setting uses slides four times the area (~400 tissue tiles)
    a.size = a.size or (16384 if hard else 8192)
    a.folds = a.folds or (3 if feats else 4)
    a.epochs = a.epochs or ((8 if quick else 12) if feats else 40)
    a.dim = a.dim or (64 if quick else 128)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    from mil.cohort import load_cohort
    from mil.train import TrainConfig, train_cohort
    from mil.w2s import W2SConfig

    if a.threads:
        torch.set_num_threads(a.threads)
    points = sweep_points(a.knobs, quick) if feats else [(a.setting, {})]
    runs: dict[tuple[str, str, bool], list[dict]] = {}
    if a.merge:  # JSON files of earlier runs (e.g. seeds or points run in parallel) -> one table
        parts = [json.loads(f.read_text()) for f in a.merge]
        a.setting, a.slides, a.folds, a.epochs = (parts[0][k] for k in ("setting", "slides", "folds", "epochs"))
        a.seeds = sorted({s for p in parts for s in p["seeds"]})
        a.models = list(dict.fromkeys(r["model"] for p in parts for r in p["rows"]))
        points = [(n, {}) for n in dict.fromkeys(r.get("point", a.setting) for p in parts for r in p["rows"])]
        for p in parts:
            for r in p["rows"]:
                runs.setdefault((r.get("point", a.setting), r["model"], r["w2s"]), []).extend(r["per_seed"])

    def folder(point: str, seed: int) -> Path:
        if feats:
            return a.cache / "features" / point / f"seed{seed}"
        return a.cache / (f"seed{seed}" if a.setting == "synth" else f"hard/seed{seed}")

    def write(final: bool = False) -> None:
        rows = summarize(runs, [n for n, _ in points], a.models)
        if a.json:
            a.json.write_text(json.dumps({"setting": a.setting, "seeds": a.seeds, "slides": a.slides,
                                          "folds": a.folds, "epochs": a.epochs, "dim": a.dim if feats else None,
                                          "points": dict(points), "rows": rows}, indent=1, default=str))
        if final or a.table:
            table = markdown(rows, a.folds)
            if a.table:
                a.table.write_text(table + "\n")
            if final:
                print(f"\n{a.setting}: mean ± std over seeds {a.seeds} of the per-seed fold means ({a.folds} folds, "
                      f"{a.slides} slides, {a.epochs} epochs)\n{table}")

    if a.collect:  # the runs already in the cache (each run folder's metrics.json), whatever finished
        for point, _ in points:
            for seed in a.seeds:
                for model in a.models:  # a seed counts for a model when both of its runs finished (paired)
                    fs = [folder(point, seed) / "runs" / f"{model}{'-w2s' if w2s else ''}" / "metrics.json"
                          for w2s in (False, True)]
                    if all(f.is_file() for f in fs):
                        for w2s, f in zip((False, True), fs):
                            runs.setdefault((point, model, w2s), []).append(json.loads(f.read_text()))
    for point, overrides in ([] if a.merge or a.collect else points):
        for seed in a.seeds:
            t0 = time.perf_counter()
            d = folder(point, seed)
            if feats:
                cohort, kinds = feature_cohort(seed, a.slides, a.dim, overrides)
                if a.diagnose and seed == a.seeds[0] and point == "subtle":
                    diagnose(cohort, kinds, seed, a.epochs, a.folds)
            else:
                d = build_cohort(a.cache, seed, a.slides, a.size, a.encoder,
                                 preset="hard" if hard else "easy", workers=a.workers)
                cohort = load_cohort(d / "synth" / "labels.csv", store=d / "cohort.zarr", encoder=a.encoder,
                                     instance_labels="tumor", progress=False)
            if a.build_only:
                print(f"seed {seed}: cohort ready in {time.perf_counter() - t0:.0f} s", flush=True)
                continue
            n_inst = sum(len(b.features) for b in cohort.bags)
            pos = sum(float((b.instance_labels > 0.5).sum()) for b in cohort.bags if b.instance_labels is not None)
            print(f"{point} seed {seed}: {len(cohort.bags)} slides, {n_inst} tiles, {pos / n_inst:.1%} tumor tiles "
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
                    m["seconds"] = time.perf_counter() - t0
                    runs.setdefault((point, model, w2s), []).append(m)
                    offs = [b[-1]["turned_off"] for b in m.get("w2s_backoff") or [] if b]
                    f = lambda k: "-" if not m.get(k) else f"{m[k]['mean']:.3f}"  # noqa: E731
                    print(f"  {model:9s} w2s={'yes' if w2s else 'no ':3s} bag AUC {f('bag_auc')}  "
                          f"instance AUC student {f('instance_auc')} attention {f('instance_auc_attention')} "
                          f"baseline {f('instance_auc_baseline')}  ({m['seconds']:.0f} s, baseline "
                          f"{f('baseline_seconds')} s/fold){f'  back-off in {len(offs)}/{a.folds} folds: {offs}' if w2s else ''}",
                          flush=True)
        if not a.build_only:
            write()
    if not a.build_only:
        write(final=True)


if __name__ == "__main__":
    main()
