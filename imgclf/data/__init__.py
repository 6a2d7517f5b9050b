"""Data: reading images safely (images.py), turning them into model input
(preprocess.py), finding and splitting datasets (datasets.py) and checking
them (check.py). Nothing here imports torch at module level."""

# The label a rejected ("none of these") image gets: the answer's (inference/
# predictor.py) and the reason a class may not be named so (datasets.py).
UNKNOWN = "unknown"
