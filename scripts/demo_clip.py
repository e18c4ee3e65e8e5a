"""The demo's PathoCLIP stage, also run by scripts/bench/bench_clip.py over seeds.

Captions are made from the synthetic cohort's tile labels (`clip captions`) for the training
slides; `pathoclip-lite` is trained on them (locked image tower, a few CPU minutes); then, on
held-out slides, the trained model and the untrained one (the same ImageNet image tower with an
untrained text tower) are compared: zero-shot balanced accuracy with prompts not used in training,
retrieval R@5 both ways on the held-out slides' captions, and the 8-shot linear probe.
"""
from __future__ import annotations

from pathlib import Path


def split_slides(labels_csv: Path, held_out: float = 0.25, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training slides, held-out slides), stratified by slide label, a patient's slides on one side
    (`wsi.splits.split_by_label`)."""
    from wsi.splits import read_patients, read_slide_labels, split_by_label

    return split_by_label(read_slide_labels(labels_csv), held_out, seed, patients=read_patients(labels_csv))


def clip_stage(store: Path, labels_csv: Path, out: Path, seed: int = 0, progress: bool = True,
               model: str = "pathoclip-lite") -> list[dict]:
    """Train PathoCLIP on the training slides' captions; evaluate it and the untrained model on the
    held-out slides. Returns one row per model."""
    from clip.captions import captions_from_labels, write_classes_json
    from clip.config import ClipTrainConfig
    from clip.data import read_captions
    from clip.models import load_model
    from clip.probe import probe
    from clip.retrieval import retrieve
    from clip.train import train_clip
    from clip.zeroshot import read_classes, zeroshot
    from wsi.runtime import seed_everything

    out.mkdir(parents=True, exist_ok=True)
    train, test = split_slides(labels_csv, seed=seed)
    # as many tumour as normal tiles, two captions each: a batch of mostly "normal" captions teaches little
    captions_from_labels(store, "tumor", out / "captions_train.csv", slides=train, seed=seed, per_tile=2,
                         balance_classes=True)
    captions_from_labels(store, "tumor", out / "captions_test.csv", slides=test, seed=seed + 1)
    classes, templates = read_classes(write_classes_json(out / "classes.json"))  # prompts unlike the training ones
    run = out / f"{model}-seed{seed}"
    m = train_clip(ClipTrainConfig(model=model, seed=seed), out / "captions_train.csv", run, store=store,
                   progress=progress)
    test_caps = read_captions(out / "captions_test.csv", store=store)
    rows = []
    for name, target in (("untrained", model), ("trained", str(run))):
        # the probe first: it stores the image tower's features, which zero-shot and retrieval then reuse.
        # Seeded before each build: the untrained model's text tower and projection are random, and the
        # same seed gives the probe's and zero-shot's copies the same weights (so the features are reused).
        seed_everything(seed)
        pb = probe(target, store, "tumor", shots=[8], train_slides=train, test_slides=test, progress=False)
        seed_everything(seed)
        enc = load_model(target)
        zs = zeroshot(enc, store, classes, templates, slides=test, labels="tumor", positive="tumor", progress=False)
        rt = retrieve(enc, test_caps, store=store, progress=False)
        rows.append({"model": f"{model} ({name})", "zeroshot_balanced_accuracy": zs["metrics"]["balanced_accuracy"],
                     "zeroshot_auc": zs["metrics"].get("auc"),
                     "retrieval_i2t_R@5": rt["metrics"]["image_to_text"]["R@5"],
                     "retrieval_t2i_R@5": rt["metrics"]["text_to_image"]["R@5"],
                     "probe_8shot_balanced_accuracy": pb["metrics"]["shots"]["8"]["balanced_accuracy"]["mean"]
                     if "8" in pb["metrics"]["shots"] else None})
    rows[-1]["best_epoch"], rows[-1]["epochs"] = m.get("best_epoch"), len(m.get("history", []))
    return rows


def rows_table(rows: list[dict]) -> str:
    from wsi.cli_common import format_table

    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    table = [("model", "zero-shot bal.acc", "zero-shot AUC", "R@5 image→text", "R@5 text→image", "8-shot bal.acc")]
    table += [(r["model"], f(r["zeroshot_balanced_accuracy"]), f(r["zeroshot_auc"]), f(r["retrieval_i2t_R@5"]),
               f(r["retrieval_t2i_R@5"]), f(r["probe_8shot_balanced_accuracy"])) for r in rows]
    return format_table(table)
