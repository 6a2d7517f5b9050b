"""Training: the recipe (train.py), the strategy it takes (strategy.py, race.py),
its stages (stages.py: stage_head.py, stage_network.py, the epoch loop and
its Context in epochs.py), the run state and checkpoints (checkpoint.py) and
the epoch functions (loop.py)."""
