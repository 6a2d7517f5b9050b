"""/v1/predict's answer per task: what the batcher runs and what each image
gets back. Classifiers answer top-k labels (imgclf.inference.predictor.top_k);
detectors answer boxes in the original image's pixels, at or above each
class's threshold (imgclf.tasks.detect.predictor)."""

from __future__ import annotations

from imgclf.inference.predictor import top_k
from imgclf.tasks.detect.predictor import answer as det_answer


def is_detector(pred) -> bool:
    return getattr(pred, "task", "classify") == "detect"


def model_inputs(pred, prepared: list) -> list:
    """What the batcher stacks: a detector's `prepare` also gives the original size."""
    return [x for x, _ in prepared] if is_detector(pred) else prepared


def per_image_outputs(pred):
    """The batcher's model call: a batch -> one output per image: (probs,
    unknown score), or a detector's (boxes, scores, labels)."""

    def run(batch) -> list[tuple]:
        if is_detector(pred):
            return pred.outputs(batch)
        p, u = pred.outputs(batch)
        return [(p[i], None if u is None else float(u[i])) for i in range(len(p))]

    return run


def image_answers(pred, files: list[tuple[str, bytes]], prepared: list, outs: list, k: int) -> list[dict]:
    """Each image's answer, in request order, named by its file name."""
    if is_detector(pred):
        return [{"filename": name, **det_answer(pred.found(o, size, pred.thresholds), pred.classes)}
                for (name, _), (_, size), o in zip(files, prepared, outs)]
    thr = pred.thresholds if pred.multi_label else None
    return [{"filename": name, **top_k(p, pred.classes, k, u, pred.reject, thr)} for (name, _), (p, u) in zip(files, outs)]
