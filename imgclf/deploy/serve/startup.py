"""What `imgclf serve` does before it is ready, in a background thread
(start_up): load the model, warm it up, run one real inference, then build
the similarity index of /v1/similar. /healthz answers all along; /readyz
and the /v1 routes read the progress from the app's State."""

import ipaddress
import logging
import re
from pathlib import Path

from imgclf.errors import ImgclfError
from imgclf.inference.load import TORCH_FREE, model_format
from imgclf.runs import RunDir
from imgclf.tasks import load

log = logging.getLogger("imgclf.serve")


def start_up(st) -> None:
    """Load the model, run the warm-up and one real inference (a model that
    fails or mislabels is caught here), then build the similarity index: in
    a background thread, so /healthz answers the whole time. A failure is
    reported by /readyz and every /v1 route, never raised: the thread ends."""
    cfg = st.cfg
    try:
        pred = load(cfg.model, threads=cfg.threads)
        pred.set_reject(cfg.reject)
        st.waiting_for = "the warm-up inference"
        pred.warm_up()
        pred.self_check()
    except Exception as e:  # any failure, the runtimes' own types included: reported, never a dead thread
        st.load_error = public_reason(e, cfg.model)
        st.similar_why = "the model could not be loaded"
        if not (st.on_failure and st.on_failure(e)):
            log.error("imgclf serve: the model could not be loaded: %s", st.load_error,
                      exc_info=not isinstance(e, ImgclfError))
        st.started.set()
        return
    st.similar_building = True
    st.similar_why = "the similarity index is still being built"
    st.predictor = pred  # ready: /v1/predict answers from here on
    if st.on_ready:
        st.on_ready()
    try:
        load_similar(st)
    except Exception:  # a bug in the index code must not leave /v1/similar "building" forever
        log.exception("/v1/similar disabled: building the similarity index failed")
        st.similar_why = "the run's similarity index could not be built (the server log says why)"
    finally:
        st.similar_building = False
        st.started.set()


def public_reason(e: Exception, model: str) -> str:
    """What an answer may say about a failed load: imgclf's own message with
    server paths cut to file names; of anything else, only its type."""
    if not isinstance(e, ImgclfError):
        return f"unexpected {type(e).__name__}; the server log has the details"
    text = str(e).replace(str(model), Path(model).name)
    return re.sub(r"(?<![\w.])/(?:[^\s/:'\"()]+/)+([^\s/:'\"()]+)", r"\1", text)


def load_similar(st) -> None:
    """The run's similarity index (built once and saved in the run when
    missing). An exported model has no embedding output, so a bare .onnx
    serves predictions only and /v1/similar says why. The index shows
    training images, so it is off on an open address without an API key
    unless asked for (--similar). Answers never carry an exception string:
    those name server paths; the log has them."""
    cfg = st.cfg
    task = getattr(st.predictor, "task", "classify")
    if task != "classify":
        st.similar_why = (f"not for this task ({task}); it compares the image embeddings of classification "
                          "models; /v1/predict answers as usual")
        return
    if model_format(cfg.model) in TORCH_FREE or not hasattr(st.predictor, "embed"):
        st.similar_why = ("an exported model computes probabilities only, not the embeddings similarity search "
                          "needs; serve the run directory instead (imgclf serve RUN)")
        return
    if cfg.similar is False:
        st.similar_why = "the server was started with --no-similar"
        return
    if cfg.similar is None and not cfg.api_key and not is_loopback(cfg.host):
        st.similar_why = ("it shows training images, so it is off on a non-loopback --host without an API key; "
                          "start the server with --api-key, or with --similar to serve it openly")
        return
    from imgclf.data_engine.similar import load_index  # deferred: torch; only a run directory has an index

    try:
        # workers=0: decoded in this thread. A DataLoader worker would be forked
        # from a process already running uvicorn's, onnxruntime's and torch's
        # threads, and a child that inherits a held lock hangs for good (a CI
        # run once stopped at "building the similarity index"). Built once.
        st.similar = load_index(RunDir(cfg.model), st.predictor, workers=0, progress=False)
    except (ImgclfError, OSError) as e:  # e.g. the training images moved: predictions still work
        st.similar_why = "the run's similarity index could not be built (the server log says why)"
        log.warning("/v1/similar disabled: the similarity index could not be built: %s", e)


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
