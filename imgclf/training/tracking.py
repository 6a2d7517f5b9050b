"""Run tracking: a run's numbers also go to TensorBoard event files and/or an
MLflow tracking store (`imgclf train --log tensorboard,mlflow`). The recipes
call three methods: `epoch` after each epoch's history row, `finish` once the
run is written, `close` on the way out. Without --log it is a no-op, so
training without the extras is unchanged; under torchrun only rank 0 tracks."""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.errors import ConfigError, MissingExtra
from imgclf.evaluation.figures import confusion_png
from imgclf.log import get_logger

log = get_logger(__name__)

SINKS = ("tensorboard", "mlflow")
# history.csv columns that are labels or counters, not metrics
_NOT_METRICS = {"stage", "epoch", "stage_epoch"}
# run files logged to MLflow as artifacts when present (the report, the exported models)
_ARTIFACTS = ("model.pt", "config.json", "summary.json", "history.csv", "eval_test.json", "eval_val.json", "model.onnx",
              "model.int8.onnx", "model.tflite", "model.int8.tflite", "model.torchscript.pt")


def parse_sinks(log_opt: str, tensorboard: bool = False) -> list[str]:
    """--log "tensorboard,mlflow" -> the sinks, checked; --tensorboard is an alias of --log tensorboard."""
    sinks = [s.strip().lower() for s in (log_opt or "").split(",") if s.strip()]
    bad = [s for s in sinks if s not in SINKS]
    if bad:
        raise ConfigError(f"--log {log_opt!r}: unknown tracker {', '.join(bad)}",
                          "use --log tensorboard, --log mlflow or --log tensorboard,mlflow")
    if tensorboard and "tensorboard" not in sinks:
        sinks.insert(0, "tensorboard")
    return list(dict.fromkeys(sinks))


class Tracker:
    """The open sinks of one run (none: every call does nothing)."""

    def __init__(self, tb=None, mlflow=None):
        self.tb, self.mlflow = tb, mlflow

    @classmethod
    def open(cls, sinks: list[str], run_path: Path, params: dict, main: bool = True) -> Tracker:
        if not main or not sinks:
            return cls()
        run_path = Path(run_path)
        tb = _tensorboard(run_path) if "tensorboard" in sinks else None
        ml = _MlflowRun.start(run_path, params) if "mlflow" in sinks else None
        return cls(tb, ml)

    def __bool__(self) -> bool:
        return self.tb is not None or self.mlflow is not None

    def epoch(self, row: dict, step: int | None = None) -> None:
        """One history row: its numeric columns (losses, metrics, lr, images/s) at step `epoch`."""
        step = int(row.get("epoch", 0)) if step is None else step
        metrics = {k: float(v) for k, v in row.items() if k not in _NOT_METRICS and _number(v)}
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.mlflow is not None:
            self.mlflow.metrics(metrics, step)

    def figure(self, tag: str, png: bytes, step: int) -> None:
        """A PNG figure (e.g. the confusion matrix) as a TensorBoard image and an MLflow artifact."""
        if self.tb is not None:
            self.tb.add_image(tag, np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), step, dataformats="HWC")
        if self.mlflow is not None:
            self.mlflow.artifact_bytes(f"{tag.replace('/', '_')}.png", png)

    def finish(self, run_path: Path, test: dict | None = None, classes: list[str] | None = None) -> None:
        """The held-out metrics and confusion matrix, the run's files (report,
        exported models) as artifacts, then close."""
        test = test or {}
        final = {f"test_{k}": float(v) for k, v in test.items() if _number(v)}
        if self and classes and test.get("confusion_matrix") is not None:
            try:
                self.figure("test/confusion_matrix", confusion_png(test["confusion_matrix"], classes, True), 0)
            except ImportError:  # matplotlib (the report extra) absent: the numbers are still logged
                log.info("tracking: no confusion-matrix figure without matplotlib (pip install 'imgclf[report]')")
        if self.tb is not None and final:
            for k, v in final.items():
                self.tb.add_scalar(k, v, 0)
        if self.mlflow is not None:
            self.mlflow.metrics(final, 0)
            self.mlflow.artifacts(Path(run_path))
        self.close()

    def close(self, failed: bool = False) -> None:
        if self.tb is not None:
            self.tb.close()  # written out now: the CLI exits without interpreter teardown (cli.run)
            self.tb = None
        if self.mlflow is not None:
            self.mlflow.end("FAILED" if failed else "FINISHED")
            self.mlflow = None


def _number(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(float(v))


def _tensorboard(run_path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter  # deferred: optional extra, loaded only with --log
    except ImportError:
        raise MissingExtra("--log tensorboard needs the tensorboard package",
                           "pip install 'imgclf[tensorboard]'") from None
    return SummaryWriter(str(run_path / "tensorboard"))


class _MlflowRun:
    """One MLflow run through the client API (no global active run, so two
    trainings in one process do not mix)."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def start(cls, run_path: Path, params: dict) -> _MlflowRun:
        try:
            from mlflow.entities import Param  # deferred: optional extra, loaded only with --log mlflow
            from mlflow.tracking import MlflowClient  # deferred: optional extra, loaded only with --log mlflow
        except ImportError:
            raise MissingExtra("--log mlflow needs the mlflow package", "pip install 'imgclf[mlflow]'") from None
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_path / 'mlflow.db').resolve()}"
        client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "imgclf")
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            exp_id = exp.experiment_id
        else:  # a local store keeps its artifacts under the run too, not in ./mlruns of wherever train ran
            where = None if os.environ.get("MLFLOW_TRACKING_URI") else (run_path / "mlflow-artifacts").resolve().as_uri()
            exp_id = client.create_experiment(name, artifact_location=where)
        run = client.create_run(exp_id, run_name=run_path.resolve().name, tags={"imgclf.run_dir": str(run_path)})
        # MLflow caps a param value at 6000 characters; the whole config is also logged as config.json
        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
        log.info("mlflow: run %s in %s (experiment %s)", run.info.run_id, uri, name)
        return cls(client, run.info.run_id)

    def metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric  # deferred: optional extra, loaded only with --log mlflow

        if metrics:
            ts = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in metrics.items()])

    def artifact_bytes(self, name: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / name).write_bytes(data)
            self.client.log_artifact(self.run_id, str(Path(d) / name), artifact_path="figures")

    def artifacts(self, run_path: Path) -> None:
        for name in _ARTIFACTS:
            if (run_path / name).is_file():
                self.client.log_artifact(self.run_id, str(run_path / name))
        if (run_path / "report").is_dir():
            self.client.log_artifacts(self.run_id, str(run_path / "report"), artifact_path="report")

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)
