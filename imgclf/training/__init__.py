"""Training: the recipe (train.py), its stages (stages.py), the run state and
checkpoints (checkpoint.py) and the epoch functions (loop.py)."""
