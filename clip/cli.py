"""`clip`: PathoCLIP on the tile store: train, zero-shot, retrieval, few-shot probes, captions, shards.

Every command is a thin layer over the Python API (clip.train, clip.zeroshot, clip.retrieval,
clip.probe, clip.captions, clip.shards); `clip train` options are made from `ClipTrainConfig`, so each
default is written once. Errors a user can cause end as one line and exit status 2. Under torchrun,
`torchrun --nproc_per_node N -m clip.cli train ...` trains with DDP.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if not getattr(sys.modules.get("clip"), "PATHMIL", True):  # pragma: no cover - depends on the environment
    sys.exit(f"clip: error: the `clip` package imported from {getattr(sys.modules['clip'], '__file__', '?')} is "
             "not pathmil's (OpenAI's openai-clip / clip-anytorch install a top-level `clip` too); uninstall it "
             "or run `python -m clip.cli` from the pathmil checkout")

from wsi.cli_common import add_config_options, command_parser, config_from_args, registry_help, run_command
from wsi.paths import add_data_path_options


def _models() -> str:
    from .models import model_choices

    return ", ".join(model_choices())


_Help = registry_help(clip_models=_models)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a clip train RUN_DIR, a registry name ({clip_models}) or an "
                                                  "open_clip architecture")
    p.add_argument("--pretrained", default=None, help="for an architecture: an open_clip tag, hf-hub:<repo> or a "
                                                      "local weights file")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")


def _held_out_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include-training-slides", action="store_true",
                   help="also score the slides a RUN_DIR was trained on (left out by default; the result file "
                        "lists them under data.training_slides)")


def _load(a):
    from .models import load_model

    return load_model(a.model, a.pretrained)


def _cmd_train(a: argparse.Namespace) -> int:
    from .config import ClipTrainConfig
    from .train import train_clip

    cfg = config_from_args(ClipTrainConfig, a, lock_image=a.lock_image)
    m = train_clip(cfg, a.captions, a.out, store=a.store, progress=not a.quiet, data_root=a.data_root,
                   allow_remote=a.allow_remote)
    if m:
        b = m.get("best") or {}
        r = (b.get("val") or {}).get("recall", {})
        print(f"best epoch {m['best_epoch']} of {len(m['history'])} ({m['stopped']}): validation loss "
              f"{b.get('loss', float('nan')):.4f}, R@5 image→text {r.get('image_to_text', {}).get('R@5', float('nan')):.3f}, "
              f"text→image {r.get('text_to_image', {}).get('R@5', float('nan')):.3f}")
        print(f"run written to {a.out} (model.safetensors, open_clip_config.json, config.json, metrics.json, curves.png)")
    return 0


def _cmd_zeroshot(a: argparse.Namespace) -> int:
    from .zeroshot import read_classes, read_positive, zeroshot

    classes, templates = read_classes(a.classes)
    res = zeroshot(_load(a), a.store, classes, templates, slides=a.slides, labels=a.labels, run=a.name,
                   batch_size=a.batch_size, device=a.device, positive=read_positive(a.classes),
                   classes_file=a.classes, overwrite=a.overwrite, include_training=a.include_training_slides)
    _report(a, "zeroshot", res)
    return 0


def _cmd_retrieve(a: argparse.Namespace) -> int:
    from .data import read_captions
    from .retrieval import retrieve

    caps = read_captions(a.captions, store=a.store, data_root=a.data_root, allow_remote=a.allow_remote)
    res = retrieve(_load(a), caps, store=a.store, batch_size=a.batch_size, device=a.device,
                   include_training=a.include_training_slides)
    _report(a, "retrieval", res)
    return 0


def _cmd_probe(a: argparse.Namespace) -> int:
    from wsi.splits import read_patients

    from .probe import probe

    shots = [int(s) for s in a.shots.split(",")]
    res = probe(a.model, a.store, a.labels, shots=shots, pretrained=a.pretrained, batch_size=a.batch_size,
                device=a.device, patients=read_patients(a.patients) if a.patients else None,
                include_training=a.include_training_slides)
    _report(a, "probe", res)
    return 0


def _report(a, task: str, res: dict) -> None:
    from .results import write_result

    if a.out:
        write_result(a.out, task, res)
    print(json.dumps(res.get("metrics", res), indent=1)[:4000])
    if a.out:
        print(f"written to {a.out}")


def _cmd_captions(a: argparse.Namespace) -> int:
    from .captions import captions_from_labels

    from wsi.splits import read_patients

    s = captions_from_labels(a.store, a.labels, a.out, seed=a.seed, per_tile=a.per_tile, slides=a.slides,
                             patients=read_patients(a.patients) if a.patients else None)
    print(json.dumps(s))
    return 0


def _cmd_shards(a: argparse.Namespace) -> int:
    from .data import read_captions
    from .shards import write_shards

    caps = read_captions(a.captions, store=a.store, data_root=a.data_root, allow_remote=a.allow_remote)
    paths = write_shards(caps, a.out, per_shard=a.per_shard, overwrite=a.overwrite)
    print(f"{len(paths)} shards written to {a.out} ({caps.summary()})")
    return 0


def _cmd_models(a: argparse.Namespace) -> int:
    from wsi.cli_common import format_table
    from wsi.encoders.registry import REGISTRY

    specs = [s for s in REGISTRY.specs() if s.task == "image-text"]
    if a.json:
        print(json.dumps([{**s.row(), "trainable": s.family == "open_clip", "train_defaults": s.train} for s in specs]))
        return 0
    rows = [("name", "dim", "input", "license", "gated", "trainable", "weights")]
    rows += [(s.name, s.dim, s.input_size, s.license, s.gated, s.family == "open_clip", s.hub_id or "-") for s in specs]
    print(format_table(rows))
    print("also: any open_clip architecture (ViT-B-16, ViT-L-14, ...) with --pretrained, and clip train RUN_DIRs")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import ClipTrainConfig

    p, sub = command_parser("clip", "PathoCLIP: a pathology CLIP on the tile store.")
    t = sub.add_parser("train", help="contrastive training on image/caption pairs", formatter_class=_Help,
                       description="Writes RUN_DIR/model.safetensors (best validation epoch), open_clip_config.json, "
                                   "config.json, metrics.json, curves.png; resumes a run left in RUN_DIR.")
    t.add_argument("--captions", type=Path, required=True,
                   help="CSV: slide_id,tile,caption or slide_id,x,y,caption (with --store), or image_path,caption")
    t.add_argument("--store", default=None, help="the tile store the captions refer to")
    add_data_path_options(t, "the captions CSV")
    t.add_argument("--out", type=Path, required=True, help="RUN_DIR")
    t.add_argument("--lock-image", action=argparse.BooleanOptionalAction, default=None,
                   help="freeze the image tower (LiT); default: the model's (on for pathoclip-lite)")
    add_config_options(t.add_argument_group("training"), ClipTrainConfig, skip=("lock_image",))
    t.set_defaults(func=_cmd_train)

    z = sub.add_parser("zeroshot", help="zero-shot tile classification from class prompts", formatter_class=_Help)
    _model_args(z)
    z.add_argument("--store", required=True)
    z.add_argument("--classes", type=Path, required=True,
                   help='JSON: {"classes": {"tumor": ["tumor", "carcinoma"], ...}, "templates": ["an H&E image of {}."]}')
    z.add_argument("--labels", default=None, help="per-tile ground truth (`wsi labels --name`) to score against")
    z.add_argument("--slides", nargs="+", default=None, help="only these slides")
    z.add_argument("--name", default=None, help="write per-tile class probabilities to predictions/<name>")
    z.add_argument("--overwrite", action="store_true", help="replace predictions already stored under --name")
    _held_out_arg(z)
    z.add_argument("--out", type=Path, default=None, help="RESULT.json")
    z.set_defaults(func=_cmd_zeroshot)

    r = sub.add_parser("retrieve", help="image↔text retrieval recall@1/5/10/20", formatter_class=_Help)
    _model_args(r)
    r.add_argument("--captions", type=Path, required=True)
    r.add_argument("--store", default=None)
    add_data_path_options(r, "the captions CSV")
    r.add_argument("--out", type=Path, default=None, help="RESULT.json")
    _held_out_arg(r)
    r.set_defaults(func=_cmd_retrieve)

    pr = sub.add_parser("probe", help="few-shot linear probes (Patho-R1 protocol)", formatter_class=_Help)
    _model_args(pr)
    pr.add_argument("--store", required=True)
    pr.add_argument("--labels", required=True, help="per-tile labels (`wsi labels --name`)")
    pr.add_argument("--shots", default="2,8,16,32,64,128")
    pr.add_argument("--out", type=Path, default=None, help="RESULT.json")
    pr.add_argument("--patients", type=Path, default=None,
                    help="labels CSV with slide_id,patient_id: the seeded split keeps a patient's slides on one side")
    _held_out_arg(pr)
    pr.set_defaults(func=_cmd_probe)

    c = sub.add_parser("captions", help="captions for store tiles from their labels")
    c.add_argument("store")
    c.add_argument("--labels", required=True, help="per-tile labels (`wsi labels --name`)")
    c.add_argument("--out", type=Path, required=True, help="captions CSV (slide_id,tile,caption)")
    c.add_argument("--slides", nargs="+", default=None, help="only these slides")
    c.add_argument("--per-tile", type=int, default=1, help="captions per tile")
    c.add_argument("--patients", type=Path, default=None,
                   help="labels CSV with slide_id,patient_id: adds a patient_id column (clip train splits by patient)")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=_cmd_captions)

    s = sub.add_parser("shards", help="WebDataset shards (.tar of jpg/txt) from a captions CSV")
    s.add_argument("--captions", type=Path, required=True)
    s.add_argument("--store", default=None)
    add_data_path_options(s, "the captions CSV")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--per-shard", type=int, default=5000)
    s.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    s.set_defaults(func=_cmd_shards)

    m = sub.add_parser("models", help="the image-text models")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
