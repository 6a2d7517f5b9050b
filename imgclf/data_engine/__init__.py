"""The data engine: what a trained run's backbone says about the data.

    embed.py        `imgclf embed`: embeddings of a dataset or of files, written as Parquet or .npy
    similar.py      `imgclf similar` and /v1/similar: a run's training images nearest to an image
    suggest.py      `imgclf suggest`: which unlabeled images to label next
    label_noise.py  training images whose label looks wrong (the report's suspects)
    data_map.py     the report's 2-D map of the images
    near_dup.py     near-duplicates by embedding for `imgclf check --near-dup embed`

All of them get features from the one embedding service (models/embedder.py,
through the feature cache) and compare them with the one neighbour module
(inference/neighbours.py). This package sits above evaluation and training
and below deploy and the CLI: it imports downwards only, and nothing under it
imports it; the lower layers take its pieces as arguments instead (the
report's sections below, check's embedding pairs).
"""

from __future__ import annotations

from imgclf.data_engine.data_map import map_section
from imgclf.data_engine.label_noise import suspects_section

# The evaluation report's data-engine sections (evaluation/report.py: build_report).
REPORT_SECTIONS = {"suspects": suspects_section, "data_map": map_section}
