"""`vlm`: the pathology reasoner of issue 11 (Qwen2.5-VL / Patho-R1 on trl).

Every command is a thin layer over the Python API (vlm.tiny, vlm.data). Errors a user can cause end as
one line and exit status 2 (the traceback with -v).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wsi.cli_common import command_parser, run_command


def _cmd_make_tiny(a: argparse.Namespace) -> int:
    from .tiny import make_tiny

    s = make_tiny(a.out_dir, seed=a.seed)
    print(f"tiny Qwen2.5-VL written to {s['out']}: {s['parameters'] / 1e6:.2f}M parameters, vocabulary "
          f"{s['vocab_size']}, {s['bytes'] / 1e6:.1f} MB (random weights: it demonstrates the pipeline; real "
          "answers need a real checkpoint)")
    return 0


def _cmd_data(a: argparse.Namespace) -> int:
    from .data import make_data

    classes = [c.strip() for c in a.classes.split(",")] if a.classes else None
    s = make_data(a.store, a.labels, a.captions, a.out, classes=classes, question=a.question, slides=a.slides,
                  max_per_class=a.max_per_class, seed=a.seed)
    print(json.dumps(s, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .data import QUESTION

    p, sub = command_parser("vlm", "The pathology reasoner: a vision-language model asked about tiles.")
    t = sub.add_parser("make-tiny", help="a tiny random-weight Qwen2.5-VL model folder (tests, demo)",
                       description="Writes OUT_DIR: config.json, model.safetensors, tokenizer (trained offline), "
                                   "the Qwen2.5-VL chat template and processors, pathmil_defaults.json.")
    t.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="a new (or empty) folder")
    t.add_argument("--seed", type=int, default=0, help="the random weights' seed (default: 0)")
    t.set_defaults(func=_cmd_make_tiny)

    d = sub.add_parser("data", help="caption.jsonl, mcq.jsonl and sft.jsonl from a tile store",
                       description="caption.jsonl from a `clip captions` CSV; mcq.jsonl: one multiple-choice "
                                   "question per labelled tile, one option per class; sft.jsonl: the MCQs with "
                                   "a templated reasoning. Images are store references {store, slide, tile}.")
    d.add_argument("store", metavar="STORE", help="the tile store")
    d.add_argument("--labels", required=True, help="the per-tile labels the questions ask about")
    d.add_argument("--captions", type=Path, required=True, help="a captions CSV of the store's tiles (clip captions)")
    d.add_argument("--out", type=Path, required=True, help="the folder for the three JSONL files")
    d.add_argument("--classes", default=None, help="class names, comma-separated; binary labels: negative,positive "
                                                   "(default: normal,tumor)")
    d.add_argument("--question", default=QUESTION, help=f"the question (default: {QUESTION!r})")
    d.add_argument("--slides", nargs="+", default=None, help="only these slides (default: every complete slide)")
    d.add_argument("--max-per-class", type=int, default=None, help="at most this many tiles of each class")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_data)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
