"""Bad inputs a careful user tried, each run as the user runs it: one `error:` line, exit 2, no traceback.

Cases that share that shape are one parametrised test; those that need more (a killed run's
temporaries, the launch command built for MPI) have their own.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", **extra}
    return env


def _prepared_folder(tmp_path: Path, **meta_changes) -> Path:
    import numpy as np

    folder = tmp_path / "data"
    folder.mkdir()
    np.arange(4000, dtype="<u2").__mod__(250).astype("<u2").tofile(folder / "train.bin")
    np.arange(400, dtype="<u2").__mod__(250).astype("<u2").tofile(folder / "val.bin")
    meta = {"format_version": 1, "dtype": "uint16", "tokenizer": "bytes", "vocab_size": 257, "eot_id": 256,
            "train_tokens": 4000, "val_tokens": 400, "documents": 1, "val_fraction": 0.1, **meta_changes}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def _train(*args):
    return [PYTHON, str(ROOT / "train.py"), "--max_steps", "1", "--seq_len", "16", "--sample_tokens", "0", *args]


def _ds_json(tmp_path: Path, config: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


def _case_ds(config):
    return lambda tmp: _train("--deepspeed_config", _ds_json(tmp, config), "--out_dir", str(tmp / "out"))


def _case_ds_not_utf8(tmp):
    (tmp / "ds.json").write_bytes(b'{"bf16": {"enabled": \xff}}')
    return _train("--deepspeed_config", str(tmp / "ds.json"), "--out_dir", str(tmp / "out"))


def _case_out_dir_is_a_file(tmp):
    (tmp / "afile").write_text("x")
    return _train("--out_dir", str(tmp / "afile"))


def _case_val_bin_deleted(tmp):
    folder = _prepared_folder(tmp)
    (folder / "val.bin").unlink()
    return _train("--data", str(folder), "--out_dir", str(tmp / "out"))


def _case_unknown_tokenizer_in_meta(tmp):
    folder = _prepared_folder(tmp, tokenizer="gtp2")
    return _train("--data", str(folder), "--out_dir", str(tmp / "out"))


def _case_nul_bytes_prepare(tmp):
    (tmp / "blob.txt").write_bytes(b"some text first\n" + b"\0" * 4096)
    return [PYTHON, "-m", "marjara.prepare", str(tmp / "blob.txt"), "--out", str(tmp / "prepared"),
            "--tokenizer", "bytes", "--workers", "1"]


def _case_nul_bytes_train(tmp):
    (tmp / "blob.txt").write_bytes(b"\0" * 4096)
    return _train("--data", str(tmp / "blob.txt"), "--out_dir", str(tmp / "out"))


def _old_run(folder: Path) -> Path:
    (folder / "global_step20").mkdir(parents=True)
    (folder / "global_step20" / "marjara.json").write_text("{}")
    (folder / "latest").write_text("global_step20")
    (folder / "metrics.jsonl").write_text('{"step": 20, "train/loss": 3.0}\n')
    return folder


def _case_fresh_run_into_another_runs_folder(tmp):
    return _train("--out_dir", str(_old_run(tmp / "ck")))


def _case_hostfile_superscript(tmp):
    (tmp / "hostfile").write_text("localhost slots=\u00b2\n")
    return [PYTHON, "-m", "marjara.preflight", "--hostfile", str(tmp / "hostfile"), "--skip_ssh"]


def _case_launch_hostfile_without_value(script):
    return lambda tmp: [str(ROOT / "launch" / script), "--hostfile", "--master_addr", "127.0.0.1"]


def _case_mixture_of_a_mixture(tmp):
    _prepared_folder(tmp)
    (tmp / "inner.json").write_text(json.dumps({"sources": [{"name": "a", "weight": 1, "path": "data"}]}))
    (tmp / "outer.json").write_text(json.dumps({"sources": [{"name": "b", "weight": 1, "path": "inner.json"}]}))
    return _train("--data", str(tmp / "outer.json"), "--out_dir", str(tmp / "out"))


def _case_plan_config_into_a_folder(tmp):
    (tmp / "here").mkdir()
    return [PYTHON, "-m", "marjara.plan", "--model_size", "tiny", "--write_config", str(tmp / "here")]


def _case_env_file_not_utf8(tmp):
    (tmp / "hostfile").write_text("localhost slots=1\n")
    (tmp / "env").write_bytes(b"\xff\xfe=1\n")
    return [PYTHON, "-m", "marjara.preflight", "--hostfile", str(tmp / "hostfile"), "--skip_ssh", "--launcher", "no_ssh",
            "--env_file", str(tmp / "env")]


def _case_slurm(nodelist, *args):
    return lambda tmp: ["env", f"SLURM_JOB_NODELIST={nodelist}", "SLURM_GPUS_ON_NODE=2", PYTHON, "-m",
                        "marjara.launch.hostfile", "--from-slurm", "--out", str(tmp / "nowhere" / "hostfile"), *args]


def _case_hf_folder(config, index=None):
    def make(tmp):
        folder = tmp / "hf"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "model.safetensors.index.json").write_text(json.dumps(index or {"weight_map": {"w": "w.safetensors"}}))
        (folder / "w.safetensors").write_bytes(b"")
        return [PYTHON, "-m", "marjara.generate", str(folder), "--prompt", "hi", "--max_new_tokens", "1"]
    return make


_QWEN3 = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
          "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 320,
          "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}


CASES = {
    "ds_gradient_clipping_not_a_number": (_case_ds({"gradient_clipping": "abc"}),
                                          'ds.json: "gradient_clipping" must be a number >= 0'),
    "ds_typo_inside_zero_block": (_case_ds({"zero_optimization": {"stage": 2, "overlap_com": True}}),
                                  "ds.json: unknown key \"zero_optimization.overlap_com\"; did you mean 'overlap_comm'?"),
    "ds_nested_typo": (_case_ds({"zero_optimization": {"stage": 2, "offload_optimizer": {"devic": "cpu"}}}),
                       "unknown key \"zero_optimization.offload_optimizer.devic\"; did you mean 'device'?"),
    "ds_unknown_top_level_key": (_case_ds({"gradient_clip": 1.0}),
                                 "ds.json: unknown top-level key 'gradient_clip'; did you mean 'gradient_clipping'?"),
    "ds_range_inside_block": (_case_ds({"zero_optimization": {"stage": 2, "reduce_bucket_size": -5}}),
                              '"zero_optimization.reduce_bucket_size": Input should be greater than 0 (got -5)'),
    "ds_config_not_utf8": (_case_ds_not_utf8, "ds.json is not valid JSON ('utf-8' codec can't decode byte 0xff"),
    "ds_config_a_list": (lambda tmp: _train("--deepspeed_config", _ds_json(tmp, [1]), "--out_dir", str(tmp / "out")),
                         "ds.json is not a JSON object; it must hold DeepSpeed's settings"),
    "out_dir_is_a_file": (_case_out_dir_is_a_file, "afile is a file, not a folder"),
    "fresh_run_into_another_runs_folder": (_case_fresh_run_into_another_runs_folder,
                                           "ck holds another run (latest, 1 checkpoint tag(s) (global_step20 ...), "
                                           "metrics.jsonl); continue it with --resume"),
    "prepared_folder_without_val_bin": (_case_val_bin_deleted, "val.bin is missing, but"),
    "unknown_tokenizer_in_meta": (_case_unknown_tokenizer_in_meta, "meta.json: unknown tokenizer 'gtp2'"),
    "nul_bytes_prepare": (_case_nul_bytes_prepare, "blob.txt, line 2: a NUL byte at byte 16: this is binary data"),
    "nul_bytes_train_txt": (_case_nul_bytes_train, "blob.txt, line 1: a NUL byte at byte 0"),
    "hostfile_superscript_slots": (_case_hostfile_superscript, "slots must be a positive integer, got '\u00b2'"),
    "pdsh_hostfile_without_value": (_case_launch_hostfile_without_value("pdsh.sh"), "--hostfile needs a value"),
    "mpi_hostfile_without_value": (_case_launch_hostfile_without_value("mpi.sh"), "--hostfile needs a value"),
    "ds_optimizer_params_not_an_object": (_case_ds({"optimizer": {"type": "AdamW", "params": [1e-3]}}),
                                          '"optimizer.params" must be a JSON object'),
    "mixture_of_a_mixture": (_case_mixture_of_a_mixture, "inner.json is itself a mixture"),
    "plan_write_config_into_a_folder": (_case_plan_config_into_a_folder, "is a folder; give the path of a .json file"),
    "preflight_env_file_not_utf8": (_case_env_file_not_utf8, "cannot read env file"),
    "slurm_descending_range": (_case_slurm("n[5-2]"), "bad range '5-2'"),
    "slurm_out_in_a_missing_folder": (_case_slurm("n[1-2]"), "cannot write --out"),
    "slurm_slots_below_one": (_case_slurm("n[1-2]", "--slots", "-3"), "--slots must be >= 1"),
    "hf_config_zero_heads": (_case_hf_folder({**_QWEN3, "num_attention_heads": 0}),
                             "num_attention_heads = 0: must be a positive integer"),
    "hf_config_rope_not_an_object": (_case_hf_folder({**_QWEN3, "rope_parameters": [1]}),
                                     "rope_parameters = [1]: must be an object"),
    "hf_index_weight_map_not_an_object": (_case_hf_folder(_QWEN3, {"weight_map": ["a"]}),
                                          "is not a safetensors index (its weight_map is not an object"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_stops_with_one_line(name, tmp_path):
    make_command, expected = CASES[name]
    command = make_command(tmp_path)
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=_env(),
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert not (tmp_path / "out").exists(), "a refused run writes nothing"
    if (tmp_path / "ck").exists():  # the other run's folder is left as it was
        assert (tmp_path / "ck" / "metrics.jsonl").read_text() == '{"step": 20, "train/loss": 3.0}\n'
        assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["global_step20", "latest", "metrics.jsonl"]
    assert not (tmp_path / "prepared").exists()


@pytest.fixture
def exported(tmp_path):
    from marjara.checkpoint.export import save_pretrained
    from marjara.model import MarjaraModel
    from marjara.model.config import ModelConfig

    config = ModelConfig(vocab_size=257, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    return save_pretrained(MarjaraModel(config), config, tmp_path / "exported", tokenizer="bytes")


@pytest.mark.parametrize("tasks, expected", [
    ("arc_eas", "unknown task 'arc_eas', not in lm-eval's tasks (local YAML tasks need --include_path); did you mean arc_easy"),
    ("arc_easy", "task 'arc_easy' needs the dataset 'allenai/ai2_arc', which is not in the Hugging Face cache, "
                 "and the Hub cannot be reached"),
])
def test_evaluate_refuses_unknown_and_unreachable_tasks_before_lm_eval_starts(exported, tmp_path, tasks, expected):
    pytest.importorskip("lm_eval", reason="the eval extra is not installed (pip install '.[eval]')")
    # An empty cache and offline mode: what a machine without network sees, on any machine.
    env = _env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run([PYTHON, "-m", "marjara.evaluate", str(exported), "--tasks", tasks, "--limit", "2"],
                            capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: --tasks: {expected}" + result.stderr.split(expected, 1)[1].strip()]


def test_a_long_library_message_is_quoted_in_whole_sentences():
    from marjara.errors import cause_in_brief

    long = RuntimeError("First sentence is short. " + "then a second one that goes on " * 10 + "and ends. Third.\nmore")
    assert cause_in_brief(long, limit=100) == "First sentence is short. ..."
    assert cause_in_brief(RuntimeError("one line.\nsecond line")) == "one line."


def test_convert_quotes_torch_in_whole_sentences_without_colour_codes(tmp_path):
    """The line for an unsafe file quoted torch's message cut at 160 characters, mid-word."""
    import torch

    from marjara.checkpoint.reader import load_file
    from marjara.errors import MarjaraError

    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"weights": torch.zeros(2), "object": pickle.PickleError("not a tensor")}, path)
    with pytest.raises(MarjaraError) as info:
        load_file(path)
    message = str(info.value)
    cause = message.split(" (", 1)[1].rsplit("); ", 1)[0]
    assert "\x1b" not in message and "\n" not in message
    assert cause.endswith((".", ". ...")), message


