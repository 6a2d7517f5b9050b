"""onnxruntime sessions: the one place imgclf makes them (predicting, serving,
the export checks, the cached backbone), so every session is quiet, CPU-only
and has telemetry off.
"""

from __future__ import annotations

from pathlib import Path


def ort_session(src: str | Path | bytes, threads: int | None = None, arena: bool = True):
    """An onnxruntime CPU session, quiet, telemetry off. The one place imgclf
    makes sessions: predicting, serving, the export checks and the backbone."""
    import onnxruntime as ort  # deferred: a slow import that `imgclf --help` and torch-only runs never need

    try:
        ort.disable_telemetry_events()  # other platforms; on Linux ORT_DISABLE_TELEMETRY does it (imgclf/__init__.py)
    except AttributeError:
        pass
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    so.enable_cpu_mem_arena = arena
    return ort.InferenceSession(src if isinstance(src, bytes) else str(src), so, providers=["CPUExecutionProvider"])
