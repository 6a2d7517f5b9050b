"""The OpenAPI description of every request, status code and body the server
really uses (tests/test_serve_fuzz.py holds the server to it with Schemathesis).

Answers are pydantic models (FastAPI checks each answer against them and
writes their schema). Request bodies and errors stay hand-written: a body is
multipart or JSON, read and parsed under the server's own byte, part, time
and pixel limits off the event loop, which FastAPI's body parameters cannot
keep (its form parser spools files to disk)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["code", "message"],
    "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                   "images": {"type": "array", "items": {"type": "object"}}, "index": {"type": "integer"}}}}}


def _errors(*codes: int) -> dict:
    why = {400: "bad request: empty, malformed JSON or multipart, bad base64, bad top_k",
           401: "missing or wrong API key", 404: "no such route", 405: "method not allowed",
           408: "the body did not arrive in time", 413: "body, files, parts or pixels over the limit",
           415: "content type other than multipart/form-data or application/json",
           422: "not an image, corrupt or truncated", 500: "internal error (a bug; see the server log)",
           429: "too many requests from this address (/v1/similar; see Retry-After)",
           503: "model still loading or failed to load, similarity index still building, or too many requests "
                "in progress (see Retry-After)"}
    return {str(c): {"description": why[c], "content": {"application/json": {"schema": ERROR}}} for c in codes}


class Top(BaseModel):
    label: str
    score: float = Field(ge=0, le=1)


class Prediction(BaseModel):
    filename: str
    label: str = Field(description="the best class, or 'unknown' when rejected")
    score: float
    top: list[Top]
    labels: list[Top] | None = Field(None, description="multi-label models: every label at or above its threshold, "
                                                       "best first")
    unknown: float | None = Field(None, ge=0, le=1, description="how unlike the training images (share of known "
                                                                 "validation images more familiar)")


class Predictions(BaseModel):
    """/v1/predict's answer: top-k labels per image, in request order."""
    predictions: list[Prediction]
    model_ms: float


class Rle(BaseModel):
    size: list[int] = Field(min_length=2, max_length=2, description="height, width: the image's own")
    counts: str = Field(description="COCO's compressed run-length string (pycocotools / faster-coco-eval decode it)")


class Box(BaseModel):
    label: str
    score: float = Field(ge=0, le=1)
    box: list[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in the image's own pixels")
    mask: Rle | None = Field(None, description="a model with instance masks: the object's pixels as COCO RLE")
    polygons: list[list[float]] | None = Field(None, description="a model with instance masks: the object's outer "
                                               "boundaries as COCO polygons [x1, y1, x2, y2, ...], largest first "
                                               "(holes are in the RLE only)")


class Detection(BaseModel):
    filename: str
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    boxes: list[Box] = Field(description="detections at or above their class's threshold, best first")


class Detections(BaseModel):
    """/v1/predict's answer from a detector: boxes per image, in request order."""
    predictions: list[Detection]
    model_ms: float


class Segmentation(BaseModel):
    filename: str
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    classes: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        description="each class's share of the image's pixels (classes with none left out; the shares sum to 1)")
    mask_png: str = Field(pattern=r"^[A-Za-z0-9+/]+={0,2}$", min_length=4,
                          description="the label map, base64: an 8-bit palette PNG of width x height whose pixel "
                                      "values are class ids (`legend`), its palette the legend's colours")


class LegendEntry(BaseModel):
    id: int = Field(ge=0, le=255)
    name: str
    color: str = Field(pattern="^#[0-9a-f]{6}$", description="the class's colour in mask_png's palette and the page")


class Segmentations(BaseModel):
    """/v1/predict's answer from a segmenter: a label map and class shares per image, in request order."""
    predictions: list[Segmentation]
    legend: list[LegendEntry] = Field(description="every class of the model by id")
    model_ms: float


# A classifier answers Predictions, a detector Detections, a segmenter
# Segmentations (GET /v1/model says which: "task").
Answers = Predictions | Detections | Segmentations


class Neighbour(BaseModel):
    id: int = Field(ge=0)
    path: str = Field(description="relative to the data root, or the file name alone")
    label: str
    similarity: float
    thumbnail: str = Field(description="data:image/jpeg;base64,...")


class SimilarResult(BaseModel):
    filename: str
    neighbours: list[Neighbour]


class Similar(BaseModel):
    """/v1/similar's answer: the k most similar training images of each image, best first."""
    results: list[SimilarResult]
    model_ms: float


class Status(BaseModel):
    status: str
    model: str | None = None
    similar: str | None = Field(None, description="/readyz: the similarity index is building, ready or unavailable")


def predict_openapi(max_files: int) -> dict:
    """/v1/predict: multipart files or JSON base64 images, at most max_files."""
    images = {"type": "array", "minItems": 1, "maxItems": max_files}
    top = {"type": "integer", "minimum": 1}
    multipart = {"type": "object", "required": ["file"], "additionalProperties": False,  # others: 422 unknown_field
                 "properties": {"file": {**images, "items": {"type": "string", "format": "binary"}}, "top_k": top}}
    json_body = {"type": "object", "required": ["images"],
                 "properties": {"images": {**images, "items": {"type": "string", "format": "byte", "minLength": 4}},
                                "top_k": top}}
    return {
        "parameters": [{"name": "top_k", "in": "query", "required": False, "schema": top,
                        "description": "labels per image (default: the server's --top-k)"}],
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": multipart},
                                                      "application/json": {"schema": json_body}}},
        "responses": _errors(400, 401, 408, 413, 415, 422, 500, 503),
    }


NEIGHBOUR = {"type": "object", "required": ["id", "path", "label", "similarity", "thumbnail"],
             "properties": {"id": {"type": "integer", "minimum": 0}, "path": {"type": "string"},
                            "label": {"type": "string"}, "similarity": {"type": "number"},
                            "thumbnail": {"type": "string", "description": "data:image/jpeg;base64,..."}}}
SIMILAR = {"type": "object", "required": ["results"], "properties": {
    "results": {"type": "array", "items": {"type": "object", "required": ["filename", "neighbours"],
                                           "properties": {"filename": {"type": "string"},
                                                          "neighbours": {"type": "array", "items": NEIGHBOUR}}}},
    "model_ms": {"type": "number"}}}


def similar_openapi(max_files: int, max_k: int) -> dict:
    """/v1/similar: the bodies of /v1/predict, and k in the query."""
    spec = predict_openapi(max_files)
    spec["parameters"] = [{"name": "k", "in": "query", "required": False,
                           "schema": {"type": "integer", "minimum": 1},
                           "description": f"neighbours per image (default 10, at most {max_k})"}]
    for body in spec["requestBody"]["content"].values():
        body["schema"]["properties"].pop("top_k")
    spec["responses"] = _errors(400, 401, 404, 408, 413, 415, 422, 429, 500, 503)
    spec["responses"]["404"]["description"] = ("similarity search unavailable (an exported model, or a detection "
                                               "or segmentation model)")
    return spec


MODEL_OPENAPI = {"responses": {"200": {"description": "the model and its limits",
                                       "content": {"application/json": {"schema": {"type": "object"}}}},
                               **_errors(401, 500, 503)}}
STATUS_OPENAPI = {"responses": _errors(500, 503)}
METRICS_OPENAPI = {"responses": {"200": {"description": "Prometheus text format",
                                         "content": {"text/plain": {"schema": {"type": "string"}}}},
                                 **_errors(401, 500)}}
