import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from marjara.model.attention import Attention
from marjara.model.config import ModelConfig
from marjara.model import MarjaraModel, ModelOutput
from marjara.model.rope import RotaryEmbedding, apply_rotary

pytestmark = pytest.mark.usefixtures("process_group")  # the MoE models built here need one

VOCAB = 101


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.from_preset("tiny", vocab_size=VOCAB, **overrides)


def build(seed=0, **overrides) -> MarjaraModel:
    torch.manual_seed(seed)
    return MarjaraModel(tiny(**overrides)).eval()


MOE = dict(use_moe=True, num_experts=4, top_k=2)


def test_changing_a_token_never_changes_earlier_logits():
    model = build()
    idx = torch.randint(0, VOCAB, (2, 24))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % VOCAB
    with torch.no_grad():
        a = model(idx).logits
        b = model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_loss_is_none_without_targets_and_cross_entropy_with():
    model = build()
    idx = torch.randint(0, VOCAB, (2, 8))
    out = model(idx)
    assert isinstance(out, ModelOutput) and out.loss is None and out.logits.shape == (2, 8, VOCAB)
    assert out.aux_loss is None and out.expert_counts == {}  # a dense model
    targets = idx.clone()
    targets[0, :3] = -1
    scored = model(idx, targets=targets)
    assert scored.logits is None
    expected = F.cross_entropy(out.logits.view(-1, VOCAB), targets.view(-1), ignore_index=-1, reduction="sum")
    torch.testing.assert_close(scored.ce_sum, expected)
    assert int(scored.ce_tokens) == 2 * 8 - 3
    torch.testing.assert_close(scored.loss, expected / 13)
    assert not hasattr(model, "last_aux_loss") and not hasattr(model, "last_expert_counts")


@pytest.mark.parametrize("overrides", [{}, MOE], ids=["dense", "moe"])
def test_incremental_decoding_with_the_cache_equals_a_full_forward(overrides):
    model = build(**overrides)
    idx = torch.randint(0, VOCAB, (3, 20))
    with torch.no_grad():
        full = model(idx).logits
        cache = model.new_cache(batch_size=3, max_len=32)
        # A prefix of 7 tokens, then one token at a time.
        steps = [model.lm_head(model.hidden_states(idx[:, :7], torch.arange(7).expand(3, 7), cache))]
        for t in range(7, 20):
            positions = torch.full((3, 1), t)
            steps.append(model.lm_head(model.hidden_states(idx[:, t:t + 1], positions, cache)))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, MOE], ids=["dense", "moe"])
def test_batched_greedy_generation_equals_one_prompt_at_a_time(overrides):
    model = build(**overrides)
    prompts = [[5, 9, 2], [7] * 11, [1, 2, 3, 4, 5, 6], [42]]
    batched = model.generate(prompts, max_new_tokens=12, temperature=0)
    alone = [model.generate([p], max_new_tokens=12, temperature=0)[0] for p in prompts]
    assert batched == alone
    assert all(len(out) == 12 for out in batched)


def test_each_sequence_stops_at_its_own_eos():
    model = build()
    prompts = [[3, 4, 5], [6, 7]]
    free = model.generate(prompts, max_new_tokens=10, temperature=0)
    eos = free[0][2]  # make a token the first row generates its EOS
    stopped = model.generate(prompts, max_new_tokens=10, temperature=0, eos_token_id=eos)
    for row in range(2):
        cut = free[row].index(eos) if eos in free[row] else len(free[row])
        assert stopped[row] == free[row][:cut]
    assert len(stopped[0]) <= 2


