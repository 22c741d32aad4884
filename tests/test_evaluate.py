"""lm-evaluation-harness on MARJARA models: the "marjara" TemplateLM and python -m marjara.evaluate."""

import json
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from marjara.model.config import ModelConfig
from marjara.errors import MarjaraError
from marjara.evaluate import main
from marjara.model import MarjaraModel
from marjara.checkpoint.export import save_pretrained
from marjara.data.tokenizer import get_tokenizer

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra is not installed (pip install -e '.[eval]')")

from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from marjara.eval.lm_eval_adapter import MarjaraLM  # noqa: E402

pytestmark = pytest.mark.usefixtures("process_group")  # the MoE models built here need one

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTES = get_tokenizer("bytes")
FACTS = {"the sky": "blue", "grass": "green", "snow": "white", "coal": "black"}
COLORS = list(FACTS.values())


def request(*args):
    return SimpleNamespace(args=args)


def small_config(**overrides) -> ModelConfig:
    return ModelConfig(vocab_size=BYTES.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       max_seq_len=64, **overrides)


def exported(tmp_path, name="model", seed=0, **overrides):
    torch.manual_seed(seed)
    model = MarjaraModel(small_config(**overrides)).eval()
    return model, save_pretrained(model, model.config, tmp_path / name, tokenizer="bytes")


