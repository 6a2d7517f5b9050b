"""A few DistributedDataParallel steps on real images, with imgclf's own
train_one_epoch, Dist helpers and loader; run by tests/test_distributed.py.

  torchrun --nproc-per-node 2 tests/dist_steps.py DATA OUT.pt   (DDP, per-rank batch 8)
  python tests/dist_steps.py DATA OUT.pt                         (one process, the same global batches of 16)

The network has no batch norm: with it, two processes of 8 normalise over
other statistics than one of 16 (that is what --sync-bn is for on CUDA), so
only a network without it can show that DDP takes the very same steps.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from imgclf.data.datasets import discover
from imgclf.data.loading import ImageDataset, make_loader
from imgclf.data.preprocess import Preprocess, eval_transform, normalize
from imgclf.training.distributed import init_distributed
from imgclf.training.loop import train_one_epoch

PER_RANK, WORLD, EPOCHS = 8, 2, 2


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))


class GlobalBatches(torch.utils.data.Sampler):
    """One process: step t's batch is rank 0's batch t followed by rank 1's,
    exactly the 16 images the two DDP processes see together at step t."""

    def __init__(self, ds):
        self.ranks = [torch.utils.data.DistributedSampler(ds, WORLD, r, shuffle=True, seed=0) for r in range(WORLD)]

    def set_epoch(self, e: int) -> None:
        for s in self.ranks:
            s.set_epoch(e)

    def __iter__(self):
        orders = [list(s) for s in self.ranks]
        for i in range(0, len(orders[0]), PER_RANK):
            for o in orders:
                yield from o[i:i + PER_RANK]

    def __len__(self) -> int:
        return sum(len(s) for s in self.ranks)


def main(data: str, out: str) -> None:
    d, device = init_distributed("cpu")
    s = discover(data)
    pp = Preprocess(size=32, resize="squash")
    ds = ImageDataset(s.root, s.train[:96], eval_transform(pp))
    model = net()
    if d.enabled:
        model = nn.parallel.DistributedDataParallel(model)
        sampler, batch = torch.utils.data.DistributedSampler(ds, d.world, d.rank, shuffle=True, seed=0), PER_RANK
    else:
        sampler, batch = GlobalBatches(ds), PER_RANK * WORLD
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        batches = ((x, y) for x, y, _, _ in make_loader(ds, batch, False, 0, sampler=sampler))
        train_one_epoch(model, batches, nn.CrossEntropyLoss(), opt, prepare=lambda x: normalize(x, pp))
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    every = d.gather([params])  # each rank's parameters, for the test to compare
    if d.main:
        torch.save({"params": params, "every_rank": every}, out)
    d.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
