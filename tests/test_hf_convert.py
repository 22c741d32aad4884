"""python -m marjara.convert CKPT OUT --format hf on checkpoints real 2-rank train.py runs wrote
(ZeRO-3 partitions, expert-parallel MoE with ep_size 2, top-1 and top-2), loaded by transformers."""

import json
import subprocess
import sys

import pytest
import torch

from checkpoint_runs import ROOT, checkpoint, engine_logits
from marjara.checkpoint.conversion import load_checkpoint_model

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("process_group")]  # MoE models need one


def convert_hf(ckpt, out, *flags):
    result = subprocess.run([sys.executable, "-m", "marjara.convert", str(ckpt), str(out), "--format", "hf", *flags],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    return transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()


def assert_same_outputs(model, hf, vocab):
    generator = torch.Generator().manual_seed(0)
    assert not model.training  # eval mode: MoE layers route every token to its top-k experts
    with torch.no_grad():
        for batch, tokens in [(1, 1), (3, 19), (2, 32)]:
            idx = torch.randint(0, vocab, (batch, tokens), generator=generator)
            torch.testing.assert_close(hf(idx).logits, model(idx).logits, rtol=0, atol=1e-4)
        ours = model.generate([[5, 6, 7, 8]], 20, temperature=0)[0]
    theirs = hf.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert ours == theirs[0, 4:].tolist()


@pytest.mark.parametrize("run, top_k", [("moe_ep2", 2), ("moe_ep2_top1", 1)])
def test_expert_parallel_moe_checkpoint_runs_in_transformers(run, top_k, tmp_path_factory, tmp_path):
    ckpt = checkpoint(tmp_path_factory, run)
    hf = convert_hf(ckpt, tmp_path / "hf")
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    assert hf.config.num_experts == 4 and hf.config.num_experts_per_tok == top_k
    model, tokenizer = load_checkpoint_model(ckpt)
    assert model.config.ep_size == 1 and tokenizer == "bytes"
    assert_same_outputs(model, hf, model.config.vocab_size)
    if top_k == 2:  # and against DeepSpeed's own engine, 2 ranks with 2 experts each
        reference = engine_logits(tmp_path_factory, run)
        with torch.no_grad():
            torch.testing.assert_close(hf(reference["idx"]).logits, reference["logits"], rtol=0, atol=1e-4)


def test_zero3_partitions_export_sharded_and_run_in_transformers(tmp_path_factory, tmp_path):
    ckpt = checkpoint(tmp_path_factory, "zero3")
    hf = convert_hf(ckpt, tmp_path / "hf", "--max_shard_size", "300KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, _ = load_checkpoint_model(ckpt)
    assert_same_outputs(model, hf, model.config.vocab_size)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok.encode("héllo", add_special_tokens=False) == list("héllo".encode())
