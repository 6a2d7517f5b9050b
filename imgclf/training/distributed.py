"""Several processes, GPUs and machines: PyTorch's own engine, as torchrun sets it up.

`torchrun --nproc-per-node N -m imgclf train DATA ...` starts N copies of
`imgclf train`; torchrun gives each RANK, LOCAL_RANK, WORLD_SIZE and the
rendezvous, and ends them all when one fails. Here we only read that and
join the process group (NCCL on CUDA, gloo on CPU). What each stage does
with several processes (docs/scaling.md):

  features   each rank encodes a disjoint share (items[rank::world]) into the
             shared feature cache, then a barrier; rank 0 trains the head
  images     DistributedDataParallel: each rank a share of every batch,
             gradients averaged; validation gathered so every image counts once
  the rest   rank 0 alone: calibration, thresholds, evaluation, every file

Only rank 0 writes files and logs. Decisions that depend on the clock (early
stopping, the time budget) are made on rank 0 and broadcast, so every rank
stops at the same epoch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from imgclf.errors import ConfigError
from imgclf.log import get_logger
from imgclf.models.registry import resolve_device

log = get_logger(__name__)


def is_main() -> bool:
    """Rank 0, or not distributed (what logs and writes)."""
    return os.environ.get("RANK", "0") == "0"


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.world // max(1, self.local_world))

    def describe(self, per_rank_batch: int) -> dict:
        """What summary.json records of how the run was trained."""
        return {"world_size": self.world, "nodes": self.nodes, "backend": self.backend or "none",
                "per_rank_batch": per_rank_batch, "global_batch": per_rank_batch * self.world}

    def shard(self, seq):
        """This rank's disjoint share: every world-th item from its rank (a
        stride, so each share has the same mix of classes and no padding)."""
        return seq[self.rank::self.world]

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, value):
        """Rank 0's value on every rank (a decision made once)."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, part: list) -> list:
        """Every rank's list, concatenated in rank order, on every rank."""
        if not self.enabled:
            return part
        import torch.distributed as dist

        parts = [None] * self.world
        dist.all_gather_object(parts, part)
        return [x for p in parts for x in p]

    def gather_shards(self, part: list) -> list:
        """The inverse of `shard`: each rank's list -> the whole list, in the
        original order, on every rank."""
        if not self.enabled:
            return part
        import torch.distributed as dist

        parts = [None] * self.world
        dist.all_gather_object(parts, part)
        out = [None] * sum(len(p) for p in parts)
        for r, p in enumerate(parts):
            out[r::self.world] = p
        return out

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join torchrun's process group if there is one; each rank's device
    comes from LOCAL_RANK. Without torchrun: one process, as always."""
    import torch


    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_name)
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
             int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    device = resolve_device(device_name)
    if device.type == "cuda":
        if d.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {d.local_rank} but this machine has {torch.cuda.device_count()} GPU(s)",
                              "run torchrun --nproc-per-node with at most the number of GPUs")
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    d.backend = "nccl" if device.type == "cuda" else "gloo"
    import torch.distributed as dist

    # Long enough for rank 0 to train a head on a million cached features while
    # the others wait at the next collective; a dead rank is torchrun's to notice.
    dist.init_process_group(d.backend, timeout=timedelta(minutes=60),
                            device_id=device if device.type == "cuda" else None)
    return d, device


def launch(argv: list[str], nproc: int) -> int:
    """`imgclf train --nproc-per-node N ...`: hand the same command to
    torch.distributed.run (torchrun) on this machine, minus that flag."""
    from torch.distributed.run import get_args_parser, run

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            rest.append(a)
    # --standalone: a rendezvous on a free local port, so two jobs on one machine never collide.
    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "--module", "imgclf", "train",
                                         *rest])
    try:
        run(args)
    except Exception as e:  # ChildFailedError: torchrun already printed which rank failed and why
        log.error(f"imgclf train: a rank failed ({type(e).__name__}); see above. Continue with `--resume`.")
        return 1
    return 0
