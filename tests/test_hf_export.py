"""The Hugging Face layout against transformers itself (fp32): exported MARJARA models give the same
logits and greedy tokens in Qwen3ForCausalLM / Qwen3MoeForCausalLM, come back bit-identical, and
what transformers cannot express is refused in one line."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from marjara.checkpoint.export import save_pretrained
from marjara.hf.export import parse_size, plan_shards, save_pretrained_hf, write_hf_export
from marjara.checkpoint.pieces import Piece
from marjara.errors import MarjaraError
from marjara.model import MarjaraModel
from marjara.model.config import ModelConfig
from marjara.hf.config import from_hf_config, to_hf_config
from marjara.hf.layout import hf_shapes

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("process_group")  # the MoE models built here need one
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
VOCAB = 257  # the bytes tokenizer's
LENGTHS = [(1, 1), (3, 17), (2, 64)]  # (batch, tokens)
DENSE = {
    "tied": {},
    "untied_theta": {"tie_embeddings": False, "rope_theta": 500000.0},
    "mqa": {"n_kv_heads": 1},
}


def build(seed=0, **overrides) -> MarjaraModel:
    torch.manual_seed(seed)
    model = MarjaraModel(ModelConfig.from_preset("tiny", vocab_size=VOCAB, **overrides)).eval()
    with torch.no_grad():  # norms away from 1 and routers with opinions, so that a wrong mapping shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            if "gate.wg" in name:
                param.normal_(0.0, 0.5)
    return model


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def assert_same_outputs(model: MarjaraModel, hf, prompt_seed: int = 0) -> None:
    """Logits within 1e-4 on batches of several lengths, identical greedy continuations."""
    generator = torch.Generator().manual_seed(prompt_seed)
    assert not model.training  # eval mode: MoE layers route every token to its top-k experts
    with torch.no_grad():
        for batch, tokens in LENGTHS:
            idx = torch.randint(0, VOCAB, (batch, tokens), generator=generator)
            torch.testing.assert_close(hf(idx).logits, model(idx).logits, rtol=0, atol=1e-4)
        prompt = torch.randint(0, VOCAB, (1, 5), generator=generator)
        ours = model.generate(prompt.tolist(), 24, temperature=0)[0]
    theirs = hf.generate(prompt, max_new_tokens=24, do_sample=False, min_new_tokens=24)[0, 5:].tolist()
    assert ours == theirs


def assert_identical(a: MarjaraModel, b: MarjaraModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("overrides", DENSE.values(), ids=DENSE.keys())
def test_dense_export_runs_in_transformers_and_comes_back_identical(tmp_path, overrides):
    model = build(**overrides)
    out = save_pretrained_hf(model, tmp_path / "hf", tokenizer="bytes")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["marjara"]["tokenizer"] == "bytes"
    hf = hf_model(out)
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    assert hf.config.tie_word_embeddings == model.config.tie_embeddings
    assert hf.config.num_key_value_heads == model.config.n_kv_heads
    assert_same_outputs(model, hf)
    back = MarjaraModel.from_pretrained(out)
    assert back.config.differences(model.config) == []
    assert_identical(back, model)


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_export_routes_like_qwen3_moe(tmp_path, top_k):
    model = build(use_moe=True, num_experts=4, top_k=top_k)
    out = save_pretrained_hf(model, tmp_path / "hf", tokenizer="bytes")
    hf = hf_model(out)
    assert type(hf).__name__ == "Qwen3MoeForCausalLM" and hf.config.norm_topk_prob == (top_k == 2)
    assert [type(layer.mlp).__name__ for layer in hf.model.layers] == ["Qwen3MoeMLP", "Qwen3MoeSparseMoeBlock"] * 2
    assert_same_outputs(model, hf)
    assert_identical(MarjaraModel.from_pretrained(out), model)


def test_a_folder_transformers_saved_is_read_back(tmp_path):
    """transformers' own save_pretrained (its file order, its config.json) is read as well."""
    model = build(use_moe=True, num_experts=4, top_k=2, tie_embeddings=False)
    hf = hf_model(save_pretrained_hf(model, tmp_path / "ours", tokenizer="bytes"))
    hf.save_pretrained(tmp_path / "theirs")
    assert_identical(MarjaraModel.from_pretrained(tmp_path / "theirs"), model)


