"""The exported format: streaming safetensors writer, save_pretrained / from_pretrained, strict loading."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from marjara.model.config import ModelConfig
from marjara.errors import MarjaraError
from marjara.model import MarjaraModel
from marjara.checkpoint.export import save_pretrained
from marjara.model.pretrained import CONFIG_FILE, WEIGHTS_FILE
from marjara.checkpoint.safetensors_writer import write_pieces
from marjara.checkpoint.pieces import Piece

VOCAB = 101
MOE = dict(use_moe=True, num_experts=4, top_k=2)


def build(seed=0, **overrides) -> MarjaraModel:
    torch.manual_seed(seed)
    # Built for inference, as from_pretrained builds it: the round trip is then bit-exact (against
    # DeepSpeed's MoE layers see tests/test_inference_moe.py).
    return MarjaraModel(ModelConfig.from_preset("tiny", vocab_size=VOCAB, **overrides), inference=True).eval()


def logits_of(model, idx):
    with torch.no_grad():
        return model(idx).logits


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}, MOE], ids=["tied", "untied", "moe"])
def test_save_then_from_pretrained_gives_identical_logits(tmp_path, overrides):
    model = build(**overrides)
    save_pretrained(model, model.config, tmp_path / "out", tokenizer="bytes", source={"step": 3})
    loaded = MarjaraModel.from_pretrained(tmp_path / "out")
    idx = torch.randint(0, VOCAB, (2, 16))
    torch.testing.assert_close(logits_of(loaded, idx), logits_of(model, idx), rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.tok_emb.weight if model.config.tie_embeddings else True
    stored = load_file(tmp_path / "out" / WEIGHTS_FILE)
    assert ("lm_head.weight" in stored) == (not model.config.tie_embeddings)
    info = json.loads((tmp_path / "out" / CONFIG_FILE).read_text())
    assert info["format"] == "marjara" and info["format_version"] == 1 and info["dtype"] == "float32"
    assert info["tokenizer"] == "bytes" and info["source"] == {"step": 3} and info["model"]["ep_size"] == 1


def test_bf16_export_is_read_as_bf16_and_rounds_the_fp32_weights(tmp_path):
    model = build()
    save_pretrained(model, model.config, tmp_path / "bf16", tokenizer="bytes", dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "bf16" / WEIGHTS_FILE), framework="pt") as f:
        assert f.get_tensor("tok_emb.weight").dtype == torch.bfloat16
    loaded = MarjaraModel.from_pretrained(tmp_path / "bf16")
    assert loaded.tok_emb.weight.dtype == torch.bfloat16
    assert loaded.rotary.inv_freq.dtype == torch.float32  # buffers stay fp32
    assert torch.equal(loaded.tok_emb.weight, model.tok_emb.weight.bfloat16())
    assert MarjaraModel.from_pretrained(tmp_path / "bf16", dtype=torch.float32).tok_emb.weight.dtype == torch.float32


def test_streaming_writer_matches_safetensors_own_writer(tmp_path):
    tensors = {"b": torch.randn(3, 5), "a": torch.randn(7), "c": torch.randn(2, 2, 2)}
    shapes = {name: t.shape for name, t in tensors.items()}
    # Pieces out of order, tensors split across pieces.
    pieces = [Piece("b", 9, tensors["b"].reshape(-1)[9:]), Piece("a", 0, tensors["a"]),
              Piece("c", 0, tensors["c"].reshape(-1)), Piece("b", 0, tensors["b"].reshape(-1)[:9])]
    write_pieces(tmp_path / "ours.safetensors", shapes, pieces, torch.float32, "test")
    save_file(tensors, tmp_path / "theirs.safetensors")
    ours, theirs = load_file(tmp_path / "ours.safetensors"), load_file(tmp_path / "theirs.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name])


@pytest.mark.parametrize("pieces, message", [
    ([Piece("w", 0, torch.ones(2)), Piece("w", 4, torch.ones(2))], r"'w' is missing \(elements 2..4\)"),
    ([Piece("w", 0, torch.ones(5))], "has 5 of 6 elements"),
    ([Piece("w", 0, torch.ones(6)), Piece("w", 4, torch.ones(2))], "appears twice"),
    ([Piece("w", 0, torch.ones(6)), Piece("v", 0, torch.ones(1))], "does not describe"),
    ([Piece("w", 4, torch.ones(3))], "covers elements 4..7"),
], ids=["gap", "short", "overlap", "unknown", "overflow"])
def test_streaming_writer_refuses_pieces_that_do_not_add_up(tmp_path, pieces, message):
    with pytest.raises(MarjaraError, match=message):
        write_pieces(tmp_path / "x.safetensors", {"w": torch.Size([2, 3])}, pieces, torch.float32, "test")


def test_a_failed_export_leaves_no_folder_behind(tmp_path):
    model = build()

    def failing_pieces():  # a source that breaks after the file was started
        yield Piece("norm.weight", 0, model.norm.weight.detach())
        raise MarjaraError("source broke")

    from marjara.checkpoint.export import write_export
    from marjara.model.pretrained import export_config

    shapes = {name: t.shape for name, t in model.state_dict().items() if name != "lm_head.weight"}
    with pytest.raises(MarjaraError, match="source broke"):
        write_export(tmp_path / "out", shapes, failing_pieces(), export_config(model.config, "bytes", None, torch.float32),
                     "test")
    assert not (tmp_path / "out").exists()


def test_from_pretrained_errors_name_the_problem(tmp_path):
    with pytest.raises(MarjaraError, match="does not exist"):
        MarjaraModel.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MarjaraError, match="has no config.json"):
        MarjaraModel.from_pretrained(tmp_path / "empty")
    model = build()
    out = save_pretrained(model, model.config, tmp_path / "m", tokenizer="bytes")
    info = json.loads((out / CONFIG_FILE).read_text())
    (out / CONFIG_FILE).write_text(json.dumps({**info, "format": "hf"}))
    with pytest.raises(MarjaraError, match="not describe a MARJARA model"):
        MarjaraModel.from_pretrained(out)
    (out / CONFIG_FILE).write_text(json.dumps({**info, "model": {**info["model"], "n_layers": 3}}))
    with pytest.raises(MarjaraError, match=r"does not match the model config \(missing: none; unexpected: blocks\.3"):
        MarjaraModel.from_pretrained(out)
    (out / CONFIG_FILE).write_text(json.dumps(info))
    (out / WEIGHTS_FILE).write_bytes((out / WEIGHTS_FILE).read_bytes()[:1000])
    with pytest.raises(MarjaraError, match="truncated or corrupt"):
        MarjaraModel.from_pretrained(out)
    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(MarjaraError, match="no model.safetensors"):
        MarjaraModel.from_pretrained(out)


def test_save_pretrained_refuses_to_replace_a_different_model(tmp_path):
    a, b = build(seed=0), build(seed=1)
    save_pretrained(a, a.config, tmp_path / "m", tokenizer="bytes", source={"tag": "a"})
    save_pretrained(a, a.config, tmp_path / "m", tokenizer="bytes", source={"tag": "a"})  # same model: fine
    before = (tmp_path / "m" / WEIGHTS_FILE).read_bytes()
    with pytest.raises(MarjaraError, match="already holds a different model; pass --overwrite"):
        save_pretrained(b, b.config, tmp_path / "m", tokenizer="bytes", source={"tag": "b"})
    assert (tmp_path / "m" / WEIGHTS_FILE).read_bytes() == before
    save_pretrained(b, b.config, tmp_path / "m", tokenizer="bytes", source={"tag": "b"}, overwrite=True)
    assert torch.equal(MarjaraModel.from_pretrained(tmp_path / "m").tok_emb.weight, b.tok_emb.weight)