def _pid_that_is_gone() -> int:
    child = subprocess.Popen([PYTHON, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_next_prepare_removes_what_a_killed_prepare_left(tmp_path):
    """SIGKILL while prepare writes into a new folder leaves its hidden staging folder; the next
    run of the same command removes it (and never a live run's)."""
    text = tmp_path / "big.txt"
    line = ("The quick brown fox jumps over the lazy dog. " * 20 + "\n").encode()
    text.write_bytes(line * 40000)  # ~36 MB: seconds of work, time to kill it mid-way
    out = tmp_path / "data"
    command = [PYTHON, "-m", "marjara.prepare", str(text), "--out", str(out), "--tokenizer", "bytes", "--workers", "1"]
    run = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".data.tmp-*")) and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    left = list(tmp_path.glob(".data.tmp-*"))
    assert left and not out.exists(), "the killed run should have left its staging folder"
    live = tmp_path / f".data.tmp-{socket.gethostname()}-{os.getpid()}-live"
    live.mkdir()  # a live run's staging folder (this test's own pid): never touched

    small = tmp_path / "small.txt"
    small.write_text("hello world, a small text\n" * 50)
    rerun = subprocess.run([*command[:3], str(small), *command[4:]], capture_output=True, text=True, env=_env(),
                           timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert not any(path.exists() for path in left)
    assert live.exists()
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_atomic_path_removes_temporaries_of_dead_processes_only(tmp_path):
    from marjara.fileio import _HOST, atomic_path

    dead = tmp_path / f".model.safetensors.tmp-{_HOST}-{_pid_that_is_gone()}-abc123"
    live = tmp_path / f".model.safetensors.tmp-{_HOST}-{os.getpid()}-def456"
    other_host = tmp_path / f".model.safetensors.tmp-elsewhere-{_pid_that_is_gone()}-ghi789"
    for path in (dead, live, other_host):
        path.write_bytes(b"partial")
    with atomic_path(tmp_path / "model.safetensors") as tmp:
        tmp.write_bytes(b"done")
    assert not dead.exists() and live.exists() and other_host.exists()
    assert (tmp_path / "model.safetensors").read_bytes() == b"done"


FAKE_TOOL = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_LOG/$(basename "$0").args"
"""


def test_mpi_script_with_a_one_host_hostfile_still_goes_through_mpirun(tmp_path):
    """DeepSpeed's runner starts a one-host job itself unless told --force_multi, and then no
    rank has MPI's rank variables (`RANK is not set`)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("deepspeed", "mpirun", "ompi_info"):
        (bin_dir / tool).write_text(FAKE_TOOL)
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path), PYTHON=PYTHON, TMPDIR=str(tmp_path))
    result = subprocess.run([str(ROOT / "launch" / "mpi.sh"), "--launcher", "openmpi", "--hostfile", "hostfile",
                             "--master_addr", "127.0.0.1", "--skip_ssh_check", "--", "--max_steps", "1"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "deepspeed.args").read_text().splitlines()
    assert "--force_multi" in args and args[args.index("--launcher") + 1] == "openmpi"
