"""vlm.dynamic: DAPO's dynamic sampling on the tiny Qwen2.5-VL and trl's real GRPOTrainer, with scripted
reward functions that decide which groups carry signal: the loss's token count covers kept rows only,
`filter_on` picks the reward that decides, metrics and the completions table describe the kept rows of every
process once per step, refills never repeat a prompt of the batch and their order survives a checkpoint, and
the trl internals the trainer relies on are checked."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, make_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")
G = 4


def tile_of(question: str) -> int:
    return int(re.search(r"tile (\d+)", question).group(1))


def write_rows(d: Path, n: int) -> list[dict]:
    """`n` MCQ rows, one per tile of a small store, each with its own question ("... tile K ...")."""
    rng = np.random.default_rng(0)
    make_store(d / "s.zarr", {"a": n}, tiles={"a": rng.integers(0, 255, (n, 28, 28, 3)).astype(np.uint8)},
               tile_size=28)
    return [{"images": [{"store": "s.zarr", "slide": "a", "tile": i}], "options": ["normal", "tumor"],
             "answer": "A", "question": f"Which tissue does tile {i} show?"} for i in range(n)]


class Scripted:
    """A reward function named `name`: tiles with an odd number get 0, 1, 0, 1 over their group (signal),
    the others (all with `signal` False) `flat` for every completion (none); `vary` adds 0.1 * (row % 2) to
    every row. Records each call's tile numbers and completion lengths."""

    def __init__(self, name: str, flat: float = 1.0, vary: bool = False, signal: bool = True):
        self.__name__, self.flat, self.vary, self.signal, self.calls = name, flat, vary, signal, []

    def __call__(self, prompts, completions, completion_ids, question, **kwargs):
        tiles = [tile_of(q) for q in question]
        self.calls.append([(t, len(c)) for t, c in zip(tiles, completion_ids)])
        out = [float(i % 2) if t % 2 and self.signal else self.flat for i, t in enumerate(tiles)]
        return [r + 0.1 * (i % 2) if self.vary else r for i, r in enumerate(out)]


def make_trainer(model_dir: Path, d: Path, rows: list[dict], rewards: list, *, max_tries: int = 2,
                 filter_on: str | None = None, **config):
    from trl import GRPOConfig

    from vlm.dynamic import DynamicSamplingTrainer
    from vlm.model import load_model
    from vlm.train import build_dataset

    net, processor = load_model(model_dir, device="cpu")
    net.train()
    kw = dict(output_dir=str(d / "ckpt"), per_device_train_batch_size=2 * G, num_generations=G,
              max_completion_length=6, loss_type="dapo", beta=0.0, epsilon_high=0.28, learning_rate=1e-4,
              mask_truncated_completions=False, temperature=1.0, top_k=0, top_p=1.0, max_steps=1, seed=0,
              logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
              remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True, log_completions=False)
    kw.update(config)
    extra = {"filter_on": filter_on} if filter_on else {}
    return DynamicSamplingTrainer(model=net, args=GRPOConfig(**kw), train_dataset=build_dataset(rows, "dapo", d),
                                  processing_class=processor, reward_funcs=rewards, max_tries=max_tries, **extra)


