"""pit_keras: Pivot Interaction Transfer (Lv et al., CVPR 2020) for cross-domain semantic segmentation."""

import os

# TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notices) buries the output users need.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

__version__ = "0.1.0"
