"""The tiled SwiGLU and the offloaded block checkpoint: the same numbers as the plain paths, and
the activations kept for backward are only what each is meant to keep."""

from __future__ import annotations

import torch

from marjara.model import MarjaraModel
from marjara.model.config import ModelConfig
from marjara.model.ffn import SwiGLU
from marjara.model.tiled_mlp import enable_tiled_mlp
from marjara.train.checkpointing import checkpoint_function


def saved_bytes(fn) -> int:
    """Bytes of the non-parameter tensors autograd keeps for backward while fn() runs."""
    total = 0

    def pack(tensor):
        nonlocal total
        if not isinstance(tensor, torch.nn.Parameter):
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return total, out


def test_tiled_swiglu_equals_the_plain_one_and_keeps_only_its_input():
    torch.manual_seed(0)
    mlp = SwiGLU(32, 96)
    x = torch.randn(2, 100, 32, requires_grad=True)
    plain_bytes, plain = saved_bytes(lambda: mlp(x))
    plain.square().sum().backward()
    want = [x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()]
    x.grad = None
    mlp.zero_grad()

    mlp.chunk_tokens = 32  # 200 tokens -> 7 slices
    tiled_bytes, tiled = saved_bytes(lambda: mlp(x))
    torch.testing.assert_close(tiled, plain, rtol=0, atol=1e-6)
    tiled.square().sum().backward()
    for got, expected in zip([x.grad] + [p.grad for p in mlp.parameters()], want):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # plain: x, gate/up (2 x 96 wide), silu(gate), product... ; tiled: the input slices only
    assert tiled_bytes <= x.numel() * 4 < plain_bytes / 4, (tiled_bytes, plain_bytes)


def test_enable_tiled_mlp_tiles_each_dense_mlp_by_d_model_tokens():
    model = MarjaraModel(ModelConfig.from_preset("tiny", vocab_size=64))
    assert enable_tiled_mlp(model) == model.config.n_layers
    assert {block.ffn.chunk_tokens for block in model.blocks} == {model.config.d_model}


def test_offloaded_checkpointing_gives_the_same_loss_and_gradients():
    config = ModelConfig.from_preset("tiny", vocab_size=64)
    idx = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(0))
    results = []
    for ds_config in ({}, {"zero_optimization": {"stage": 3}}, {"activation_checkpointing": {"cpu_checkpointing": True}}):
        torch.manual_seed(0)
        model = MarjaraModel(config).train()
        if ds_config:
            model.checkpoint_fn = checkpoint_function(ds_config)
        loss = model(idx, targets=idx).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=1e-6)
        for name, grad in results[0][1].items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_offloaded_checkpointing_keeps_each_block_input_on_the_cpu(monkeypatch):
    """What save_on_cpu packs is exactly the checkpointed blocks' inputs (x and the rotations)."""
    config = ModelConfig.from_preset("tiny", vocab_size=64)
    model = MarjaraModel(config).train()
    model.checkpoint_fn = checkpoint_function({"activation_checkpointing": {"cpu_checkpointing": True}})
    packed = []
    original = torch.autograd.graph.save_on_cpu.__init__

    def recording_init(self, pin_memory=False, device_type="cuda"):
        original(self, pin_memory, device_type)
        inner_pack = self.pack_hook

        def pack(tensor):
            packed.append(tuple(tensor.shape))
            return inner_pack(tensor)
        self.pack_hook = pack

    monkeypatch.setattr(torch.autograd.graph.save_on_cpu, "__init__", recording_init)
    idx = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(0))
    loss = model(idx, targets=idx).loss
    loss.backward()
    hidden = (2, 48, config.d_model)
    assert packed.count(hidden) == config.n_layers, packed
    assert all(shape == hidden or shape[-2] == 48 for shape in packed), packed  # inputs only, no 4x-wide MLP tensors
