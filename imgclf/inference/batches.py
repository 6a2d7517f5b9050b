"""The batching every predictor shares (classify, detect, segment): inputs
prepared a batch at a time, an unreadable one answered with its reason in
its place instead of failing the batch. No torch here."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np

from imgclf.data.images import BadImage


def as_inputs(inputs) -> list:
    """One source (a path, bytes, PIL image, HxWx3 array) or a list of them -> a list."""
    if isinstance(inputs, (str, os.PathLike, np.ndarray, bytes)) or hasattr(inputs, "getpixel"):
        return [inputs]
    return list(inputs)


def blank_answers(inputs: list) -> list[dict]:
    """One answer per input to fill in, carrying the path where there is one."""
    return [{"path": str(s)} if isinstance(s, (str, os.PathLike)) else {} for s in inputs]


def prepared_batches(inputs: list, prepare: Callable, batch_size: int, out: list[dict]) -> Iterator[tuple[list[int], list]]:
    """(indices, what `prepare` gave) for each batch's readable inputs; an
    unreadable input gets out[i]["error"] and is left out, and a batch with
    nothing readable is skipped. One batch is in memory at a time."""
    for start in range(0, len(inputs), batch_size):
        ids, xs = [], []
        for i in range(start, min(start + batch_size, len(inputs))):
            try:
                xs.append(prepare(inputs[i]))
            except BadImage as e:
                out[i]["error"] = e.reason
                continue
            ids.append(i)
        if ids:
            yield ids, xs
