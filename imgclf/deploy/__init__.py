"""Deployment: export (ONNX, INT8, TorchScript) and serve (a REST API)."""
