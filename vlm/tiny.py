"""`vlm make-tiny OUT_DIR`: a tiny Qwen2.5-VL (0.42M parameters, random weights) saved as a
normal model folder, so the tests and the demo run every stage of the reasoner on a CPU in seconds.

Everything in the folder is what a real Qwen2.5-VL checkpoint has, only smaller: `config.json` +
`model.safetensors` (Qwen2_5_VLForConditionalGeneration), a byte-level BPE tokenizer trained here, offline,
with `tokenizers` (Qwen2's pre-tokenizer and special tokens), the real Qwen2.5-VL chat template, and the
Qwen2-VL image / video processors with small pixel bounds (a 56x56 tile is 4x4 patches, 4 image tokens).
`pathmil_defaults.json` holds the training defaults that suit a model this small (`vlm train` reads it).

Sizes: text and vision hidden 64, 2 layers each, 4 heads (head_dim 16, so the multimodal RoPE sections
[2, 3, 3] sum to head_dim / 2), the vision tower's full-attention block is its last (index 1 of 2).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wsi.runtime import atomic_write_json

from .prompts import ANSWER_CLOSE, ANSWER_OPEN, SYSTEM_PROMPT, THINK_CLOSE, THINK_OPEN, VlmError

# Qwen2.5-VL-3B/7B-Instruct's chat_template (tokenizer_config.json / chat_template.json), verbatim.
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-VL's special tokens (the processor and the chat template need these), then the reasoning tags
# as ordinary added tokens: one id each, and kept when decoding with skip_special_tokens=True.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
TAG_TOKENS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer uses the same).
_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                      r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

_WORDS = """tumor tumour carcinoma malignant epithelium cancerous tissue normal benign non-neoplastic healthy stroma
adenocarcinoma squamous cell lymphocytes lymphocyte necrosis mitosis mitotic figures nuclei nucleus nuclear
pleomorphism hyperchromatic chromatin nucleoli cytoplasm eosinophilic basophilic gland glands glandular lumen
crypt crypts mucosa submucosa muscle fat adipose fibrosis fibrous collagen vessel vessels inflammation
inflammatory infiltrate invasive in situ metastasis lymph node architecture disorganised crowded atypia atypical
grade differentiated poorly moderately well H&E hematoxylin eosin stained section slide tile patch image
microscopy histology histopathology pathology pathologist magnification high low region area shows showing
which what does this the a an of with and or not no is are in on at by from as it its that these those other
option options answer question reasoning step first then so therefore because rule out rules excludes eliminate
consistent inconsistent features feature seen see under microscope sample stroma cells cell density dense
sparse pink purple blue staining pattern sheets nests cords solid cribriform papillary tubular
system user assistant You Your answer step-by-step final format
""".split()


def _corpus() -> list[str]:
    """Sentences in the words of the prompts, the captions and the MCQs that `vlm data` writes."""
    from clip.captions import EVAL_CLASSES, EVAL_TEMPLATES, TRAIN_SYNONYMS, TRAIN_TEMPLATES

    from .data import FINDINGS

    phrases = sorted({p for d in (TRAIN_SYNONYMS, EVAL_CLASSES) for v in d.values() for p in v})
    lines = [SYSTEM_PROMPT, " ".join(_WORDS), "A. B. C. D. E. (A) (B) (C) (D) 0 1 2 3 4 5 6 7 8 9"]
    lines += [t.format(p) for t in (*TRAIN_TEMPLATES, *EVAL_TEMPLATES) for p in phrases]
    lines += [f"Which tissue does this tile show?\nA. {p}\nB. {q}" for p in phrases for q in phrases if p != q]
    lines += [f"The tile shows {f}: {p}. No {g}, so option B ({q}) is ruled out." for f in FINDINGS.values()
              for g in FINDINGS.values() for p in phrases for q in phrases if p != q and f != g]
    return lines * 4


def build_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained offline with `tokenizers` on `_corpus()`, wrapped as
    transformers' `Qwen2Tokenizer` (Qwen2's pre-tokenizer, NFC normaliser, byte-level decoder) with
    Qwen2.5-VL's special tokens and the reasoning tags."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bpe = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    qt = Qwen2Tokenizer(vocab=bpe["vocab"], merges=merges, unk_token=None, bos_token=None,
                        eos_token="<|im_end|>", pad_token="<|endoftext|>", errors="replace")
    qt.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    qt.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    qt.model_max_length = 32768
    return qt


def tiny_config(vocab_size: int, token_ids: dict[str, int], hidden: int = 64, layers: int = 2, heads: int = 4):
    """A Qwen2_5_VLConfig with text and vision hidden size `hidden`, `layers` layers each, `heads` heads."""
    from transformers import Qwen2_5_VLConfig

    head_dim = hidden // heads
    if head_dim % 8:
        raise VlmError(f"hidden {hidden} / heads {heads} = head_dim {head_dim}; give a head_dim divisible by 8")
    half = head_dim // 2          # multimodal RoPE: temporal, height, width sections sum to head_dim / 2
    mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1), max_position_embeddings=4096,
                max_window_layers=layers, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
                bos_token_id=token_ids["<|endoftext|>"], eos_token_id=token_ids["<|im_end|>"],
                pad_token_id=token_ids["<|endoftext|>"])
    vision = dict(depth=layers, hidden_size=hidden, intermediate_size=2 * hidden, num_heads=heads,
                  out_hidden_size=hidden, fullatt_block_indexes=[layers - 1], window_size=112, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                            image_token_id=token_ids["<|image_pad|>"], video_token_id=token_ids["<|video_pad|>"],
                            vision_start_token_id=token_ids["<|vision_start|>"],
                            vision_end_token_id=token_ids["<|vision_end|>"])


# Measured on the tests' toy MCQ (assistant-only SFT: 1.0 held-out accuracy in ~40 steps at lr 3e-3, batch 8; GRPO at
# lr 3e-4, 4 generations, beta 0 raises the reward; lr 1e-3 games it). Completions: 64 tokens, as the SFT
# targets `vlm data` writes are 42-47 tokens of this tokenizer (40 would truncate some, and truncated
# completions score 0 on format).
TINY_DEFAULTS: dict[str, Any] = {
    "caption": {"lr": 3e-3, "batch_size": 8, "epochs": 3},
    "sft": {"lr": 3e-3, "batch_size": 8, "epochs": 5},
    "grpo": {"lr": 3e-4, "batch_size": 8, "num_generations": 4, "max_completion_length": 64, "beta": 0.0,
             "temperature": 1.0},
    "dapo": {"lr": 3e-4, "batch_size": 8, "num_generations": 4, "max_completion_length": 64, "beta": 0.0,
             "temperature": 1.0},
}
DEFAULTS_FILE = "pathmil_defaults.json"


def make_tiny(out_dir: str | Path, *, seed: int = 0, hidden: int = 64, layers: int = 2,
              min_pixels: int = 56 * 56, max_pixels: int = 112 * 112) -> dict[str, Any]:
    """Write a tiny random-weight Qwen2.5-VL model folder to `out_dir` (seeded: the same seed gives the
    same weights) that `AutoModelForImageTextToText` / `AutoProcessor.from_pretrained` load. Images are
    resized to between `min_pixels` and `max_pixels` (multiples of 28 px a side). Returns a summary:
    out, parameters, bytes, vocab_size."""
    import torch
    from transformers import (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLImageProcessor,
                              Qwen2VLVideoProcessor)

    out = Path(out_dir)
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise VlmError(f"{out}: exists and is not an empty folder; give a new OUT_DIR")
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (*SPECIAL_TOKENS, *TAG_TOKENS)}
    config = tiny_config(len(tokenizer), ids, hidden=hidden, layers=layers)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    gen = model.generation_config
    gen.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    gen.pad_token_id, gen.bos_token_id = ids["<|endoftext|>"], ids["<|endoftext|>"]
    gen.do_sample, gen.temperature, gen.top_p, gen.top_k = False, None, None, None
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, min_pixels=min_pixels, max_pixels=max_pixels),
        video_processor=Qwen2VLVideoProcessor(size=size, min_pixels=min_pixels, max_pixels=max_pixels),
        tokenizer=tokenizer, chat_template=QWEN25_VL_CHAT_TEMPLATE)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # transformers 5 keeps the image processor inside processor_config.json; older readers (transformers 4,
    # vLLM) look for preprocessor_config.json
    processor.image_processor.save_pretrained(out)
    atomic_write_json(out / DEFAULTS_FILE, {"note": "training defaults for this tiny model; `vlm train` flags "
                                                    "override them", **TINY_DEFAULTS})
    n_bytes = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return {"out": str(out), "parameters": sum(p.numel() for p in model.parameters()), "bytes": n_bytes,
            "vocab_size": len(tokenizer)}


def read_defaults(model_dir: str | Path) -> dict[str, Any]:
    """The training defaults a model folder carries (`pathmil_defaults.json`), or {} without that file."""
    path = Path(model_dir) / DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise VlmError(f"{path}: not readable JSON ({e}); remake the model folder with `vlm make-tiny`") from None
    return data if isinstance(data, dict) else {}


__all__ = ["QWEN25_VL_CHAT_TEMPLATE", "SPECIAL_TOKENS", "TAG_TOKENS", "TINY_DEFAULTS", "DEFAULTS_FILE",
           "build_tokenizer", "tiny_config", "make_tiny", "read_defaults"]
