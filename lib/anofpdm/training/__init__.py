"""Training with classifier-free guidance (docs/training.md): the trainer and its configuration, training record,
resume checks, random draws, loss log, stop requests, validation loss, EMA and augmentation."""
