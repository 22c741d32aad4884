"""The planner's model-state bytes against DeepSpeed's own estimators
(estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs), dense and MoE,
ZeRO 2 and 3, offload on and off, 1 to 1,024 GPUs."""

from __future__ import annotations

import pytest

from marjara.model.config import ModelConfig
from marjara.planner.devices import lookup
from marjara.planner.model_states import model_states
from marjara.planner.setup import Setup, zero_settings
from marjara.planner.shapes import param_counts

# Llama-2-7B's dimensions with GQA, and a mixture of experts of about the same total size.
DENSE_7B = dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden_size=11008,
                max_seq_len=4096)
MOE = dict(vocab_size=50304, d_model=2048, n_layers=24, n_heads=16, n_kv_heads=4, ffn_hidden_size=5632,
           max_seq_len=2048, use_moe=True, num_experts=16, top_k=2)


def setup(model: dict, stage: int, nodes: int, gpus_per_node: int, offload_optimizer=False, offload_param=False,
          ep_size=1) -> Setup:
    config = ModelConfig(**model, **({"ep_size": ep_size} if model.get("use_moe") else {}))
    return Setup(config, 4096, "bf16", stage, offload_optimizer, offload_param, False, nodes, gpus_per_node,
                 lookup("H100"), zero_settings({}))


def deepspeed_gpu_bytes(numel: float, largest: int, stage: int, nodes: int, gpus_per_node: int, offload: bool,
                        offload_param: bool) -> float:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == 2:
        return estimate_zero2_model_states_mem_needs(numel, gpus_per_node, nodes, cpu_offload=offload)[1]
    return estimate_zero3_model_states_mem_needs(numel, largest, gpus_per_node, nodes, cpu_offload=offload,
                                                 cpu_offload_params=offload_param)[1]


CASES = [  # model, stage, nodes, GPUs per node, offload optimizer, offload parameters
    (DENSE_7B, 2, 1, 1, False, False),
    (DENSE_7B, 2, 1, 8, False, False),
    (DENSE_7B, 2, 8, 8, True, False),
    (DENSE_7B, 3, 8, 8, False, False),
    (DENSE_7B, 3, 128, 8, False, False),
    (DENSE_7B, 3, 4, 8, True, False),
    (DENSE_7B, 3, 128, 8, True, True),
    (MOE, 2, 2, 8, False, False),
    (MOE, 2, 16, 8, True, False),
]


@pytest.mark.parametrize("model, stage, nodes, gpus, offload, offload_param", CASES)
def test_gpu_model_states_agree_with_deepspeed(model, stage, nodes, gpus, offload, offload_param):
    plan = setup(model, stage, nodes, gpus, offload, offload_param)
    counts = param_counts(plan.model)
    expected = deepspeed_gpu_bytes(counts.total, counts.largest_layer, stage, nodes, gpus, offload, offload_param)
    planned = model_states(plan).on_gpu
    assert planned == pytest.approx(expected, rel=0.10), (planned / 2**30, expected / 2**30)


def test_expert_parallel_states_agree_with_deepspeed_per_replica_group():
    """With ep 8 on 1,024 GPUs the experts are replicated over 128 ranks: DeepSpeed's estimator
    applied to each group (dense over all ranks, each rank's experts over 1024 / 8) is the planner's."""
    nodes, gpus, ep = 128, 8, 8
    plan = setup(MOE, 2, nodes, gpus, ep_size=ep)
    counts = param_counts(plan.model)
    dense = deepspeed_gpu_bytes(counts.non_expert, 0, 2, nodes, gpus, False, False)
    experts = deepspeed_gpu_bytes(counts.expert / ep, 0, 2, nodes // ep, gpus, False, False)
    assert model_states(plan).on_gpu == pytest.approx(dense + experts, rel=0.10)


@pytest.mark.parametrize("nodes, gpus", [(1, 8), (16, 8)])
def test_offloaded_host_memory_agrees_with_deepspeed_zero3(nodes, gpus):
    """ZeRO-3 with both offloads: the host holds 18 bytes per parameter over the nodes (DeepSpeed's
    zero_init estimate without its 1.5x safety factor)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    plan = setup(DENSE_7B, 3, nodes, gpus, True, True)
    counts = param_counts(plan.model)
    cpu, _, _ = estimate_zero3_model_states_mem_needs(counts.total, counts.largest_layer, gpus, nodes,
                                                      additional_buffer_factor=1.0)
    assert model_states(plan).host * gpus == pytest.approx(cpu, rel=0.10)