def batch_of(trainer, tiles: list[int]) -> list[dict]:
    return [dict(trainer.train_dataset[t]) for t in tiles for _ in range(G)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dyn")
    return d, write_rows(d, 8)


def test_filler_rows_are_masked_out_of_the_loss_and_its_token_count(tiny_vlm, data, tmp_path):
    """Tile 0's group has no signal, tile 1's has; one try: tile 0's group fills the batch. The count that
    normalises the DAPO loss (num_items_in_batch) is tile 1's completion tokens, and the filler rows have
    no advantage and no completion mask (no KL or loss share either)."""
    d, rows = data
    acc = Scripted("accuracy_reward")
    trainer = make_trainer(tiny_vlm, d, rows, [acc], max_tries=1)
    batch = trainer._generate_and_score_completions(batch_of(trainer, [0, 1]))
    (call,) = acc.calls
    kept_tokens = sum(n for t, n in call if t == 1)
    assert int(batch["num_items_in_batch"]) == kept_tokens
    assert batch["advantages"][G:].abs().sum() == 0 and batch["completion_mask"][G:].sum() == 0
    assert batch["advantages"][:G].abs().sum() > 0 and int(batch["completion_mask"][:G].sum()) == kept_tokens
    m = trainer._metrics["train"]
    assert m["dynamic_sampling/kept_groups"] == [1.0] and m["dynamic_sampling/filled_groups"] == [1.0]


def test_filter_on_accuracy_or_total(tiny_vlm, data, tmp_path):
    """Tile 0: all four answers right (accuracy 1.0) but formats differ (0 / 0.1): accuracy drops the group
    (DAPO's rule), total keeps it."""
    from vlm.dynamic import filter_column
    from vlm.prompts import VlmError

    d, rows = data
    for filter_on, kept in (("accuracy", 1.0), ("total", 2.0)):
        trainer = make_trainer(tiny_vlm, d, rows, [Scripted("format_reward", vary=True), Scripted("accuracy_reward")],
                               max_tries=1, filter_on=filter_on)
        trainer._generate_and_score_completions(batch_of(trainer, [0, 1]))
        assert trainer._metrics["train"]["dynamic_sampling/kept_groups"] == [kept], filter_on
    with pytest.raises(VlmError, match=r"--filter-on accuracy: no accuracy reward among this run's rewards "
                                       r"\(format_reward\).*--filter-on total"):
        filter_column("accuracy", ["format_reward"])
    assert filter_column("total", ["format_reward"]) is None


def test_metrics_once_per_step_over_kept_rows(tiny_vlm, data, tmp_path):
    """One step over tiles 0 (no signal) and 1 (signal), then refills: every metric has one value, over the
    kept rows (a kept group's rewards are 0, 1, 0, 1: reward 0.5, where all rounds' rows would give more),
    and the completions table holds only the kept rows."""
    d, rows = data
    acc = Scripted("accuracy_reward")
    trainer = make_trainer(tiny_vlm, d, rows, [acc], max_tries=3)
    trainer._generate_and_score_completions(batch_of(trainer, [0, 1]))
    m = dict(trainer._metrics["train"])
    assert all(len(v) == 1 for v in m.values()), {k: len(v) for k, v in m.items()}
    seen = [(t, n) for call in acc.calls for t, n in call]
    groups = [seen[i:i + G] for i in range(0, len(seen), G)]
    kept = [g for g in groups if g[0][0] % 2][:2]
    lengths = [n for g in kept for _, n in g]
    assert len(acc.calls) > 1 and len(groups) > len(kept) >= 1
    assert m["dynamic_sampling/tries"] == [float(len(acc.calls))]
    assert m["dynamic_sampling/kept_groups"] == [float(len(kept))]
    assert m["dynamic_sampling/dropped_groups"] == [float(sum(g[0][0] % 2 == 0 for g in groups))]
    assert m["reward"] == [pytest.approx(0.5)] and m["rewards/accuracy_reward/mean"] == [pytest.approx(0.5)]
    assert m["completions/mean_length"] == [pytest.approx(np.mean(lengths))]
    assert m["frac_reward_zero_std"] == [0.0]
    prompts = [tile_of(p[-1]["content"][-1]["text"]) for p in trainer._logs["prompt"]]
    assert sorted(prompts) == sorted(t for g in kept for t, _ in g)


def test_refills_never_repeat_a_prompt_of_the_batch(tiny_vlm, tmp_path):
    """Six prompts, none with signal, batches of two and up to five tries: the three rounds see all six
    prompts once; a fourth round would need a repeat, so the step stops there."""
    rows = write_rows(tmp_path, 6)
    acc = Scripted("accuracy_reward", signal=False)
    trainer = make_trainer(tiny_vlm, tmp_path, rows, [acc], max_tries=5)
    trainer._generate_and_score_completions(batch_of(trainer, [0, 1]))
    prompts = [t for call in acc.calls for t, _ in call[::G]]
    assert sorted(prompts) == [0, 1, 2, 3, 4, 5]
    assert trainer._metrics["train"]["dynamic_sampling/tries"] == [3.0]


def test_refill_order_is_saved_with_the_checkpoint_and_restored(tiny_vlm, data, tmp_path):
    """No group has signal, so every step draws refills: two steps in one go, and one step then a resume
    from its checkpoint for the second, leave the same refill order (the resumed run read it back)."""
    from vlm.dynamic import STATE_FILE

    d, rows = data
    runs = {}
    for name, steps in (("straight", [2]), ("resumed", [1, 2])):
        for max_steps in steps:
            t = make_trainer(tiny_vlm, d, rows, [Scripted("accuracy_reward", signal=False)], max_tries=3,
                             max_steps=max_steps, save_strategy="steps", save_steps=1,
                             output_dir=str(tmp_path / name))
            ckpt = tmp_path / name / "checkpoint-1"
            t.train(resume_from_checkpoint=str(ckpt) if max_steps == 2 and name == "resumed" else None)
        assert (ckpt / STATE_FILE).is_file()
        assert t._metrics["train"] == {} and t.state.global_step == 2
        runs[name] = t._refills.state_dict()
    fresh = make_trainer(tiny_vlm, d, rows, [Scripted("accuracy_reward")])._refills.state_dict()
    assert runs["resumed"] == runs["straight"] != fresh


def test_trl_internals_and_pin():
    """The trl methods DynamicSamplingTrainer overrides keep their parameters, the installed trl is the one
    pyproject pins, and a changed method is named in the error."""
    import tomllib

    import trl
    from packaging.requirements import Requirement
    from trl import GRPOTrainer

    from vlm.dynamic import TRL_INTERNALS, check_trl_internals
    from vlm.prompts import VlmError

    check_trl_internals()
    pins = [Requirement(x) for x in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    (pin,) = [r for r in pins if r.name == "trl"]
    assert pin.specifier.contains(trl.__version__) and "<" in str(pin.specifier), str(pin)
    assert "_generate_and_score_completions" in TRL_INTERNALS

    class Changed(GRPOTrainer):
        def _generate(self, prompts, images):
            return None

    with pytest.raises(VlmError, match=r"GRPOTrainer._generate\('self', 'prompts', 'images'\) changed from "
                                       r"\('self', 'prompts'\).*trl>=1.16,<1.17"):
        check_trl_internals(Changed)


_TWO_PROCESS_SCRIPT = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from pathlib import Path
from test_vlm_dynamic import Scripted, make_trainer, write_rows
model, d, out = (Path(a) for a in sys.argv[2:5])
acc = Scripted("accuracy_reward")
t = make_trainer(model, d, json.loads((d / "rows.json").read_text()), [acc], max_tries=3, output_dir=str(out))
t.train()
rank = int(os.environ["RANK"])
table = [p[-1]["content"][-1]["text"] for p in t._logs["prompt"]]
(out / f"rank{rank}.json").write_text(json.dumps({"calls": acc.calls, "log": t.state.log_history, "table": table}))
"""


def test_two_processes_log_each_metric_once_over_every_processs_kept_rows(tiny_vlm, tmp_path):
    """Two gloo processes, one step, eight prompts (odd tiles carry signal), up to three tries: the logged
    counts are the sums over both processes, the reward and completion lengths are those of both
    processes' kept rows, the completions table holds exactly those rows, and no prompt is generated twice
    in the step on either process (refills are split between processes without overlap)."""
    rows = write_rows(tmp_path, 8)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                        str(Path(__file__).parent), str(tiny_vlm), str(tmp_path), str(out)],
                       capture_output=True, text=True, timeout=240, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]
    want, kept, dropped, filled, tries = 2, [], 0, 0, set()
    seen = []
    for rank in ranks:
        groups = [call[i:i + G] for call in rank["calls"] for i in range(0, len(call), G)]
        seen += [g[0][0] for g in groups]
        mine = [g for g in groups if g[0][0] % 2][:want]
        kept += mine
        dropped += sum(g[0][0] % 2 == 0 for g in groups)
        filled += want - len(mine)
        tries.add(len(rank["calls"]))
    assert len(tries) == 1                                      # the same tries on every process
    (e,) = [e for e in ranks[0]["log"] if "dynamic_sampling/tries" in e]
    assert e["dynamic_sampling/tries"] == tries.pop() and e["dynamic_sampling/dropped_groups"] == dropped
    assert e["dynamic_sampling/kept_groups"] == len(kept) >= 1 and e["dynamic_sampling/filled_groups"] == filled
    assert e["reward"] == pytest.approx(0.5)
    assert e["completions/mean_length"] == pytest.approx(np.mean([n for g in kept for _, n in g]))
    assert sorted(tile_of(q) for q in ranks[0]["table"]) == sorted(t for g in kept for t, _ in g)
    assert len(seen) == len(set(seen))                          # no prompt twice in the step


def test_cli_filter_on_reaches_the_run(tiny_vlm, data, tmp_path, capsys):
    """`vlm train --stage dapo --filter-on total` records the filter in the run's settings (default:
    accuracy); a step that kept no group logs reward None and the report still prints; a wrong value is one
    argparse line."""
    from vlm.cli import main

    d, rows = data
    (d / "mcq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["-q", "train", "--stage", "dapo", "--data", str(d / "mcq.jsonl"), "--model", str(tiny_vlm),
            "--max-steps", "1", "--max-completion-length", "4", "--max-tries", "1"]
    assert main([*base, "--out", str(tmp_path / "total"), "--filter-on", "total"]) == 0
    assert "dapo: 1 steps" in capsys.readouterr().out
    s = json.loads((tmp_path / "total" / "train_summary.json").read_text())
    assert s["settings"]["filter_on"] == "total"
    (e,) = [e for e in s["log"] if "dynamic_sampling/tries" in e]
    assert e["dynamic_sampling/kept_groups"] + e["dynamic_sampling/filled_groups"] == 2
    if e["dynamic_sampling/kept_groups"] == 0:
        assert e["reward"] is None
    with pytest.raises(SystemExit) as exit_:
        main([*base, "--out", str(tmp_path / "x"), "--filter-on", "format"])
    assert exit_.value.code == 2 and "--filter-on: invalid choice: 'format'" in capsys.readouterr().err
