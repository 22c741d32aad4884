"""train.py --init_from on 2 ranks: a randomly initialised transformers Qwen3 model trained under
ZeRO-2, and a MARJARA MoE model exported to the Hugging Face layout trained with expert
parallelism (ep_size 2). The first step's loss is the transformers model's own loss on the same
batches: the weights arrived, each expert on the rank that holds it."""

import json

import pytest
import torch
import torch.nn.functional as F

from marjara.data import TrainStream, open_data
from marjara.model import MarjaraModel
from marjara.model.config import ModelConfig
from train_helpers import QUICK, run_train, train_losses

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
SEQ, BATCH, SEED = 32, 2, 5
RUN = [flag for i, flag in enumerate(QUICK) if "--model_size" not in QUICK[max(i - 1, 0): i + 1]]  # the folder's


def first_step_loss(hf, world: int = 2) -> float:
    """transformers' mean cross-entropy over the micro-batches train.py's ranks take at step 1."""
    data = open_data(None, SEQ, None)  # the built-in corpus, as the runs below use
    losses = []
    for rank in range(world):
        x, y = TrainStream(data.train, SEED, BATCH, 1, rank, world, 0).next_micro_batch()
        with torch.no_grad():
            logits = hf(x).logits
        losses.append(F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).item())
    return sum(losses) / world


def train_from(folder, out, *extra):
    run_train([*RUN, "--seq_len", str(SEQ), "--batch_size", str(BATCH), "--seed", str(SEED), "--max_steps", "2",
               "--init_from", str(folder), "--out_dir", str(out), *extra], nproc=2)
    return train_losses(out)


def test_a_random_transformers_qwen3_trains_under_zero2_on_2_ranks(tmp_path):
    config = transformers.Qwen3Config(
        vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0})
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "qwen3")
    losses = train_from(tmp_path / "qwen3", tmp_path / "run", "--deepspeed_config", "ds_configs/zero2.json")
    assert losses[1] == pytest.approx(first_step_loss(hf), abs=2e-5)
    assert losses[2] != losses[1]
    meta = json.loads(next((tmp_path / "run").glob("global_step2/marjara.json")).read_text())
    assert meta["zero_stage"] == 2 and meta["model_config"]["rope_theta"] == 20000.0
    assert meta["model_config"]["d_model"] == 64 and meta["model_config"]["tie_embeddings"] is False


@pytest.mark.usefixtures("process_group")  # to build the MoE model exported here
def test_an_exported_moe_model_trains_with_expert_parallelism(tmp_path):
    from marjara.hf.export import save_pretrained_hf

    torch.manual_seed(0)
    model = MarjaraModel(ModelConfig.from_preset("tiny", vocab_size=320, use_moe=True, num_experts=4, top_k=1))
    with torch.no_grad():  # a router with opinions: tokens really go to different experts
        for name, param in model.named_parameters():
            if "gate.wg" in name:
                param.normal_(0.0, 0.5)
    save_pretrained_hf(model, tmp_path / "hf", tokenizer="bytes")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    # Top-1 routing with room for every token (capacity_factor x tokens / experts >= tokens) is
    # what transformers computes; the aux loss is left out of the comparison.
    losses = train_from(tmp_path / "hf", tmp_path / "run", "--deepspeed_config", "ds_configs/moe_zero2.json",
                        "--ep_size", "2", "--capacity_factor", "4", "--aux_loss_coef", "0")
    assert losses[1] == pytest.approx(first_step_loss(hf), abs=2e-5)
    meta = json.loads(next((tmp_path / "run").glob("global_step2/marjara.json")).read_text())
    assert meta["model_config"]["ep_size"] == 2 and meta["model_config"]["use_moe"] is True
