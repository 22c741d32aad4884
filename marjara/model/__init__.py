"""The model: its config and presets, and the decoder-only transformer with KV-cache generation.

This package knows nothing of training, checkpoints or launchers, and starts no process group: a
MoE model built to train (DeepSpeed's MoE layers) needs one, which whoever trains it sets up; one
built for inference (MarjaraModel(config, inference=True), from_pretrained) needs none.
"""

from marjara.model.config import PRESETS, ModelConfig
from marjara.model.output import ModelOutput
from marjara.model.transformer import MarjaraModel

__all__ = ["PRESETS", "MarjaraModel", "ModelConfig", "ModelOutput"]
