"""Converting checkpoints that real 2-rank train.py runs wrote: ZeRO 1/2/3 dense, MoE with expert
parallelism (ep_size 2, ZeRO-2), EMA, bf16 master weights; checked against DeepSpeed's own readers."""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from checkpoint_runs import ROOT, STEPS, checkpoint, engine_logits
from engine_logits import fixed_batch
from train_helpers import ema_weights
from marjara.checkpoint.conversion import convert
from marjara.model import MarjaraModel
from marjara.model.pretrained import CONFIG_FILE, WEIGHTS_FILE

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("process_group")]  # MoE models need one


def zero_to_fp32(ckpt_dir, tag=None) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    return {name: tensor.contiguous() for name, tensor in state.items()}


def logits_of(model, idx):
    with torch.no_grad():
        return model(idx).logits


def read_config(out) -> dict:
    return json.loads((out / CONFIG_FILE).read_text())


def trained_model(ckpt_dir, state) -> MarjaraModel:
    meta = json.loads((ckpt_dir / f"global_step{STEPS}" / "marjara.json").read_text())
    from marjara.model.config import ModelConfig

    model = MarjaraModel(ModelConfig.from_dict(meta["model_config"]))
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.parametrize("run", ["zero1", "zero2", "zero3"])
def test_dense_export_equals_zero_to_fp32_and_gives_the_same_logits(run, tmp_path_factory, tmp_path):
    ckpt = checkpoint(tmp_path_factory, run)
    out = convert(ckpt, tmp_path / "model")
    reference = zero_to_fp32(ckpt)
    stored = load_file(out / WEIGHTS_FILE)
    assert set(stored) == set(reference) - {"lm_head.weight"}  # tied to tok_emb.weight
    for name, tensor in stored.items():
        assert torch.equal(tensor, reference[name]), name
    converted = MarjaraModel.from_pretrained(out)
    idx = fixed_batch(converted.config.vocab_size)
    torch.testing.assert_close(logits_of(converted, idx), logits_of(trained_model(ckpt, reference), idx),
                               rtol=0, atol=0)
    assert read_config(out)["source"]["step"] == STEPS


def test_moe_expert_parallel_export_matches_the_deepspeed_engine(tmp_path_factory, tmp_path):
    ckpt = checkpoint(tmp_path_factory, "moe_ep2")
    reference = engine_logits(tmp_path_factory, "moe_ep2")  # 2 ranks, ep_size 2, engine.load_checkpoint
    out = convert(ckpt, tmp_path / "model")
    converted = MarjaraModel.from_pretrained(out)
    assert converted.config.ep_size == 1 and read_config(out)["model"]["ep_size"] == 1
    torch.testing.assert_close(logits_of(converted, reference["idx"]), reference["logits"], rtol=1e-5, atol=1e-5)
    stored = load_file(out / WEIGHTS_FILE)
    experts = {name.split("deepspeed_experts.")[1].split(".")[0] for name in stored if "deepspeed_experts" in name}
    assert experts == {"0", "1", "2", "3"}  # rank 1's local experts 0, 1 became global 2, 3
    with pytest.raises(ValueError, match="is not a model state checkpoint"):
        zero_to_fp32(ckpt)  # why MARJARA reads expert files itself


@pytest.mark.parametrize("run", ["zero2", "zero3", "moe_ep2"])
def test_ema_export_equals_the_trainers_ema_weights(run, tmp_path_factory, tmp_path):
    from marjara.checkpoint.ema_reader import ema_tensors
    from marjara.checkpoint.locate import open_checkpoint

    ckpt = checkpoint(tmp_path_factory, run)
    expected = ema_weights(ckpt / (ckpt / "latest").read_text().strip())
    merged = ema_tensors(open_checkpoint(ckpt))  # what a resume on another world size loads
    assert set(merged) == set(expected) and all(torch.equal(merged[n], expected[n]) for n in expected)

    ema_out = convert(ckpt, tmp_path / "ema", ema=True)
    stored = load_file(ema_out / WEIGHTS_FILE)
    assert set(stored) == set(expected)
    for name, tensor in stored.items():
        assert torch.equal(tensor, expected[name].reshape(tensor.shape)), name
    weights = load_file(convert(ckpt, tmp_path / "weights") / WEIGHTS_FILE)
    assert any(not torch.equal(stored[n], weights[n]) for n in stored)  # really the EMA, not the weights
    assert read_config(ema_out)["source"]["ema"] is True
    MarjaraModel.from_pretrained(ema_out)  # strict load


def test_bf16_training_exports_the_fp32_master_weights(tmp_path_factory, tmp_path):
    ckpt = checkpoint(tmp_path_factory, "moe_ep2_bf16")
    tag_dir = ckpt / (ckpt / "latest").read_text().strip()
    module = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    for path in tag_dir.glob("layer_*_expert_*_model_states.pt"):
        module.update(torch.load(path, weights_only=True))
    stored = load_file(convert(ckpt, tmp_path / "fp32") / WEIGHTS_FILE)
    assert set(stored) == set(module) - {"lm_head.weight"}
    finer = 0
    for name, master in stored.items():
        assert master.dtype == torch.float32 and module[name].dtype == torch.bfloat16
        assert torch.equal(master.bfloat16(), module[name]), name  # the bf16 weights are these, rounded
        finer += not torch.equal(master, module[name].float())
    assert finer == len(stored)  # every tensor carries more than bf16 precision: the optimizer's masters
    as_bf16 = load_file(convert(ckpt, tmp_path / "bf16", dtype=torch.bfloat16) / WEIGHTS_FILE)
    assert all(torch.equal(as_bf16[n], stored[n].bfloat16()) for n in stored)
    assert read_config(tmp_path / "bf16")["dtype"] == "bfloat16"


def test_tag_picks_an_older_checkpoint_and_config_records_where_it_came_from(tmp_path_factory, tmp_path):
    ckpt = checkpoint(tmp_path_factory, "zero2")  # saved at steps 1 and 2
    old = convert(ckpt, tmp_path / "step1", tag="global_step1")
    new = convert(ckpt, tmp_path / "latest")
    meta1 = json.loads((ckpt / "global_step1" / "marjara.json").read_text())
    assert read_config(old)["source"] == {"checkpoint": str(ckpt.resolve()), "tag": "global_step1", "step": 1,
                                          "tokens": meta1["tokens_seen"], "ema": False}
    assert read_config(new)["source"]["tag"] == "global_step2"
    assert read_config(old)["tokenizer"] == "bytes" and read_config(old)["dtype"] == "float32"
    a, b = load_file(old / WEIGHTS_FILE), load_file(new / WEIGHTS_FILE)
    assert not torch.equal(a["tok_emb.weight"], b["tok_emb.weight"])
    reference = zero_to_fp32(ckpt, tag="global_step1")
    assert all(torch.equal(a[n], reference[n]) for n in a)


def test_cli_converts_zero3_without_a_launcher(tmp_path_factory, tmp_path):
    ckpt = checkpoint(tmp_path_factory, "zero3")
    env_free = {k: v for k, v in os.environ.items()
                if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run([sys.executable, "-m", "marjara.convert", str(ckpt), str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=ROOT, env=env_free, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "model.safetensors" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
