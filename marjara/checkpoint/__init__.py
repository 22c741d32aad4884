"""Training checkpoints (DeepSpeed's sharded layout plus MARJARA's state): the format, saving and
resuming, readers of DeepSpeed's ZeRO layouts, and export to single-file models."""
