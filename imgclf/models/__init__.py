"""Models: a registry of small builders (registry.py), model records
(records.py: what model.pt holds), the frozen-backbone feature extractor and
cache (features.py) and the embedding service over them (embedder.py). Every
model's `forward` returns logits; losses live in training/, temperatures in
inference/.

This __init__ imports nothing: RunDir reads model records on the torch-free
serving path, and importing a submodule runs this file first.
"""
