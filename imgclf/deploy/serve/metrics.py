"""Prometheus metrics in the text format, hand-written: five families, so no
client library is needed. Label values come from fixed sets (known methods,
route templates, error codes), never from the request, so /metrics cannot be
made to grow."""

from __future__ import annotations

LAT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
METHODS = {"GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"}


class Metrics:
    def __init__(self):
        self.requests: dict[tuple[str, str, int], int] = {}
        self.errors: dict[str, int] = {}
        self.latency: dict[str, list[float]] = {}  # per route: bucket counts + [sum, count]
        self.batches = [0] * (len(BATCH_BUCKETS) + 1) + [0, 0]
        self.images = 0

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        """route: the matched route's template, or "other"."""
        k = (method if method in METHODS else "other", route, int(status))
        self.requests[k] = self.requests.get(k, 0) + 1
        h = self.latency.setdefault(route, [0] * (len(LAT_BUCKETS) + 1) + [0.0, 0])
        observe(h, LAT_BUCKETS, seconds)

    def error(self, code: str) -> None:
        """code: one of the server's own error codes (a fixed set)."""
        self.errors[code] = self.errors.get(code, 0) + 1

    def batch(self, n: int) -> None:
        observe(self.batches, BATCH_BUCKETS, n)
        self.images += n

    def render(self) -> str:
        out = ["# HELP imgclf_requests_total HTTP requests by method, path and status.",
               "# TYPE imgclf_requests_total counter"]
        out += [f'imgclf_requests_total{{method="{m}",path="{p}",status="{s}"}} {n}'
                for (m, p, s), n in sorted(self.requests.items())]
        out += ["# HELP imgclf_request_duration_seconds Request latency.",
                "# TYPE imgclf_request_duration_seconds histogram"]
        for p, h in sorted(self.latency.items()):
            out += hist_lines("imgclf_request_duration_seconds", f'path="{p}",', LAT_BUCKETS, h)
        out += ["# HELP imgclf_batch_size Images per model call (micro-batching).",
                "# TYPE imgclf_batch_size histogram"]
        out += hist_lines("imgclf_batch_size", "", BATCH_BUCKETS, self.batches)
        out += ["# HELP imgclf_errors_total Rejected requests by error code.", "# TYPE imgclf_errors_total counter"]
        out += [f'imgclf_errors_total{{code="{c}"}} {n}' for c, n in sorted(self.errors.items())]
        out += ["# HELP imgclf_images_total Images classified.", "# TYPE imgclf_images_total counter",
                f"imgclf_images_total {self.images}"]
        return "\n".join(out) + "\n"


def observe(h: list, buckets: tuple, v: float) -> None:
    for i, b in enumerate(buckets):
        if v <= b:
            h[i] += 1
            break
    else:
        h[len(buckets)] += 1
    h[-2] += v
    h[-1] += 1


def hist_lines(name: str, labels: str, buckets: tuple, h: list) -> list[str]:
    lines, cum = [], 0
    for b, n in zip(list(buckets) + ["+Inf"], h[:len(buckets) + 1]):
        cum += n
        lines.append(f'{name}_bucket{{{labels}le="{b}"}} {cum}')
    lab = "{" + labels.rstrip(",") + "}" if labels else ""
    return lines + [f"{name}_sum{lab} {h[-2]:.6g}", f"{name}_count{lab} {h[-1]}"]
