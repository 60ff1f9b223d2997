"""The DeDe detector: config, model, masking, training, checkpoints, frozen encoders, and the scorer."""