def test_sampling_is_reproducible_with_a_seed():
    model = build()
    prompts = [[1, 2, 3], [4, 5]]
    a = model.generate(prompts, 16, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    b = model.generate(prompts, 16, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    c = model.generate(prompts, 16, temperature=1.0, top_k=20, top_p=0.9, seed=8)
    assert a == b and a != c


def reference_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Plain multi-head attention with K/V heads repeated for each query head that shares them."""
    B, T, _ = x.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = attn.wqkv(x).split(attn._split, dim=-1)
    q = attn.q_norm(q.view(B, T, H, D)).transpose(1, 2)
    k = attn.k_norm(k.view(B, T, Hkv, D)).transpose(1, 2)
    v = v.view(B, T, Hkv, D).transpose(1, 2)
    rotary = RotaryEmbedding(D, 10000.0)(torch.arange(T).expand(B, T))
    q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.wo(y.transpose(1, 2).reshape(B, T, H * D))


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_gqa_attention_equals_multi_head_attention_with_shared_kv(n_kv_heads):
    torch.manual_seed(0)
    attn = Attention(tiny(n_kv_heads=n_kv_heads)).eval()
    x = torch.randn(2, 12, 128)
    with torch.no_grad():
        out = attn(x, RotaryEmbedding(32, 10000.0)(torch.arange(12).expand(2, 12)))
        torch.testing.assert_close(out, reference_attention(attn, x), rtol=1e-5, atol=1e-5)
    assert attn.wqkv.out_features == 128 + 2 * n_kv_heads * 32  # K/V are not copied per query head


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=32, theta=10000.0)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(m, n):
        return (apply_rotary(q, rope(torch.tensor([[m]]))) * apply_rotary(k, rope(torch.tensor([[n]])))).sum()

    for shift in (1, 17, 500):
        torch.testing.assert_close(score(3, 9), score(3 + shift, 9 + shift), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(score(3, 9), score(3, 10))


def test_rope_uses_each_rows_own_positions():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=16, theta=10000.0)
    x = torch.randn(2, 2, 3, 16)
    positions = torch.tensor([[0, 1, 2], [10, 11, 12]])
    out = apply_rotary(x, rope(positions))
    torch.testing.assert_close(out[1:], apply_rotary(x[1:], rope(positions[1:])))
    torch.testing.assert_close(out[:1], apply_rotary(x[:1], rope(torch.tensor([[0, 1, 2]]))))
    assert not torch.allclose(apply_rotary(x[1:], rope(positions[:1])), out[1:])


def expected_parameter_count(c: ModelConfig) -> int:
    hd = c.d_model // c.n_heads
    attention = c.d_model * (c.n_heads * hd) * 2 + c.d_model * (c.n_kv_heads * hd) * 2
    qk_norm = 2 * hd if c.qk_norm else 0
    ffn = 3 * c.d_model * c.ffn_hidden_size
    per_layer = attention + qk_norm + ffn + 2 * c.d_model
    embeddings = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    return embeddings + c.n_layers * per_layer + c.d_model


@pytest.mark.parametrize("preset", ["tiny", "small", "medium", "large"])
def test_preset_parameter_counts_match_the_formula(preset):
    cfg = ModelConfig.from_preset(preset, vocab_size=1000)
    with torch.device("meta"):
        model = MarjaraModel(cfg)
    assert sum(p.numel() for p in model.parameters()) == expected_parameter_count(cfg)
    assert model.num_parameters() == expected_parameter_count(cfg)
    assert model.num_active_parameters() == model.num_parameters()


def test_untied_embeddings_count_the_output_projection():
    cfg = ModelConfig.from_preset("tiny", vocab_size=1000, tie_embeddings=False)
    assert MarjaraModel(cfg).num_parameters() == expected_parameter_count(cfg)


def test_moe_parameter_counts_total_and_active():
    model = build(**MOE)
    c = model.config
    expert = 3 * c.d_model * c.ffn_hidden_size
    gate = c.d_model * c.num_experts
    dense = expected_parameter_count(c) - len(c.moe_layers) * expert
    assert model.num_parameters() == dense + len(c.moe_layers) * (c.num_experts * expert + gate)
    assert model.num_active_parameters() == dense + len(c.moe_layers) * (c.top_k * expert + gate)
    flops = model.flops_per_token(64)
    matmul = model.num_active_parameters(include_embeddings=False) + c.vocab_size * c.d_model
    assert flops == 6 * matmul + 12 * c.n_layers * c.d_model * 64


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_forward_backward_aux_loss_and_expert_counts(top_k):
    model = build(use_moe=True, num_experts=4, top_k=top_k, capacity_factor=4.0).train()
    idx = torch.randint(0, VOCAB, (2, 16))
    hidden = []
    handle = model.norm.register_forward_hook(lambda _m, _i, out: hidden.append(out.detach()))
    out = model(idx, targets=idx)
    handle.remove()
    loss, aux = out.loss, out.aux_loss
    ce = F.cross_entropy(model.lm_head(hidden[0]).view(-1, VOCAB), idx.view(-1))  # same forward's routing
    assert aux is not None and aux > 0
    torch.testing.assert_close(loss, ce + model.config.aux_loss_coef * aux)
    assert sorted(out.expert_counts) == model.config.moe_layers
    for counts in out.expert_counts.values():
        assert counts.shape == (4,) and int(counts.sum()) == 2 * 16 * top_k
    loss.backward()
    gate = model.blocks[1].ffn.moe.deepspeed_moe.gate.wg.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0  # the aux loss trains the router
    experts = [p for n, p in model.named_parameters() if "deepspeed_experts" in n]
    assert experts and all(p.grad is not None for p in experts)


def test_use_residual_moe_runs():
    model = build(use_moe=True, num_experts=2, top_k=1, use_residual=True).train()
    idx = torch.randint(0, VOCAB, (2, 8))
    loss = model(idx, targets=idx).loss
    loss.backward()
    assert model.blocks[1].ffn.moe.coefficient.weight.grad is not None


@pytest.mark.parametrize("overrides", [{}, MOE], ids=["dense", "moe"])
def test_tiny_model_overfits_one_batch(overrides):
    torch.manual_seed(0)
    model = MarjaraModel(tiny(**overrides, capacity_factor=2.0)).train()
    idx = torch.randint(0, VOCAB, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(300):
        loss = model(x, targets=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.1:
            break
    assert loss.item() < 0.1, f"loss {loss.item():.3f} after {step + 1} steps"


def test_a_moe_model_without_a_process_group_says_who_sets_one_up():
    """The model starts no process group itself: in a plain process it names the one call to make."""
    code = ("from marjara.model import MarjaraModel, ModelConfig\n"
            "MarjaraModel(ModelConfig.from_preset('tiny', vocab_size=128, use_moe=True))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "a MoE model needs DeepSpeed's process group and none is set up" in last, last
    assert "marjara.distributed.ensure_process_group()" in last and "MarjaraModel(config, inference=True)" in last
