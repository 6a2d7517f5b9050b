"""Evaluation: metrics, calibration, the HTML report and its sections, and
comparing runs. Probabilities come from imgclf.inference, as everywhere."""
