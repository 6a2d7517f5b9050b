"""/v1/predict's answer per task: what the batcher runs and what each image
gets back. Classifiers answer top-k labels (imgclf.inference.predictor.top_k);
detectors answer boxes in the original image's pixels, at or above each
class's threshold (imgclf.tasks.detect.predictor); segmenters answer the
label map at the image's own size as a base64 palette PNG, and each class's
share of the pixels (imgclf.tasks.segment.predictor)."""

from __future__ import annotations

import base64

import numpy as np

from imgclf.inference.predictor import top_k
from imgclf.tasks.detect.predictor import answer as det_answer
from imgclf.tasks.segment.predictor import class_shares, mask_png, palette

# Bytes per original pixel that a segmenter's answer holds until it is sent:
# the uint8 label map, its palette image and raw copy for the PNG encoder,
# the PNG and its base64 (label maps compress far below one byte a pixel).
ANSWER_BYTES_PER_PIXEL = 5


def is_detector(pred) -> bool:
    return getattr(pred, "task", "classify") == "detect"


def is_segmenter(pred) -> bool:
    return getattr(pred, "task", "classify") == "segment"


def model_inputs(pred, prepared: list) -> list:
    """What the batcher collects: a detector's `prepare` also gives the
    original size, which its model does not take; a segmenter keeps it (its
    label maps go back to that size)."""
    return [x for x, _ in prepared] if is_detector(pred) else prepared


def collate(pred):
    """How the batcher joins images: classifier and detector inputs share one
    size (a stacked array); a segmenter's keep their aspect, so they stay a
    list of (image, original size), and the segmenter groups equal shapes."""
    return list if is_segmenter(pred) else np.stack


def per_image_outputs(pred):
    """The batcher's model call: a batch -> one output per image: (probs,
    unknown score), a detector's (boxes, scores, labels), or a segmenter's
    label map at the original size."""

    def run(batch) -> list:
        if is_segmenter(pred):
            return pred.label_maps([x for x, _ in batch], [size for _, size in batch])
        if is_detector(pred):
            return pred.outputs(batch)
        p, u = pred.outputs(batch)
        return [(p[i], None if u is None else float(u[i])) for i in range(len(p))]

    return run


def answer_bytes(pred, prepared: list) -> int:
    """Memory a request's answers hold beyond decoding (counted in the decode
    budget while they are made): a segmenter's full-size label maps."""
    if not is_segmenter(pred):
        return 0
    return sum(w * h for _, (w, h) in prepared) * ANSWER_BYTES_PER_PIXEL


def image_answers(pred, files: list[tuple[str, bytes]], prepared: list, outs: list, k: int) -> list[dict]:
    """Each image's answer, in request order, named by its file name."""
    if is_segmenter(pred):
        n = len(pred.classes)
        return [{"filename": name, "width": int(m.shape[1]), "height": int(m.shape[0]),
                 "classes": class_shares(m, pred.classes), "mask_png": base64.b64encode(mask_png(m, n)).decode()}
                for (name, _), m in zip(files, outs)]
    if is_detector(pred):
        return [{"filename": name, **det_answer(pred.found(o, size, pred.thresholds), pred.classes)}
                for (name, _), (_, size), o in zip(files, prepared, outs)]
    thr = pred.thresholds if pred.multi_label else None
    return [{"filename": name, **top_k(p, pred.classes, k, u, pred.reject, thr)} for (name, _), (p, u) in zip(files, outs)]


def legend(pred) -> list[dict] | None:
    """A segmenter's classes by id with the colours its mask PNGs and the page use."""
    if not is_segmenter(pred):
        return None
    return [{"id": i, "name": c, "color": "#" + bytes(int(v) for v in rgb).hex()}
            for i, (c, rgb) in enumerate(zip(pred.classes, palette(len(pred.classes))))]


def draft_size(pred) -> int | None:
    """The smallest side decoding must deliver: a segmenter's label map goes
    back to the image's own size, so it decodes at full size (None)."""
    return None if is_segmenter(pred) else pred.preprocess.draft_size


def input_description(pred) -> dict:
    """/v1/model's input size and resize: a square input, or a segmenter's
    longer side (aspect kept, nothing cropped)."""
    if is_segmenter(pred):
        return {"input_size": pred.image_size, "resize": "longer_side"}
    return {"input_size": pred.preprocess.size, "resize": pred.preprocess.resize}
