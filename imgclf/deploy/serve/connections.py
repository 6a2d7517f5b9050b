"""Connection-level limits that uvicorn lacks, as a subclass of its h11 protocol.

uvicorn's keep-alive timeout only starts after a first response, and its
--limit-concurrency counts every open socket: one host opening 256 sockets
that send nothing (or a header line every few seconds) makes every other
request a 503, before any authentication. gunicorn, hypercorn and nginx bound
this with a header-read timeout (nginx: client_header_timeout) and a
per-client connection limit (nginx: limit_conn); uvicorn has neither, so
this subclass adds them, keeping all of uvicorn's parsing:

- header deadline: a connection must deliver a complete request head within
  `header_timeout_s` of opening, or of its previous response; trickling
  bytes does not extend it (uvicorn cancels its keep-alive timer on any byte);
- per-client cap: more than `per_client` open connections from one address
  get a JSON 503 and are closed at once (0 turns it off, for a reverse proxy
  that connects from one address and enforces its own);
- eviction: when all `--max-connections` are open, the connection that has
  waited longest without sending a request head is closed to make room, so
  idle sockets from many addresses cannot starve requests either;
- h11's framing errors get the server's JSON error shape, not plain text.
"""

from __future__ import annotations

import json
from collections import Counter

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

# Per process (each --workers process counts its own connections).
LIMITS = {"header_timeout_s": 10.0, "per_client": 64}
_per_host: Counter = Counter()
_waiting: dict = {}  # connections with no request head yet, oldest first (dicts keep insertion order)


def configure(header_timeout_s: float, per_client: int) -> None:
    LIMITS.update(header_timeout_s=header_timeout_s, per_client=per_client)


def canned(status: int, reason: str, code: str, message: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 response that closes the connection, in the API's error shape."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n{extra}\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, a per-client cap and eviction."""

    _host = None
    _header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._host = self.client[0] if self.client else None
        _per_host[self._host] += 1
        cap = LIMITS["per_client"]
        if cap and _per_host[self._host] > cap:
            transport.write(canned(503, "Service Unavailable", "too_many_connections",
                                   f"more than {cap} open connections from your address; reuse connections "
                                   "(keep-alive) or open fewer at once", "retry-after: 1\r\n"))
            self._let_go()
            return
        self._evict_if_full()
        self._arm_header_deadline()

    def connection_lost(self, exc) -> None:
        _per_host[self._host] -= 1
        if _per_host[self._host] <= 0:
            del _per_host[self._host]
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request head is in
            self._disarm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_deadline()  # the next request's head has the same deadline

    def send_400_response(self, msg: str) -> None:
        """h11 could not parse the request (framing, header size): the JSON error shape."""
        self.transport.write(canned(400, "Bad Request", "bad_http", f"{msg} (malformed HTTP framing or request "
                                    "head over 64 KiB); send a well-formed HTTP/1.1 request"))
        self.transport.close()

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_timer = self.loop.call_later(LIMITS["header_timeout_s"], self._header_deadline_passed)
        _waiting[self] = None

    def _disarm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        _waiting.pop(self, None)

    def _header_deadline_passed(self) -> None:
        self._header_timer = None
        _waiting.pop(self, None)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._let_go()  # idle or too slow: nginx closes these without an answer too

    def _evict_if_full(self) -> None:
        limit = self.limit_concurrency
        if limit and len(self.connections) >= limit:
            oldest = next((p for p in _waiting if p is not self), None)
            if oldest is not None:
                oldest._let_go()

    def _let_go(self) -> None:
        """Close now, and stop counting against --max-connections at once:
        connection_lost comes a loop turn later, and a burst of refused
        connections would otherwise make uvicorn answer real requests 503."""
        self._disarm_header_deadline()
        self.connections.discard(self)
        self.transport.close()