def token_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """log p(tokens[i] | tokens[:i]) for i >= 1, from one plain forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits
    logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    return logprobs.gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]


@pytest.mark.parametrize("overrides", [{}, dict(use_moe=True, num_experts=4, top_k=2)], ids=["dense", "moe"])
def test_loglikelihood_matches_a_plain_forward_pass_at_any_batch_size(tmp_path, overrides):
    model, out = exported(tmp_path, **overrides)
    pairs = [("Q: What color is snow?\nA:", f" {c}") for c in COLORS] + [("x", "y"), ("a" * 90, " long context")]
    results = {}
    for batch_size in (1, 4, 16):
        lm = MarjaraLM(pretrained=str(out), batch_size=batch_size)
        results[batch_size] = lm.loglikelihood([request(*p) for p in pairs])
    for context, continuation in pairs:
        i = pairs.index((context, continuation))
        ctx, cont = BYTES.encode(context), BYTES.encode(continuation)
        whole = (ctx + cont)[-(model.config.max_seq_len + 1):]  # the model sees at most max_seq_len tokens
        expected = token_logprobs(model, whole)[-len(cont):]
        for batch_size, scores in results.items():
            assert scores[i][0] == pytest.approx(expected.sum().item(), abs=1e-4), (batch_size, context)
    assert all(isinstance(greedy, bool) for _, greedy in results[1])


def test_rolling_loglikelihood_scores_every_token_once_in_windows_of_the_context(tmp_path):
    model, out = exported(tmp_path)
    lm = MarjaraLM(pretrained=str(out), batch_size=3)
    short, long = "grass is green. ", "the sky is blue and snow is white; " * 6  # 210 bytes > 64
    scores = lm.loglikelihood_rolling([request(short), request(long)])
    expected_short = token_logprobs(model, [BYTES.eot_id] + BYTES.encode(short)).sum().item()
    assert scores[0] == pytest.approx(expected_short, abs=1e-4)
    expected_long, scored = 0.0, 0
    for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
            BYTES.encode(long), prefix_token=BYTES.eot_id, max_seq_len=64, context_len=1)):
        expected_long += token_logprobs(model, context + continuation)[-len(continuation):].sum().item()
        scored += len(continuation)
    assert scored == len(BYTES.encode(long))
    assert scores[1] == pytest.approx(expected_long, abs=1e-3)


def test_generate_until_cuts_at_stop_sequences_and_keeps_request_order(tmp_path):
    model, out = exported(tmp_path)
    lm = MarjaraLM(pretrained=str(out), batch_size=2)
    prompts = ["Q: What color", "snow is", "abc", "x"]
    free = {p: BYTES.decode(model.generate([BYTES.encode(p)], 12, temperature=0, eos_token_id=BYTES.eot_id)[0])
            for p in prompts}
    stop = next(ch for ch in free["abc"][2:] if ch.strip())  # a character greedy decoding will produce
    requests = [request(prompts[0], {"until": ["\n"], "max_gen_toks": 12}),
                request(prompts[1], {"until": [], "max_gen_toks": 5}),
                request(prompts[2], {"until": [stop], "max_gen_toks": 12}),
                request(prompts[3], {"until": ["\n"], "max_gen_toks": 12})]
    outputs = lm.generate_until(requests)
    assert outputs[0] == free[prompts[0]].split("\n")[0]
    assert outputs[1] == BYTES.decode(model.generate([BYTES.encode(prompts[1])], 5, temperature=0)[0])
    assert outputs[2] == free["abc"][: free["abc"].index(stop)]
    assert outputs[3] == free["x"].split("\n")[0]
    assert requests[0].args[1]["until"] == ["\n"]  # the request itself is left as it was


def train_to_know_the_colors(steps=80) -> MarjaraModel:
    """A tiny byte-level model that learns which color goes with which thing (a few seconds)."""
    lines = [f"Q: What color is {thing}?\nA: {color}\n" for thing, color in FACTS.items()]
    rng, threads = random.Random(0), torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # 2 shared cores: more threads only contend
    model = MarjaraModel(small_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    try:
        for _ in range(steps):
            rows = []
            for _ in range(16):
                ids = BYTES.encode("".join(rng.sample(lines, len(lines)) * 2))
                start = rng.randrange(len(ids) - 49)
                rows.append(ids[start:start + 49])
            batch = torch.tensor(rows)
            loss = model(batch[:, :-1], batch[:, 1:]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def write_local_tasks(folder):
    """Three local tasks (multiple choice, rolling perplexity, generate_until) over jsonl files.
    lm-eval puts its target_delimiter (a space) between question and choice."""
    folder.mkdir()
    questions = [(f"Q: What color is {thing}?\nA:", color) for thing, color in FACTS.items()]
    rows = {
        "mc": [{"question": q, "choices": COLORS, "answer": COLORS.index(a)} for q, a in questions],
        "ppl": [{"text": f"Q: What color is {thing}?\nA: {color}\n"} for thing, color in FACTS.items()],
        "gen": [{"question": q, "answer": f" {a}"} for q, a in questions],
    }
    for name, items in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    source = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder}/{{name}}.jsonl\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        "task: colors_mc\n" + source.format(name="mc") + "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "ppl.yaml").write_text(
        "task: colors_ppl\n" + source.format(name="ppl") + "output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n  - metric: word_perplexity\n")
    (folder / "gen.yaml").write_text(
        "task: colors_gen\n" + source.format(name="gen") + "output_type: generate_until\n"
        "doc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")


def test_the_harness_runs_end_to_end_offline_and_a_trained_model_beats_chance(tmp_path):
    model = train_to_know_the_colors()
    out = save_pretrained(model, model.config, tmp_path / "trained", tokenizer="bytes")
    write_local_tasks(tmp_path / "tasks")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "marjara.evaluate", str(out), "--tasks", "colors_mc,colors_ppl,colors_gen",
         "--include_path", str(tmp_path / "tasks"), "--output_path", str(tmp_path / "results"), "--batch_size", "4"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "colors_mc" in result.stdout  # lm-eval's own results table
    [results_file] = (tmp_path / "results").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    chance = 1 / len(COLORS)
    assert results["colors_mc"]["acc,none"] >= chance + 0.5
    assert results["colors_gen"]["exact_match,none"] >= 0.75
    assert results["colors_ppl"]["byte_perplexity,none"] < 2.0  # uniform over 257 bytes would be 257


def test_without_lm_eval_the_command_says_how_to_install_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--tasks", "x"])
    assert exit_info.value.code == 2
    assert "lm-evaluation-harness is not installed; pip install -e '.[eval]'" in capsys.readouterr().err


def test_a_bad_model_folder_fails_before_lm_eval_starts(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nowhere"), "--tasks", "colors_mc"])
    assert exit_info.value.code == 2
    assert "neither an exported model" in capsys.readouterr().err


def test_model_flags_belong_to_this_command(capsys, tmp_path):
    _, out = exported(tmp_path)
    with pytest.raises(SystemExit):
        main([str(out), "--tasks", "x", "--model_args", "pretrained=elsewhere"])
    assert "--model_args is set by this command" in capsys.readouterr().err


def test_model_args_are_checked(tmp_path):
    _, out = exported(tmp_path)
    with pytest.raises(MarjaraError, match="dtype=fp8 is not one of"):
        MarjaraLM(pretrained=str(out), dtype="fp8")
    with pytest.raises(MarjaraError, match="batch_size must be >= 1"):
        MarjaraLM(pretrained=str(out), batch_size=0)