def test_sharded_export_writes_an_index_transformers_follows(tmp_path):
    model = build(tie_embeddings=False)
    out = save_pretrained_hf(model, tmp_path / "hf", tokenizer="bytes", max_shard_size=400_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    for shard in shards:
        stored = load_file(out / shard)
        assert sum(t.numel() * 4 for t in stored.values()) <= 400_000 or len(stored) == 1
        assert {n for n, f in index["weight_map"].items() if f == shard} == set(stored)
    assert_same_outputs(model, hf_model(out))
    assert_identical(MarjaraModel.from_pretrained(out), model)
    # Exporting again unsharded replaces the shards instead of leaving them beside the new file.
    save_pretrained_hf(model, out, tokenizer="bytes", overwrite=True)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_weights_in_arbitrary_pieces_land_where_whole_tensors_do(tmp_path):
    """ZeRO partitions cut tensors anywhere, also inside a head whose rows get permuted."""
    model = build(use_moe=True, num_experts=4, top_k=2)
    state = {n: t for n, t in model.state_dict().items() if n != "lm_head.weight"}
    generator = torch.Generator().manual_seed(1)
    pieces = []
    for name, tensor in state.items():
        flat, start = tensor.reshape(-1), 0
        while start < flat.numel():
            length = int(torch.randint(1, 300, (), generator=generator))
            pieces.append(Piece(name, start, flat[start: start + length]))
            start += length
    pieces = [pieces[i] for i in torch.randperm(len(pieces), generator=generator)]
    write_hf_export(tmp_path / "pieces", model.config, "bytes", None, pieces, torch.float32, "test")
    whole = load_file(save_pretrained_hf(model, tmp_path / "whole", tokenizer="bytes") / "model.safetensors")
    cut = load_file(tmp_path / "pieces" / "model.safetensors")
    assert whole.keys() == cut.keys() == set(hf_shapes(model.config))
    assert all(torch.equal(whole[n], cut[n]) for n in whole)


@pytest.mark.parametrize("overrides, field", [
    ({"qk_norm": False}, "qk_norm is false"),
    ({"use_moe": True, "use_residual": True}, "use_residual is true"),
])
def test_models_transformers_cannot_express_are_refused(tmp_path, overrides, field):
    model = build(**overrides)
    with pytest.raises(MarjaraError, match=field):
        save_pretrained_hf(model, tmp_path / "hf", tokenizer="bytes")
    assert not (tmp_path / "hf").exists()


def test_cli_refusal_is_one_line_and_writes_nothing(tmp_path):
    model = build(qk_norm=False)
    save_pretrained(model, model.config, tmp_path / "marjara", tokenizer="bytes")
    result = subprocess.run([sys.executable, "-m", "marjara.convert", str(tmp_path / "marjara"), str(tmp_path / "hf"),
                             "--format", "hf"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: qk_norm is false") and result.stderr.count("\n") == 1
    assert not (tmp_path / "hf").exists()


def test_cli_converts_a_marjara_export_and_the_result_back(tmp_path):
    model = build(tie_embeddings=False)
    save_pretrained(model, model.config, tmp_path / "marjara", tokenizer="bytes")

    def convert(*args):
        result = subprocess.run([sys.executable, "-m", "marjara.convert", *map(str, args)], capture_output=True,
                                text=True, cwd=ROOT, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "Hugging Face layout" in convert(tmp_path / "marjara", tmp_path / "hf", "--format", "hf")
    convert(tmp_path / "hf", tmp_path / "again")  # and back into MARJARA's format
    assert_identical(MarjaraModel.from_pretrained(tmp_path / "again"), model)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["tokenizer"] == "bytes"


def hf_config(**changes):
    base = to_hf_config(ModelConfig.from_preset("tiny", vocab_size=VOCAB, use_moe=True, top_k=2), 256, "float32", {})
    return {**base, **changes}


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "llama"}, "model_type 'llama' is not one MARJARA reads"),
    ({"head_dim": 64}, "head_dim = 64"),
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
    ({"attention_bias": True}, "attention_bias = True"),
    ({"use_sliding_window": True}, "use_sliding_window = True"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters.rope_type = 'yarn'"),
    ({"num_experts_per_tok": 8}, "num_experts_per_tok = 8"),
    ({"norm_topk_prob": False}, "norm_topk_prob = False"),
    ({"mlp_only_layers": [1]}, "mlp_only_layers = \\[1\\]"),
    ({"moe_intermediate_size": 64}, "moe_intermediate_size = 64"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_transformers_configs_marjara_cannot_train_are_refused(changes, message):
    with pytest.raises(MarjaraError, match=message):
        from_hf_config(hf_config(**changes), "x/config.json")
    assert from_hf_config(hf_config(), "x").moe_layers == [1, 3]


def test_shard_sizes_parse_and_plan():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100") == 100
    with pytest.raises(MarjaraError, match="--max_shard_size 'big' is not a size"):
        parse_size("big")
    shapes = {"a": torch.Size([10]), "b": torch.Size([100]), "c": torch.Size([5])}
    assert [list(s) for s in plan_shards(shapes, 4, 80)] == [["a"], ["b"], ["c"]]  # b alone exceeds: own shard
    assert [list(s) for s in plan_shards(shapes, 4, 10_000)] == [["a", "b", "c"]]
