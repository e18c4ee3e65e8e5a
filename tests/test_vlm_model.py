"""vlm.tiny / vlm.model: the tiny Qwen2.5-VL folder loads with transformers' Auto classes, its chat
template renders the reasoner's prompts with image pad tokens, batched generation, and the one-line
error for an uncached hub id offline."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vlm.cli import main

    out = tmp_path_factory.mktemp("tiny") / "m"
    assert main(["-q", "make-tiny", str(out)]) == 0
    return out


def _tile(seed: int, size: int = 56):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_make_tiny_is_a_small_normal_model_folder(tiny, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm.tiny import QWEN25_VL_CHAT_TEMPLATE, read_defaults

    names = {p.name for p in tiny.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "pathmil_defaults.json"} <= names
    assert sum(p.stat().st_size for p in tiny.iterdir()) < 10e6
    model = AutoModelForImageTextToText.from_pretrained(tiny)
    proc = AutoProcessor.from_pretrained(tiny)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(proc).__name__ == "Qwen2_5_VLProcessor"
    assert sum(p.numel() for p in model.parameters()) < 1e6
    cfg = model.config
    assert cfg.text_config.hidden_size == cfg.vision_config.hidden_size == 64
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) == 64 // cfg.text_config.num_attention_heads // 2
    assert proc.chat_template == QWEN25_VL_CHAT_TEMPLATE
    tok = proc.tokenizer
    for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
              "<|endoftext|>", "<think>", "</think>", "<answer>", "</answer>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    text = "<think>crowded nuclei</think><answer>B. tumor</answer>"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text     # tags survive decoding
    d = read_defaults(tiny)
    assert d["sft"]["lr"] == 3e-3 and d["grpo"]["lr"] == 3e-4 and d["grpo"]["num_generations"] == 4
    assert read_defaults(tmp_path) == {}
    # the same seed gives the same weights
    from vlm.tiny import make_tiny

    again = make_tiny(tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()
    assert again["parameters"] == sum(p.numel() for p in model.parameters())


def test_chat_template_renders_the_reasoner_prompt_with_image_tokens(tiny):
    from transformers import AutoProcessor

    from vlm.prompts import SYSTEM_PROMPT, build_messages, template_prefills_think

    proc = AutoProcessor.from_pretrained(tiny)
    assert template_prefills_think(proc) is False                  # the real Qwen2.5-VL template
    msgs = build_messages({"question": "Which tissue does this tile show?", "options": ["tumor", "normal tissue"]}, 1)
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Which tissue does this tile show?\nA. tumor\n"
                    "B. normal tissue<|im_end|>\n<|im_start|>assistant\n")
    enc = proc(text=[text], images=[_tile(0)], return_tensors="pt")
    assert enc["image_grid_thw"].tolist() == [[1, 4, 4]]           # 56x56: 4x4 patches of 14 px
    ids = enc["input_ids"][0].tolist()
    assert ids.count(proc.image_token_id) == 4                      # merged 2x2: 4 image tokens
    big = proc(text=[text], images=[_tile(1, 256)], return_tensors="pt")   # a stored 256 px tile: <= 112x112
    assert big["input_ids"][0].tolist().count(proc.image_token_id) == 16


def test_generate_batches_with_left_padding(tiny):
    from vlm.model import generate, load_model
    from vlm.prompts import build_messages

    model, proc = load_model(tiny)
    assert str(model.dtype) == "torch.float32" and model.device.type == "cpu"
    msgs = [build_messages({"question": "Which tissue?", "options": ["tumor", "normal"]}, 1),
            build_messages({"question": "Compare these two tiles of the slide, please, in detail."}, 2)]
    imgs = [[_tile(0)], [_tile(1, 112), _tile(2)]]
    greedy = generate(model, proc, msgs, imgs, max_new_tokens=6)
    assert len(greedy) == 2 and all(isinstance(t, str) for t in greedy)
    assert proc.tokenizer.padding_side == "right"                   # restored after the batch
    # left padding: each prompt generates in the batch exactly what it generates alone
    assert [generate(model, proc, [m], [i], max_new_tokens=6)[0] for m, i in zip(msgs, imgs)] == greedy
    import torch

    torch.manual_seed(0)
    sampled = generate(model, proc, msgs, imgs, max_new_tokens=6, temperature=1.0)
    assert len(sampled) == 2 and all(s.strip() for s in sampled)
    assert generate(model, proc, msgs, imgs, max_new_tokens=6, temperature=1.0) != sampled   # sampling varies
    from vlm.prompts import VlmError

    with pytest.raises(VlmError, match="prompt 1 has 2 image entries but 1 images were given"):
        generate(model, proc, msgs, [[_tile(0)], [_tile(1)]], max_new_tokens=2)


def test_offline_uncached_hub_id_fails_at_once_with_the_fix(monkeypatch, tmp_path, capsys):
    from vlm.cli import main
    from vlm.model import load_model
    from vlm.prompts import VlmError
    from wsi.errors import PathmilError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PathmilError) as e:
        load_model("pathmil-test/no-such-model")
    msg = str(e.value)
    assert "\n" not in msg and "'pathmil-test/no-such-model' is not in the Hugging Face cache" in msg
    assert "huggingface-cli download pathmil-test/no-such-model" in msg and "--model DIR" in msg
    with pytest.raises(VlmError, match="no such model folder"):
        load_model(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlmError, match=r"empty: not a model folder \(no config.json\)"):
        load_model(tmp_path / "empty")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    capsys.readouterr()
    assert main(["make-tiny", str(tmp_path / "full")]) == 2          # one line, exit 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlm: error: ") and "full: exists and is not an empty folder" in err and "\n" not in err


def test_each_process_loads_onto_its_own_gpu(tiny, monkeypatch):
    """Under torchrun / accelerate (LOCAL_RANK set), "cuda" and "auto" mean this process's GPU, resolved by
    wsi.runtime (one implementation for every package), never a bare "cuda" that puts every rank on GPU 0.
    Without a GPU, asking for one is one line naming the device, for load_model and vlm train alike."""
    import torch

    from vlm.model import load_model
    from vlm.train import setup_device
    from wsi.errors import PathmilError

    if torch.cuda.is_available():
        rank = torch.cuda.device_count() - 1
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        model, _ = load_model(tiny)
        assert model.device == torch.device("cuda", rank) and setup_device()["device"] == f"cuda:{rank}"
        return
    monkeypatch.setenv("LOCAL_RANK", "1")
    for call in (lambda: load_model(tiny, device="cuda"), lambda: setup_device("cuda")):
        with pytest.raises(PathmilError, match=r"^device 'cuda:1' asked for, but torch sees no CUDA GPU; use "):
            call()
