"""Adaptation without target labels: the mean teacher and its pseudo-labels, the image-level regressor and target
image labels."""
