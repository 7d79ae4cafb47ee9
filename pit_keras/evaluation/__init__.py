"""Evaluation: confusion-matrix metrics, scoring a network or saved predictions, results files."""
