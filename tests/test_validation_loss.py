"""Validation scores through the same chunked output head as training: the values the full fp32
logits gave, without materialising them (the memory is measured by bench/loss_memory.py)."""

import pytest
import torch
import torch.nn.functional as F

from marjara.distributed import ensure_process_group
from marjara.model import MarjaraModel
from marjara.model.config import ModelConfig
from marjara.train.config import TrainConfig
from marjara.train.engine import initialize_engine
from marjara.train.evaluator import Evaluator
from marjara.train.optim import build_adamw, parameter_groups

VOCAB = 300


@pytest.fixture(autouse=True)
def restore_linear():
    """A ZeRO-3 engine replaces torch.nn.functional.linear process-wide; give it back."""
    linear = F.linear
    yield
    F.linear = linear


def batches():
    data = torch.randint(0, VOCAB, (3, 4, 25), generator=torch.Generator().manual_seed(2))
    pairs = []
    for batch in data:
        y = batch[:, 1:].clone()
        y[0, :6] = -1  # ignored targets, as padding gives
        pairs.append((batch[:, :-1], y))
    return pairs


def full_logits_loss(model, pairs) -> float:
    """The validation loss as it was computed before: fp32 logits of each whole batch."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for x, y in pairs:
            logits = model(x).logits
            total += F.cross_entropy(logits.float().view(-1, VOCAB), y.reshape(-1), reduction="sum",
                                     ignore_index=-1).double().item()
            count += int((y != -1).sum())
    return total / count


@pytest.mark.parametrize("stage, moe, chunk", [(0, False, None), (0, False, 7), (3, False, 7), (0, True, 7)],
                         ids=["zero0", "zero0-small-chunks", "zero3-small-chunks", "moe-small-chunks"])
def test_validation_through_the_chunked_head_equals_the_full_logits_loss(stage, moe, chunk):
    ensure_process_group()
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=VOCAB, use_moe=moe, num_experts=4, top_k=2)
    model = MarjaraModel(config)
    if chunk:
        model.lm_head.chunk_tokens = chunk  # many slices per batch of 4 x 24 tokens
    cfg = TrainConfig.from_flags({"batch_size": 4, "zero_stage": stage}, has_gpu=False)
    engine = initialize_engine(model=model, optimizer=build_adamw(parameter_groups(model, 0.1), cfg),
                               config=cfg.engine_config(world_size=1))
    pairs = batches()
    loss = Evaluator(engine, [("", 1.0, pairs)], None, None, "deterministic", interval=0, last_step=0).loss()
    assert engine.module.training  # handed back in training mode
    if stage == 3:
        from deepspeed.utils import safe_get_full_fp32_param

        reference = MarjaraModel(config)
        with torch.no_grad():
            for (_, param), target in zip(engine.module.named_parameters(), reference.parameters()):
                target.copy_(safe_get_full_fp32_param(param))
    else:
        reference = engine.module
    assert loss == pytest.approx(full_logits_loss(reference, pairs), abs=1e-6)


def test_continuation_scores_in_slices_equal_the_whole_rows_logits():
    from marjara.eval.scoring import continuation_logprobs

    torch.manual_seed(0)
    model = MarjaraModel(ModelConfig.from_preset("tiny", vocab_size=VOCAB, n_layers=2)).eval()
    rng = torch.Generator().manual_seed(3)
    pairs = [(torch.randint(0, VOCAB, (n,), generator=rng).tolist(), torch.randint(0, VOCAB, (m,), generator=rng).tolist())
             for n, m in ((5, 30), (1, 1))]
    context = torch.randint(0, VOCAB, (12,), generator=rng).tolist()
    pairs.append((context, model.generate([context], 17, temperature=0)[0]))  # greedy by construction
    expected = []
    with torch.no_grad():
        for context, continuation in pairs:
            whole = torch.tensor([context + continuation])
            logprobs = torch.log_softmax(model(whole[:, :-1]).logits[0].float(), dim=-1)[-len(continuation):]
            target = torch.tensor(continuation)
            expected.append((logprobs.gather(-1, target[:, None]).sum().item(),
                             bool((logprobs.argmax(-1) == target).all())))
    assert [greedy for _, greedy in expected] == [False, False, True]
    model.lm_head.chunk_tokens = 4  # the 30-token continuation in 8 slices
    for (got, greedy), (want, want_greedy) in zip(continuation_logprobs(model, pairs, 64, batch_size=2), expected):
        assert got == pytest.approx(want, abs=1e-5) and greedy == want_greedy
