"""Semantic segmentation: one class per pixel (imgclf/tasks/__init__.py, "segment")."""
