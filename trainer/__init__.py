"""binaryduo.trainer: recipe engine, training loop, tracking and the `binaryduo` CLI."""
