"""pit_keras: Pivot Interaction Transfer (Lv et al., CVPR 2020) for cross-domain semantic segmentation."""

# TensorFlow's start-up chatter (CUDA probing, oneDNN notices) is hidden by each command (`console.configure`,
# `--tf_logs` shows it), not here: importing the package leaves TensorFlow's logging as the environment sets it.

__version__ = "0.1.0"
