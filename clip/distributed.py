"""The processes of a `clip train` run: start-up (each rank on its own device before the first
collective) and the few collectives the loop needs. Every decision that changes control flow (stop,
best epoch) is taken on rank 0 and broadcast, so all ranks run the same number of forwards and
collectives and none is left waiting in one that the others never enter."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from wsi.runtime import dist_info, resolve_device


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: global rank, world size, local rank and its device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Ranks:
    """Resolve the device (wsi.runtime: "auto"/"cuda" mean this rank's GPU) and, under torchrun, join
    the process group through open_clip_train's `init_distributed_device_so`, which binds the rank to
    `cuda:$LOCAL_RANK` (torch.cuda.set_device) before any collective, so NCCL never piles onto GPU 0."""
    dev = resolve_device(device)
    rank, world, local = dist_info()
    if world <= 1:
        return Ranks(0, 1, 0, dev)
    import torch.distributed as dist

    if dist.is_initialized():  # a caller's own group: only bind the device
        if dev.type == "cuda":
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        return Ranks(dist.get_rank(), dist.get_world_size(), local, dev)
    from open_clip_train.distributed import init_distributed_device_so

    got = init_distributed_device_so(device=str(dev))
    return Ranks(got["global_rank"], got["world_size"], got["local_rank"], torch.device(got["device"]))


def _active(r: Ranks) -> bool:
    return r.world > 1


def broadcast(r: Ranks, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a picklable value made by this run's own processes)."""
    if not _active(r):
        return obj
    import torch.distributed as dist

    box = [obj if r.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(r: Ranks, obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None on the others)."""
    if not _active(r):
        return [obj]
    import torch.distributed as dist

    out: list[Any] | None = [None] * r.world if r.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def mean(r: Ranks, value: float) -> float:
    """The mean of a number over the ranks."""
    if not _active(r):
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=r.device)
    dist.all_reduce(t)
    return float(t.item()) / r.world


def barrier(r: Ranks) -> None:
    if _active(r):
        import torch.distributed as dist

        dist.barrier(device_ids=[r.device.index] if r.device.type == "cuda" else None)
