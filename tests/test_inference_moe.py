"""MoE models built for inference (plain-PyTorch MoE layers): the same weights and eval-mode outputs
as DeepSpeed's MoE layers, no process group, copy.deepcopy, and loading and generating in a plain
process."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from marjara.checkpoint.export import save_pretrained
from marjara.errors import MarjaraError
from marjara.model import MarjaraModel, ModelConfig
from marjara.model.ffn import moe_eval_routing

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 101


def config(**overrides) -> ModelConfig:
    return ModelConfig.from_preset("tiny", vocab_size=VOCAB, use_moe=True, num_experts=4, **overrides)


def twins(**overrides) -> tuple[MarjaraModel, MarjaraModel]:
    """(a training model on DeepSpeed's MoE layers, an inference model given its state dict), in eval mode."""
    from marjara.distributed import ensure_process_group

    ensure_process_group()  # DeepSpeed's layers need one; the inference model does not
    torch.manual_seed(0)
    deepspeed_model = MarjaraModel(config(**overrides)).eval()
    inference_model = MarjaraModel(config(**overrides), inference=True).eval()
    inference_model.load_state_dict(deepspeed_model.state_dict(), strict=True)
    return deepspeed_model, inference_model


@pytest.mark.parametrize("use_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_inference_layers_give_deepspeeds_eval_outputs_on_the_same_weights(top_k, use_residual):
    deepspeed_model, inference_model = twins(top_k=top_k, use_residual=use_residual)
    shapes = {n: p.shape for n, p in deepspeed_model.named_parameters()}
    assert {n: p.shape for n, p in inference_model.named_parameters()} == shapes  # names, shapes, order
    # 3 x 17 tokens: more per expert than DeepSpeed's own eval capacity would keep.
    idx = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))
    targets = idx.roll(-1, dims=1)
    with torch.no_grad():
        expected, got = deepspeed_model(idx), inference_model(idx)
        expected_scored, scored = deepspeed_model(idx, targets), inference_model(idx, targets)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(scored.loss, expected_scored.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.aux_loss, expected.aux_loss, rtol=0, atol=1e-6)
    assert got.expert_counts.keys() == expected.expert_counts.keys() == set(inference_model.config.moe_layers)
    for layer, counts in got.expert_counts.items():
        assert torch.equal(counts, expected.expert_counts[layer])
    # The generation path (KV cache, one token at a time) agrees with DeepSpeed's too.
    prompt = idx[0, :5].tolist()
    assert inference_model.generate([prompt], 8, temperature=0) == deepspeed_model.generate([prompt], 8, temperature=0)


def test_bf16_inference_layers_stay_close_to_deepspeeds():
    deepspeed_model, inference_model = twins(top_k=2)
    deepspeed_model.to(torch.bfloat16), inference_model.to(torch.bfloat16)
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(inference_model(idx).logits.float(), deepspeed_model(idx).logits.float(),
                                   rtol=0, atol=2e-2)


def test_an_inference_model_needs_no_process_group_and_copies():
    model = MarjaraModel(config(top_k=2, ep_size=2), inference=True).eval()
    assert model.config.ep_size == 1  # one process holds every expert
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    twin = copy.deepcopy(model)
    idx = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(twin(idx).logits, model(idx).logits, rtol=0, atol=0)
        twin.lm_head.weight.add_(1.0)  # a copy, not a view
        assert not torch.allclose(twin(idx).logits, model(idx).logits)


def test_an_inference_model_refuses_training_and_the_training_gate():
    model = MarjaraModel(config(), inference=True)
    idx = torch.randint(0, VOCAB, (2, 9))
    with pytest.raises(MarjaraError, match=r"MoE layers are for inference .* train with MarjaraModel\(config\)"):
        model.train()(idx)
    with pytest.raises(MarjaraError, match="no training gate"), moe_eval_routing(model, "training"):
        model.eval()(idx)


def plain_env() -> dict:
    """A process that no launcher started: no process-group variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_SIZE")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


LOAD_AND_GENERATE = """
import copy, json, sys
import torch
from marjara.model import MarjaraModel
model = MarjaraModel.from_pretrained(sys.argv[1])
twin = copy.deepcopy(model)
tokens = model.generate([[1, 2, 3]], 6, temperature=0)[0]
assert twin.generate([[1, 2, 3]], 6, temperature=0)[0] == tokens
from marjara.eval.lm_eval_adapter import MarjaraLM
lm = MarjaraLM(pretrained=sys.argv[1])
score = lm._loglikelihood_tokens([(None, [1, 2, 3], [4, 5])])[0][0]
import deepspeed.comm
print(json.dumps({"tokens": tokens, "score": score, "torch_group": torch.distributed.is_initialized(),
                  "deepspeed_group": deepspeed.comm.is_initialized()}))
"""


def test_a_plain_process_loads_copies_scores_and_generates_a_moe_model(tmp_path):
    import json

    torch.manual_seed(0)
    model = MarjaraModel(config(top_k=2, use_residual=True), inference=True).eval()
    out = save_pretrained(model, model.config, tmp_path / "model", tokenizer="bytes")
    run = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(out)], capture_output=True, text=True,
                         timeout=300, env=plain_env(), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["tokens"] == model.generate([[1, 2, 3]], 6, temperature=0)[0]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([[1, 2, 3, 4]])).logits[0, 2:].float(), dim=-1)
    assert result["score"] == pytest.approx(float(logprobs[0, 4] + logprobs[1, 5]), abs=1e-5)
    assert result["torch_group"] is False and result["deepspeed_group"] is False

    cli = subprocess.run([sys.executable, "-m", "marjara.generate", str(out), "--prompt", "ab", "--max_new_tokens", "6",
                          "--temperature", "0"], capture_output=True, text=True, timeout=300, env=plain_env(), cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    from marjara.data.tokenizer import get_tokenizer

    tok = get_tokenizer("bytes")
    expected = model.generate([tok.encode("ab")], 6, temperature=0, eos_token_id=tok.eot_id)[0]
    assert cli.stdout == "ab" + tok.decode(expected) + "\n"
