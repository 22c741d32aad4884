"""The model: its config and presets, and the decoder-only transformer with KV-cache generation.

This package knows nothing of training, checkpoints or launchers: a MoE model needs a process
group (DeepSpeed's MoE layers ask for one), which whoever runs it sets up.
"""

from marjara.model.config import PRESETS, ModelConfig
from marjara.model.output import ModelOutput
from marjara.model.transformer import MarjaraModel

__all__ = ["PRESETS", "MarjaraModel", "ModelConfig", "ModelOutput"]
