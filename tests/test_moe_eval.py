"""MoE models in eval mode: deterministic top-k routing for every forward, training mode untouched."""

import pytest
import torch

from marjara.distributed import ensure_process_group
from marjara.errors import MarjaraError
from marjara.model import MarjaraModel, ModelConfig
from marjara.model.ffn import moe_eval_routing

VOCAB = 101


def build(seed=0, **overrides) -> MarjaraModel:
    ensure_process_group()  # DeepSpeed's MoE layers need one
    torch.manual_seed(seed)
    config = ModelConfig.from_preset("tiny", vocab_size=VOCAB, use_moe=True, num_experts=4, **overrides)
    return MarjaraModel(config)


def eval_logits(model, idx, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.eval()(idx).logits


def cached_logits(model, idx):
    """Logits the way generation computes them: a prefix through the KV cache, then one token at a time."""
    B, T = idx.shape
    cache = model.new_cache(batch_size=B, max_len=T)
    with torch.no_grad():
        steps = [model.lm_head(model.hidden_states(idx[:, :5], torch.arange(5).expand(B, 5), cache))]
        for t in range(5, T):
            steps.append(model.lm_head(model.hidden_states(idx[:, t:t + 1], torch.full((B, 1), t), cache)))
    return torch.cat(steps, dim=1)


def test_top2_eval_forwards_agree_under_any_seed_and_equal_the_generation_path():
    model = build(top_k=2)
    idx = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    first, second = eval_logits(model, idx, seed=1), eval_logits(model, idx, seed=2)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(cached_logits(model, idx), first, rtol=1e-5, atol=1e-5)
    # Greedy generation picks, at every step, the argmax of a full eval forward over what came before.
    prompt = idx[0, :4].tolist()
    generated = model.generate([prompt], max_new_tokens=8, temperature=0)[0]
    sequence = prompt + generated
    for step in range(len(prompt), len(sequence)):
        full = eval_logits(model, torch.tensor([sequence[:step]]), seed=step)
        assert int(full[0, -1].argmax()) == sequence[step]


def test_top1_eval_takes_fewer_tokens_than_min_capacity():
    model = build(top_k=1, min_capacity=4)
    idx = torch.tensor([[5], [17], [60]])  # 3 tokens < min_capacity
    batched = eval_logits(model, idx, seed=0)
    alone = torch.cat([eval_logits(model, idx[row:row + 1], seed=row) for row in range(3)])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)
    # DeepSpeed's own gate (training mode) refuses such a batch.
    with pytest.raises(AssertionError, match="min_capacity"):
        model.train()(idx)


def training_step(model, idx, targets):
    torch.manual_seed(11)  # top-2 training samples its second expert
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(idx, targets=targets).loss
    loss.backward()
    optimizer.step()
    return loss.detach()


def test_eval_then_train_leaves_a_training_step_identical():
    # capacity_factor 0.5 drops tokens in training, so a gate left in eval routing would show.
    reference, round_trip = build(top_k=2, capacity_factor=0.5), build(top_k=2, capacity_factor=0.5)
    idx = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))
    targets = idx.roll(-1, dims=1)
    eval_logits(round_trip, idx, seed=5)
    assert not round_trip.training
    expected_loss, loss = training_step(reference, idx, targets), training_step(round_trip, idx, targets)
    assert torch.equal(loss, expected_loss)
    for (name, a), b in zip(reference.named_parameters(), round_trip.parameters()):
        assert torch.equal(a, b), name


def test_the_training_gate_in_eval_only_when_asked():
    model = build(top_k=2)
    idx = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    deterministic = eval_logits(model, idx, seed=1)
    with moe_eval_routing(model, "training"):
        sampled = [eval_logits(model, idx, seed=seed) for seed in (1, 2)]
    assert not torch.allclose(sampled[0], sampled[1])  # DeepSpeed samples top-2's second expert
    torch.testing.assert_close(eval_logits(model, idx, seed=2), deterministic, rtol=0, atol=0)  # restored
    with pytest.raises(MarjaraError, match="unknown MoE eval routing 'noisy'; choose one of deterministic, training"):
        with moe_eval_routing(model, "noisy"):
            pass


def test_a_training_config_with_an_unknown_moe_eval_routing_is_refused():
    from marjara.train.config import TrainConfig

    assert TrainConfig.from_flags({"use_moe": True}, has_gpu=False).model.moe_eval_routing == "deterministic"
    with pytest.raises(MarjaraError, match="--moe_eval_routing must be one of deterministic, training"):
        TrainConfig.from_flags({"use_moe": True, "moe_eval_routing": "noisy"}, has_gpu=False)
