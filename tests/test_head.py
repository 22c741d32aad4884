"""The chunked output head + cross-entropy equals the plain path: loss and gradients, fp32."""

import pytest
import torch
import torch.nn.functional as F

from marjara.model import MarjaraModel
from marjara.model.config import ModelConfig
from marjara.model.head import chunked_cross_entropy_sum, tokens_per_chunk


def plain_loss(hidden, weight, targets):
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_loss_and_gradients_equal_the_plain_path(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 21, 32, requires_grad=True)
    weight = (torch.randn(300, 32) * 0.3).requires_grad_()
    targets = torch.randint(0, 300, (3, 21))
    targets[0, :5] = -1  # ignored positions, as padding would be
    expected = plain_loss(hidden, weight, targets)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    total, count = chunked_cross_entropy_sum(hidden, weight, targets, chunk)
    loss = total / count
    grads = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_the_models_loss_and_gradients_equal_the_plain_path_with_tied_weights():
    torch.manual_seed(0)
    model = MarjaraModel(ModelConfig.from_preset("tiny", vocab_size=320, n_layers=2))
    model.lm_head.chunk_tokens = 5  # several slices for 2 x 16 tokens
    idx = torch.randint(0, 320, (2, 17))
    x, y = idx[:, :-1], idx[:, 1:]
    loss = model(x, targets=y).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected = plain_loss(model.hidden_states(x), model.lm_head.weight, y)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=0, atol=1e-5, msg=name)


def test_without_gradients_nothing_is_recomputed_and_the_loss_is_the_same():
    torch.manual_seed(1)
    hidden, weight = torch.randn(40, 16), torch.randn(50, 16)
    targets = torch.randint(0, 50, (40,))
    with torch.no_grad():
        total, count = chunked_cross_entropy_sum(hidden, weight, targets, 6)
        loss = total / count
    torch.testing.assert_close(loss, plain_loss(hidden, weight, targets), rtol=0, atol=1e-5)


def test_slices_hold_a_bounded_number_of_fp32_logits():
    assert tokens_per_chunk(100_352, budget=2**20) == 2
    assert tokens_per_chunk(10**9, budget=2**20) == 1
    assert tokens_per_chunk(256) * 256 * 4 <= 256 * 2**20
