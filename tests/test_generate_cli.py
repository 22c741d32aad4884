"""python -m marjara.generate: exported models and checkpoints, streaming, batches, bad input."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint_runs import checkpoint
from marjara.model.config import ModelConfig
from marjara.checkpoint.conversion import convert
from marjara.checkpoint.inference import SEPARATOR, TextStream
from marjara.generate import main
from marjara.model import MarjaraModel
from marjara.checkpoint.export import save_pretrained
from marjara.data.tokenizer import get_tokenizer

pytestmark = pytest.mark.usefixtures("process_group")  # the MoE models built here need one

BYTES = get_tokenizer("bytes")
ROOT = Path(__file__).resolve().parents[1]


def exported(tmp_path, seed=0, **overrides):
    torch.manual_seed(seed)
    model = MarjaraModel(ModelConfig.from_preset("tiny", vocab_size=BYTES.vocab_size, **overrides)).eval()
    return model, save_pretrained(model, model.config, tmp_path / "model", tokenizer="bytes")


def run_cli(capsys, *args) -> str:
    capsys.readouterr()  # drop what the test printed before (DeepSpeed announces MoE groups on stdout)
    assert main([str(a) for a in args]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("overrides", [{}, dict(use_moe=True, num_experts=4, top_k=2)], ids=["dense", "moe"])
def test_greedy_generation_from_the_export_equals_the_in_memory_model(capsys, tmp_path, overrides):
    model, out = exported(tmp_path, **overrides)
    prompt = "Hello, wor"
    expected = model.generate([BYTES.encode(prompt)], 24, temperature=0, eos_token_id=BYTES.eot_id)[0]
    printed = run_cli(capsys, out, "--prompt", prompt, "--max_new_tokens", 24, "--temperature", 0)
    assert printed == prompt + BYTES.decode(expected) + "\n"


def test_a_prompt_file_is_one_batch_with_the_same_tokens_as_one_prompt_at_a_time(capsys, tmp_path):
    model, out = exported(tmp_path)
    prompts = ["def f(x):", "", "import os", "a much longer prompt than the others, to pad the batch"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    printed = run_cli(capsys, out, "--prompt_file", tmp_path / "prompts.txt", "--max_new_tokens", 12,
                      "--temperature", 0)
    expected = ""
    for prompt in [p for p in prompts if p.strip()]:  # blank lines are skipped
        tokens = model.generate([BYTES.encode(prompt)], 12, temperature=0, eos_token_id=BYTES.eot_id)[0]
        expected += f"{prompt}{BYTES.decode(tokens)}\n{SEPARATOR}\n"
    assert printed == expected


def test_sampling_with_a_seed_is_reproducible_and_differs_from_greedy(capsys, tmp_path):
    _, out = exported(tmp_path)
    args = [out, "--prompt", "x", "--max_new_tokens", 40, "--temperature", 1.5, "--top_k", 0]
    first, second = run_cli(capsys, *args, "--seed", 1), run_cli(capsys, *args, "--seed", 1)
    assert first == second
    assert first != run_cli(capsys, out, "--prompt", "x", "--max_new_tokens", 40, "--temperature", 0)


def test_streaming_holds_back_a_character_until_all_its_bytes_arrived():
    out = io.StringIO()
    writes = []
    out.write = lambda text: writes.append(text) or len(text)  # type: ignore[method-assign]
    stream = TextStream(BYTES, out)
    for token in "aé€b".encode():  # é is 2 bytes, € is 3
        stream.push(token)
    stream.close()
    assert writes == ["a", "é", "€", "b"]


def test_unfinished_bytes_are_shown_when_generation_stops():
    out = io.StringIO()
    stream = TextStream(BYTES, out)
    for token in "ok€".encode()[:-1]:
        stream.push(token)
    assert out.getvalue() == "ok"
    stream.close()
    assert out.getvalue() == "ok\ufffd"


@pytest.mark.parametrize("args, message", [
    ([], "give either --prompt TEXT or --prompt_file FILE"),
    (["--prompt", "a", "--prompt_file", "p.txt"], "give either --prompt TEXT or --prompt_file FILE"),
    (["--prompt_file", "nowhere.txt"], "no such file"),
    (["--prompt", "a", "--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt", "a" * 250, "--max_new_tokens", "10"], "exceeds the model's max_seq_len (256)"),
    (["--prompt", "a", "--ema"], "--tag and --ema apply only to checkpoint folders"),
    (["--prompt", "a", "--device", "nonsense"], "is not a device name"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, args, message):
    _, out = exported(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([str(out), *args])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert captured.out == ""  # nothing printed before the error


def test_a_folder_that_is_neither_model_nor_checkpoint(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--prompt", "a"])
    assert "neither an exported model (no config.json) nor a checkpoint folder" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("run", ["zero3", "moe_ep2"])
def test_a_checkpoint_folder_generates_what_its_export_generates(capsys, tmp_path_factory, tmp_path, run):
    ckpt = checkpoint(tmp_path_factory, run)
    out = convert(ckpt, tmp_path / "model")
    args = ["--prompt", "The quick", "--max_new_tokens", 20, "--temperature", 0]
    from_export = run_cli(capsys, out, *args)
    assert from_export == run_cli(capsys, ckpt, *args)  # converted in memory
    assert from_export == run_cli(capsys, ckpt / "global_step2", *args)  # a tag folder
    ema_out = convert(ckpt, tmp_path / "ema", ema=True)
    assert run_cli(capsys, ckpt, *args, "--ema") == run_cli(capsys, ema_out, *args)
    # A process no launcher started, with no process group of its own, reads the checkpoint too.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    plain = subprocess.run([sys.executable, "-m", "marjara.generate", str(ckpt), *map(str, args)], capture_output=True,
                           text=True, timeout=300, env={**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == from_export
