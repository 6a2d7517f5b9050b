"""Object detection: labels, checks, model, metrics and training of the `detect` task."""
