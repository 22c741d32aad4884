"""Reference logits for conversion tests, computed by DeepSpeed itself (no MARJARA converter code).

    torchrun --nproc_per_node 2 tests/engine_logits.py CKPT_DIR TAG OUT.pt

Builds the model the checkpoint's marjara.json describes (expert-parallel as trained), wraps it in
a DeepSpeed engine, restores the weights with engine.load_checkpoint (DeepSpeed reads its own
module and per-expert files) and writes, from rank 0, the engine's logits on a fixed batch in eval
mode (deterministic MoE routing): {"idx": (2, 24) tokens, "logits": fp32 logits}.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import marjara  # noqa: E402,F401  (selects DeepSpeed's accelerator before deepspeed is imported)
import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from marjara.model.config import ModelConfig  # noqa: E402
from marjara.distributed import ensure_process_group, exit_now, shutdown  # noqa: E402
from marjara.model import MarjaraModel  # noqa: E402

FIXED_BATCH_SEED = 7


def fixed_batch(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(FIXED_BATCH_SEED))


def main() -> None:
    ckpt_dir, tag, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    ensure_process_group()
    meta = json.loads((Path(ckpt_dir) / tag / "marjara.json").read_text())
    config = ModelConfig.from_dict(meta["model_config"])
    torch.manual_seed(12345)  # weights differ from the trained ones until the checkpoint is loaded
    model = MarjaraModel(config)
    engine, *_ = deepspeed.initialize(
        model=model, config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}})
    engine.load_checkpoint(ckpt_dir, tag, load_module_only=True, load_optimizer_states=False,
                           load_lr_scheduler_states=False)
    engine.eval()
    idx = fixed_batch(config.vocab_size)
    with torch.no_grad():
        logits = engine(idx).logits
    if dist.get_rank() == 0:
        torch.save({"idx": idx, "logits": logits.float()}, out)
    shutdown()


if __name__ == "__main__":
    main()
    exit_now(0)
