"""Data: reading images safely (images.py), turning them into model input
(preprocess.py), finding and splitting datasets (datasets.py) and checking
them (check.py). Nothing here imports torch at module level."""
