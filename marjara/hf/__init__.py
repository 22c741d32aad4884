"""The Hugging Face Qwen3 / Qwen3-MoE layout, both ways, in one place: the config mapping
(config.py), where each weight goes and how RoPE's rows are permuted (layout.py), reading a
transformers folder (reader.py), writing one (export.py) and its tokenizer.json (tokenizer.py).
The folder's file names are model/pretrained.py's, beside MARJARA's own format. The model package
reads Hugging Face folders through config.py, layout.py and reader.py, which therefore import
nothing of training, checkpoints, launchers or evaluation."""
