"""Loading a vision-language model and generating from it: the one place `vlm` calls transformers'
Auto classes, so `vlm train`, `vlm eval` and `vlm ask` read every `--model` the same way.

`--model` is a local model folder (one `vlm make-tiny` or `vlm train` wrote, or a downloaded checkpoint),
loaded as is, or a Hugging Face hub id (`Qwen/Qwen2.5-VL-3B-Instruct`, `WenchuanZhang/Patho-R1-3B`),
found in the hub cache first (`wsi.encoders.weights.resolve_hub`: nothing waits on the network) and
downloaded by transformers when the hub is reachable; offline and not cached, it fails at once with the
fix, as the encoders do. `trust_remote_code` stays off unless asked for.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from wsi.errors import EncoderError
from wsi.runtime import resolve_device

from .prompts import VlmError

log = logging.getLogger(__name__)


def resolve_dtype(dtype: str | Any = "auto", device: str = "cpu"):
    """The torch dtype to load with. "auto": bf16 on a GPU that supports it, else fp32 (bf16 on a CPU
    makes steps slower, not faster); "bf16"/"bfloat16", "fp16"/"float16", "fp32"/"float32", or a torch dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype == "auto":
        on_gpu = str(device).startswith("cuda") and torch.cuda.is_available()
        return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in names:
        raise VlmError(f"dtype {dtype!r}: give auto, bf16, fp16 or fp32")
    return names[dtype]


def model_source(model: str | Path) -> str:
    """Where to load `model` from: a local folder (it must hold config.json), the folder of a cached hub
    snapshot, or the hub id itself when it is not cached but the hub can be reached. Offline and not
    cached: VlmError with the fix, at once."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise VlmError(f"{path}: not a model folder (no config.json); give a folder written by `vlm make-tiny`, "
                           "`vlm train` or `huggingface-cli download`, or a hub id")
        return str(path)
    text = str(model)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise VlmError(f"--model {text}: no such model folder, and not a hub id (owner/name); give a model folder "
                       "(`vlm make-tiny DIR` makes a tiny one) or a hub id such as Qwen/Qwen2.5-VL-3B-Instruct")
    from wsi.encoders.weights import resolve_hub

    try:
        folder = resolve_hub(text, name=text)
    except EncoderError:
        from huggingface_hub import constants

        raise VlmError(f"model {text!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub "
                       f"cannot be reached. Download it where there is network (`huggingface-cli download {text}`) "
                       "and copy the cache here, or pass a local model folder with --model DIR") from None
    return str(folder) if folder is not None else text


def load_model(model: str | Path, *, dtype: str | Any = "auto", device: str = "auto",
               trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, processor): `AutoModelForImageTextToText` and `AutoProcessor` from a model folder or a hub id
    (see `model_source`), in bf16 on a GPU and fp32 on a CPU by default, on `device`, in eval mode.

    `device` goes through `wsi.runtime.resolve_device`: "auto" / "cuda" under torchrun or accelerate mean this
    process's GPU (cuda:$LOCAL_RANK), so ranks never all load onto GPU 0; a GPU asked for where there is none
    is a PathmilError, before anything is read."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    source = model_source(model)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        net = AutoModelForImageTextToText.from_pretrained(source, dtype=torch_dtype,
                                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise VlmError(f"{model}: cannot load it as an image-text-to-text model ({first}); give a vision-language "
                       "model folder or hub id (Qwen2.5-VL and its fine-tunes)") from None
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise VlmError(f"{model}: its processor ({type(processor).__name__}) has no image processor and tokenizer; "
                       "give a vision-language model")
    net.to(device).eval()
    log.info("loaded %s (%s, %.1fM parameters) on %s in %s", model, type(net).__name__,
             sum(p.numel() for p in net.parameters()) / 1e6, device, torch_dtype)
    return net, processor


def generate(model: Any, processor: Any, messages_batch: Sequence[list[dict]],
             images_batch: Sequence[Sequence[Any]] | None, max_new_tokens: int = 256,
             temperature: float = 0.0) -> list[str]:
    """The completions of a batch of prompts, one batched `generate` call (the prompts left-padded).

    messages_batch: per item, trl's conversational messages (`prompts.build_messages`); images_batch: per
    item, its PIL images in the order of the {"type": "image"} entries (None: no images). temperature 0:
    greedy; > 0: sampling at that temperature. Returns the decoded new tokens of each item, special tokens
    removed (the <think>/<answer> tags are kept)."""
    import torch

    n = len(messages_batch)
    images_batch = list(images_batch) if images_batch is not None else [[] for _ in range(n)]
    if len(images_batch) != n:
        raise VlmError(f"{n} prompts but {len(images_batch)} image lists; give one list (maybe empty) per prompt")
    for i, (msgs, imgs) in enumerate(zip(messages_batch, images_batch)):
        want = sum(1 for m in msgs if isinstance(m.get("content"), list)
                   for c in m["content"] if isinstance(c, dict) and c.get("type") == "image")
        if want != len(imgs):
            raise VlmError(f"prompt {i} has {want} image entries but {len(imgs)} images were given")
    if n == 0:
        return []
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages_batch]
    flat = [img for imgs in images_batch for img in imgs]
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"           # decoder-only batches: every prompt must end where generation starts
    try:
        enc = processor(text=texts, images=flat or None, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side
    enc = enc.to(model.device)
    if "pixel_values" in enc:
        enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
    sample = temperature is not None and temperature > 0
    kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "do_sample": sample,
                              "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    if sample:
        kwargs.update(temperature=float(temperature), top_p=1.0, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)
    new = out[:, enc["input_ids"].shape[1]:]
    return tok.batch_decode(new, skip_special_tokens=True)


__all__ = ["resolve_dtype", "model_source", "load_model", "generate"]
