"""Datasets: class tables, on-disk layouts (GTA5, Cityscapes), tf.data pipelines, the embedded benchmark."""
