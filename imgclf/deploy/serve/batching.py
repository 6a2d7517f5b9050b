"""Micro-batching: images from concurrent requests share one model call.

Each image goes on an asyncio queue; one task takes up to max_batch of them,
waiting at most wait_s for company, and runs the model once in a worker
thread. A batch of 8 costs far less than 8 batches of 1, so throughput grows
with load."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class Batcher:
    """Collects single images from concurrent requests into batches."""

    def __init__(self, fn, max_batch: int, wait_s: float, metrics, collate=np.stack):
        """collate joins a batch's items for fn (images of one size: stacked)."""
        self.fn, self.max_batch, self.wait_s, self.metrics = fn, max_batch, wait_s, metrics
        self.collate = collate
        self.queue: asyncio.Queue = asyncio.Queue()
        # One thread runs the model: onnxruntime already uses every core inside
        # a call, so two concurrent calls would only fight over them.
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="imgclf-model")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        futs = []
        for x in xs:
            f = loop.create_future()
            self.queue.put_nowait((x, f))
            futs.append(f)
        return list(await asyncio.gather(*futs))

    async def _collect(self) -> list:
        """The next batch: one item, then whatever arrives within wait_s."""
        loop = asyncio.get_running_loop()
        items = [await self.queue.get()]
        deadline = loop.time() + self.wait_s
        while len(items) < self.max_batch:
            if not self.queue.empty():
                items.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self.queue.get(), left))
            except TimeoutError:
                break
        return [(x, f) for x, f in items if not f.cancelled()]  # drop clients that went away

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect()
            if not items:
                continue
            self.metrics.batch(len(items))
            try:
                probs = await loop.run_in_executor(self.pool, self.fn, self.collate([x for x, _ in items]))
            except Exception as e:  # never let one bad batch kill the loop
                for _, f in items:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), p in zip(items, probs):
                if not f.done():
                    f.set_result(p)
