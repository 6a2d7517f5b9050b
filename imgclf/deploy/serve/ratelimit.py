"""A token bucket per client address, for routes that cost more than they
should be asked for at will (/v1/similar returns training images).

Written here rather than taken from a library: the `limits` package (behind
slowapi) offers fixed and moving windows, not a token bucket, and needs a
storage backend; this is a dict and a lock."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict


class TokenBuckets:
    """`per_minute` requests a minute from each address, in bursts of up to
    `burst`. At most `max_clients` addresses are remembered: the one seen
    least recently is forgotten first (its bucket has refilled, or nearly)."""

    def __init__(self, per_minute: float, burst: int, max_clients: int = 10_000):
        self.rate, self.burst, self.max_clients = per_minute / 60.0, max(1, burst), max_clients
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # address -> (tokens, when)
        self.lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, client: str, now: float | None = None) -> float:
        """0 when `client` may go ahead (a token is spent), else the seconds
        until its next token."""
        if not self.enabled:
            return 0.0
        now = time.monotonic() if now is None else now
        with self.lock:
            tokens, when = self.buckets.pop(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - when) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            self.buckets[client] = (tokens - 1 if wait == 0 else tokens, now)
            while len(self.buckets) > self.max_clients:
                self.buckets.popitem(last=False)
            return wait


def retry_after(wait_s: float) -> str:
    """The Retry-After header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(wait_s)))
