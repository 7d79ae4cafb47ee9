"""Deployment: SavedModel and TFLite export with their serving signature, predictors for every form a model ships
in, MediaPipe metadata, video."""
