"""WebDataset shards of image-caption pairs (`clip shards`), so million-pair corpora stream from disk
instead of sitting in memory (Patho-R1 fed PathoCLIP 5,000-sample shards the same way).

    OUT/shard-000000.tar    per sample <key>.jpg (JPEG), <key>.txt (one caption), <key>.json (where from)
    OUT/sizes.json          samples per shard: open_clip_train's convention (`--train-num-samples` then
                            comes from it), read by `shard_count`

An image with several captions is written once per caption: a shard sample is one pair, as open_clip
trains on them. Image files that are already RGB JPEG are copied byte for byte (no second compression);
tiles and other files are encoded at JPEG quality 95.
"""
from __future__ import annotations

import functools
import io
import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import webdataset as wds

from wsi.paths import open_data_file
from wsi.runtime import atomic_write_json
from wsi.store import TileStore

from .data import Captions, CaptionsError

SHARD_PATTERN = "shard-%06d.tar"


def _jpeg(rgb: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _file_jpeg(path: str, quality: int) -> bytes:
    from PIL import Image

    try:
        with open_data_file(path) as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG" and im.mode == "RGB":
                return data
            return _jpeg(np.asarray(im.convert("RGB")), quality)
    except Exception as e:
        raise CaptionsError(f"{path}: cannot read the image ({type(e).__name__}: {e}); fix the file or drop its "
                            "rows from the captions CSV") from None


def _encoded(captions: Captions, store: TileStore | None, quality: int, chunk: int = 256) -> Iterator[bytes]:
    """JPEG bytes of every image, in order; tiles read slide by slide, `chunk` images at a time."""
    for start in range(0, len(captions.images), chunk):
        keys = captions.images[start:start + chunk]
        out: list[bytes | None] = [None] * len(keys)
        by_slide: dict[str, list[int]] = {}
        for j, k in enumerate(keys):
            if k[0] == "tile":
                by_slide.setdefault(k[1], []).append(j)
            else:
                out[j] = _file_jpeg(k[1], quality)
        for sid, js in by_slide.items():
            for j, tile in zip(js, store[sid].read_tiles([keys[j][2] for j in js])):  # type: ignore[index]
                out[j] = _jpeg(tile, quality)
        yield from out  # type: ignore[misc]


def write_shards(captions: Captions, out_dir: str | Path, per_shard: int = 5000, *,
                 store: TileStore | str | Path | None = None, quality: int = 95, overwrite: bool = False) -> list[Path]:
    """Write `captions` as WebDataset shards OUT/shard-%06d.tar of `per_shard` pairs each (through
    webdataset's ShardWriter) and OUT/sizes.json; returns the shard paths. A folder that already holds
    shards is refused unless `overwrite` (then the old shards go first)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob("shard-*.tar"))
    if old and not overwrite:
        raise CaptionsError(f"{out}: already holds {len(old)} shards; choose an empty folder or overwrite them "
                            "(--overwrite)")
    for p in old:
        p.unlink()
    st = store if store is not None else captions.store_path
    if isinstance(st, (str, Path)) and any(k[0] == "tile" for k in captions.images):
        st = TileStore.open(st, readonly=True)
    written: list[str] = []
    n = 0
    with wds.ShardWriter(str(out / SHARD_PATTERN), maxcount=int(per_shard), verbose=0, post=written.append) as sink:
        for pos, jpg in enumerate(_encoded(captions, st, quality)):  # type: ignore[arg-type]
            key = captions.images[pos]
            where = ({"slide_id": key[1], "tile": int(key[2])} if key[0] == "tile" else
                     {"image_path": key[1], "group": captions.group_of(pos)})
            for text in captions.texts_of(pos):
                sink.write({"__key__": f"{n:09d}", "jpg": jpg, "txt": text, "json": where})
                n += 1
    sizes = {Path(p).name: min(per_shard, n - i * per_shard) for i, p in enumerate(written)}
    atomic_write_json(out / "sizes.json", sizes)
    return [Path(p) for p in written]


def shard_urls(pattern_or_dir: str | Path | list) -> list[str]:
    """The shard files of a folder (shard-*.tar, else *.tar, sorted), a brace pattern
    ("out/shard-{000000..000009}.tar", "::" joins several) or a list; local files must exist."""
    from webdataset.shardlists import expand_urls

    if isinstance(pattern_or_dir, (list, tuple)):
        urls = [str(u) for u in pattern_or_dir]
    elif Path(pattern_or_dir).is_dir():
        d = Path(pattern_or_dir)
        urls = [str(p) for p in (sorted(d.glob("shard-*.tar")) or sorted(d.glob("*.tar")))]
        if not urls:
            raise CaptionsError(f"{d}: no .tar shards in this folder; write them with `clip shards`")
    else:
        urls = expand_urls(str(pattern_or_dir))
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if missing or not urls:
        n = f" ({len(missing)} of {len(urls)} missing)" if len(missing) > 1 else ""
        raise CaptionsError(f"{missing[0] if missing else pattern_or_dir}: no such shard{n}; give a shard folder, "
                            "a .tar or a brace pattern like out/shard-{000000..000009}.tar")
    return urls


def shard_count(pattern_or_dir: str | Path | list) -> int | None:
    """Samples in the shards, from their folder's sizes.json (None when a shard is not listed there)."""
    urls = shard_urls(pattern_or_dir)
    try:
        sizes = json.loads((Path(urls[0]).parent / "sizes.json").read_text())
        return sum(int(sizes[Path(u).name]) for u in urls)
    except (OSError, KeyError, ValueError):
        return None


def _keep(x):
    return x


def _resample_seed(seed: int) -> int:
    """Per rank and worker (webdataset's rank * 1000 + worker), offset by the run's seed."""
    from webdataset.utils import pytorch_worker_seed

    return seed * 100_003 + pytorch_worker_seed()


class _RankBatches:
    """A pipeline stage keeping, of a stream cut into batches of `batch_size`, the batches of this
    (rank, DataLoader worker): whole batches of the one-process run, dealt round-robin, so validation
    over all ranks sees every pair once and scores the same batches as one process."""

    def __init__(self, batch_size: int, rank: int, world: int):
        self.b, self.rank, self.world = batch_size, rank, world

    def __call__(self, src):
        from webdataset.utils import pytorch_worker_info

        _, _, worker, workers = pytorch_worker_info()
        mine, every = self.rank * workers + worker, self.world * workers
        for k, sample in enumerate(src):
            if (k // self.b) % every == mine:
                yield sample


class ShardPairs(wds.DataPipeline):
    """The IterableDataset `shard_pairs` returns; `set_epoch(epoch)` before each epoch's iterator."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch.set_value(int(epoch))


def shard_pairs(pattern_or_dir: str | Path | list, transform: Callable | None = None, *, shuffle: int = 1000,
                seed: int = 0, epoch_samples: int | None = None, resample: bool = False,
                split_by_node: bool = True, rank_batches: tuple[int, int, int] | None = None) -> ShardPairs:
    """A streaming IterableDataset of (transform(PIL RGB image), caption) pairs over the shards, built
    from open_clip_train's webdataset pipeline pieces: shard list (or `ResampledShards2` with
    `resample`: shards drawn with replacement, for fewer shards than ranks x workers), shard shuffle
    (`detshuffle2`: the same order on every rank), split_by_node (torchrun ranks read their own
    shards), split_by_worker, tar -> samples, sample shuffle (`detshuffle2`, buffer `shuffle`), decode,
    to_tuple("jpg", "txt"), map the transform. `shuffle` 0 keeps file order. Shuffles are seeded by
    (seed, epoch): `set_epoch` changes them (the epoch is shared with DataLoader workers).

    `epoch_samples`: each DataLoader worker of each rank yields exactly this many pairs per epoch
    (webdataset's `with_epoch`; a rank whose shards hold fewer starts them again), so every rank runs
    the same number of full batches. `rank_batches=(batch_size, rank, world)` with `split_by_node`
    False: every rank reads all shards and keeps its whole batches (validation). A corrupt sample is
    skipped with a warning (webdataset's warn_and_continue)."""
    from open_clip_train.data import ResampledShards2, SharedEpoch, detshuffle2

    urls = shard_urls(pattern_or_dir)
    handler = wds.warn_and_continue
    epoch = SharedEpoch(0)
    if resample:
        stages: list = [ResampledShards2("::".join(urls), deterministic=True, epoch=epoch,
                                         worker_seed=functools.partial(_resample_seed, seed))]
    else:
        stages = [wds.SimpleShardList(urls)]
        if shuffle:
            stages.append(detshuffle2(bufsize=len(urls), initial=len(urls), seed=seed, epoch=epoch))
        if split_by_node:
            stages.append(wds.split_by_node)
        if rank_batches is None:
            stages.append(wds.split_by_worker)
    stages.append(wds.tarfile_to_samples(handler=handler))
    if rank_batches is not None:
        stages.append(_RankBatches(*rank_batches))
    if shuffle:  # another seed than the shard order's, so the two draws are not the same sequence
        stages.append(detshuffle2(bufsize=int(shuffle), initial=min(int(shuffle), 100), seed=seed + 7919,
                                  epoch=epoch))
    stages += [wds.decode("pilrgb", handler=handler), wds.to_tuple("jpg", "txt", handler=handler),
               wds.map_tuple(transform or _keep, _keep, handler=handler)]
    ds = ShardPairs(*stages)
    ds.epoch = epoch
    if epoch_samples:
        ds.with_epoch(int(epoch_samples))
    return ds
