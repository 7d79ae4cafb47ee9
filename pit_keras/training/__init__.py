"""Training: the trainer (one train_step for every method), a run from its configuration, callbacks, distribution
strategies and checkpoints."""
