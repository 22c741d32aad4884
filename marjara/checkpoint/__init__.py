"""Training checkpoints (DeepSpeed's sharded layout plus MARJARA's state): the format, saving and
resuming, readers of DeepSpeed's ZeRO layouts, export to MARJARA's single-file format (the
Hugging Face layout's writer is marjara/hf/export.py), conversion, and loading for inference."""
