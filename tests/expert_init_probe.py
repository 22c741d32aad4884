"""Rank probe for expert initialisation: builds a tiny MoE model with ep_size 2 and one with
ep_size 1 the way the trainer does (same seed on every rank, then init_experts), and the
trainer's own (a Learner with ep_size 2, before its first step); saves each rank's weights under
their global names to OUT/rank<R>_ep<E>.pt and OUT/rank<R>_learner.pt.

    python -m torch.distributed.run --nproc_per_node 2 tests/expert_init_probe.py OUT
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from marjara.distributed import ensure_process_group, exit_now, rank, shutdown  # noqa: E402
from marjara.model import MarjaraModel  # noqa: E402
from marjara.model.config import ModelConfig  # noqa: E402
from marjara.model.expert_init import init_experts  # noqa: E402
from marjara.model.param_names import global_param_name  # noqa: E402

out = Path(sys.argv[1])
ensure_process_group()
for ep_size in (2, 1):
    torch.manual_seed(1337)
    config = ModelConfig.from_preset("tiny", vocab_size=256, n_layers=2, use_moe=True, num_experts=4, ep_size=ep_size)
    model = MarjaraModel(config)
    init_experts(model, seed=1337)
    local = config.num_experts // ep_size
    ep_rank = rank() % ep_size  # DeepSpeed's expert-parallel groups are consecutive ranks
    weights = {global_param_name(name, ep_rank, local): p.detach().clone() for name, p in model.named_parameters()}
    torch.save(weights, out / f"rank{rank()}_ep{ep_size}.pt")
    del model
# The trainer's own model, before its first step: the Learner must have called init_experts.
from marjara.train.args import parse_config  # noqa: E402
from marjara.train.learner import Learner  # noqa: E402

learner = Learner(parse_config(["--model_size", "tiny", "--seq_len", "32", "--batch_size", "2", "--use_moe",
                                "--num_experts", "4", "--ep_size", "2", "--max_steps", "1", "--out_dir",
                                str(out / "run"), "--sample_tokens", "0"]))
local = learner.config.num_experts // 2
weights = {global_param_name(name, rank() % 2, local): p.detach().clone()
           for name, p in learner.model.named_parameters()}
torch.save(weights, out / f"rank{rank()}_learner.pt")
learner.engine.destroy()
del learner
shutdown()
exit_now(0)
