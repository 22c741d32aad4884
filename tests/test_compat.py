"""marjara.compat: each reach into DeepSpeed's and lm-eval's internals still takes effect on the
installed versions, each says what, why, upstream, guard and test, and the version guards speak up
when a version is not one they were tested with."""

import inspect
import logging

import pytest
import torch
import torch.nn.functional as F

from marjara import compat
from marjara.compat import deepspeed as ds_compat
from marjara.compat import deepspeed_moe as moe_compat
from marjara.compat import deepspeed_sequence as sequence_compat
from marjara.compat import lm_eval as lm_eval_compat
from marjara.distributed import ensure_process_group
from marjara.errors import MarjaraError
from marjara.model import MarjaraModel
from marjara.model.config import ModelConfig
from train_helpers import ROOT


@pytest.fixture
def fresh_guard(monkeypatch):
    monkeypatch.setattr(compat, "_warned", set())
    monkeypatch.delenv("RANK", raising=False)


def fake_version(monkeypatch, installed):
    monkeypatch.setattr(compat, "installed_version", lambda package: installed)


def test_the_installed_versions_are_the_tested_ones(fresh_guard, capsys):
    assert compat.version_guard("deepspeed") and compat.version_guard("lm-eval")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("package, installed", [("deepspeed", "0.19.7"), ("deepspeed", "0.20.0"),
                                                ("lm-eval", "0.4.12"), ("lm-eval", "0.5.0"), ("deepspeed", None)])
def test_an_untested_version_is_reported_loudly_once(fresh_guard, monkeypatch, capsys, package, installed):
    fake_version(monkeypatch, installed)
    assert not compat.version_guard(package)
    assert not compat.version_guard(package)
    err = capsys.readouterr().err
    low, high = compat.TESTED[package]
    assert err.count(f"WARNING: {package} {installed} is installed") == 1, err
    assert f"tested with {package} >= {low}, < {high}" in err


def test_only_rank_0_reports_an_untested_version(fresh_guard, monkeypatch, capsys):
    fake_version(monkeypatch, "0.21.0")
    monkeypatch.setenv("RANK", "1")
    assert not compat.version_guard("deepspeed")
    assert capsys.readouterr().err == ""


def test_the_patches_consult_the_guard(fresh_guard, monkeypatch, capsys):
    fake_version(monkeypatch, "0.21.0")
    ds_compat.share_zero3_fp32_masters()
    assert "WARNING: deepspeed 0.21.0 is installed" in capsys.readouterr().err


def test_pyproject_bounds_are_the_tested_ranges():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    low, high = compat.TESTED["deepspeed"]
    assert f"deepspeed>={low},<{high}" in project["dependencies"]
    low, high = compat.TESTED["lm-eval"]
    assert project["optional-dependencies"]["eval"] == [f"lm-eval=={low}"]
    assert high == "0.4.14"  # a pin: exactly the tested release


REACH_MODULES = (ds_compat, moe_compat, sequence_compat, lm_eval_compat)
FIELDS = ("What:", "Why:", "Upstream:", "Guard:", "Test:")


def reaches():
    """Every public function of the compat modules (unwrapped: lru_cache and contextmanager too)."""
    found = []
    for module in REACH_MODULES:
        for name, value in vars(module).items():
            fn = inspect.unwrap(value) if callable(value) else value
            if inspect.isfunction(fn) and fn.__module__ == module.__name__ and not name.startswith("_"):
                found.append((module, name, fn))
    return found


def field(doc: str, name: str) -> str:
    """The text of a docstring's `name` line and its continuation lines."""
    lines = inspect.cleandoc(doc).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(name))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(FIELDS)), len(lines))
    return " ".join(line.strip() for line in lines[start:end])[len(name):].strip()


def test_every_reach_says_what_why_upstream_guard_and_a_test_that_exists():
    found = reaches()
    assert len(found) >= 20, [name for _, name, _ in found]
    for module, name, fn in found:
        doc = inspect.getdoc(fn) or ""
        where = f"{module.__name__}.{name}"
        for label in FIELDS:
            assert any(line.startswith(label) for line in doc.splitlines()), f"{where}: no {label} line"
        upstream = field(doc, "Upstream:")
        assert upstream.startswith(("https://github.com/", "none known")), f"{where}: {upstream}"
        package = "lm-eval" if module is lm_eval_compat else "deepspeed"
        assert field(doc, "Guard:") == f'version_guard("{package}").', where
        body = inspect.getsource(fn).split('"""')[-1]
        assert f'version_guard("{package}")' in body, f"{where} does not call its guard"
        tests = [word.strip("(),.") for word in field(doc, "Test:").split() if word.startswith("tests/")]
        assert tests, f"{where}: no test named"
        for test in tests:
            assert (ROOT / test).is_file(), f"{where} names {test}, which does not exist"


# ---- DeepSpeed ------------------------------------------------------------------------------

def tiny_engine(stage: int, model=None, config=None):
    from marjara.train.config import TrainConfig
    from marjara.train.engine import initialize_engine
    from marjara.train.optim import build_adamw, parameter_groups

    ensure_process_group()
    torch.manual_seed(0)
    model = model or MarjaraModel(ModelConfig.from_preset("tiny", vocab_size=128))
    cfg = TrainConfig.from_flags({"batch_size": 2, "zero_stage": stage}, has_gpu=False)
    groups = parameter_groups(model, cfg.optim.weight_decay)
    settings = {**cfg.engine_config(world_size=1), **(config or {})}
    return initialize_engine(model=model, optimizer=build_adamw(groups, cfg), config=settings), groups


@pytest.fixture
def real_linear():
    """A ZeRO-3 engine replaces torch.nn.functional.linear process-wide; give it back afterwards."""
    linear = F.linear
    yield
    F.linear = linear


def step(engine, seed: int = 1) -> None:
    batch = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(seed))
    loss = engine(batch[:, :-1], batch[:, 1:]).loss
    engine.backward(loss)
    engine.step()


@pytest.mark.parametrize("stage, allreduces", [(0, 0), (1, 1)])
def test_a_one_rank_zero0_backward_runs_no_gradient_allreduce(monkeypatch, stage, allreduces):
    engine, _ = tiny_engine(stage)
    calls = []
    original = engine.allreduce_gradients
    monkeypatch.setattr(engine, "allreduce_gradients", lambda *a, **k: calls.append(1) or original(*a, **k))
    step(engine)
    assert len(calls) == allreduces


def test_a_moe_model_run_without_an_engine_gets_its_expert_groups():
    ensure_process_group()
    config = ModelConfig.from_preset("tiny", vocab_size=128, use_moe=True, num_experts=4, top_k=2)
    model = MarjaraModel(config)
    layers = [block.ffn.moe for block in model.blocks if block.is_moe]
    assert all(layer.deepspeed_moe.ep_group is None for layer in layers)  # no engine attached one
    logits = model(torch.randint(0, 128, (2, 8))).logits
    assert logits.shape == (2, 8, 128)
    assert all(layer.deepspeed_moe.ep_group is not None for layer in layers)
    expert = next(p for n, p in model.named_parameters() if "deepspeed_experts" in n)
    group, ep_rank = moe_compat.expert_groups(expert)
    assert torch.distributed.get_world_size(group) == 1 and ep_rank == 0


def test_a_universal_load_gives_every_group_its_own_weight_decay_and_step(tmp_path, real_linear):
    from marjara.checkpoint.store import universal_tag

    engine, groups = tiny_engine(3)
    for seed in (1, 2):
        step(engine, seed)
    engine.save_checkpoint(str(tmp_path), tag="global_step2")
    tag = universal_tag(tmp_path, "global_step2")
    resumed, _ = tiny_engine(3, config={"checkpoint": {"load_universal": True}})
    resumed.load_checkpoint(str(tmp_path), tag=tag)
    inner = resumed.optimizer.optimizer
    steps = [state["step"] for state in inner.state.values()]
    # What DeepSpeed's loader leaves (if this fails, DeepSpeed fixed it: drop the repair).
    assert [g["weight_decay"] for g in inner.param_groups] == [0.1, 0.1]
    assert len({id(s) for s in steps}) < len(steps)

    ds_compat.repair_universal_optimizer(resumed, [{k: v for k, v in g.items() if k != "params"} for g in groups])
    assert [g["weight_decay"] for g in inner.param_groups] == [0.1, 0.0]
    assert len({id(s["step"]) for s in inner.state.values()}) == len(steps)
    assert all(int(s["step"]) == 2 for s in inner.state.values())
    step(resumed, 3)
    assert all(int(s["step"]) == 3 for s in inner.state.values())  # each advanced once, not once per group


def test_the_engine_accessors_read_the_rate_the_norm_and_the_skipped_steps(real_linear):
    torch.manual_seed(0)
    plain = MarjaraModel(ModelConfig.from_preset("tiny", vocab_size=128))
    batch = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    plain(batch[:, :-1], batch[:, 1:])[1].backward()
    norm = torch.stack([p.grad.norm() for p in plain.parameters() if p.grad is not None]).norm()
    for stage in (0, 1, 3):
        engine, _ = tiny_engine(stage)
        step(engine)
        assert ds_compat.learning_rate(engine) == pytest.approx(1e-3)  # no scheduler: the optimizer's lr
        assert ds_compat.skipped_steps(engine) == 0
        reported = ds_compat.global_grad_norm(engine)
        if stage == 0:
            assert reported is None  # plain fp32 data parallelism: DeepSpeed computes none
        else:
            assert float(reported) == pytest.approx(float(norm), rel=1e-5)


def test_the_inner_optimizer_is_the_torch_optimizer_the_engine_was_given():
    for stage in (0, 1):
        engine, _ = tiny_engine(stage)
        inner = ds_compat.inner_optimizer(engine)
        assert isinstance(inner, torch.optim.AdamW)
        assert sum(len(g["params"]) for g in inner.param_groups) > 0


def test_releasing_a_zero3_engine_removes_the_hooks_it_put_on_the_model(real_linear):
    engine, _ = tiny_engine(3)

    def hooks():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in engine.module.modules())

    before = hooks()
    ds_compat.release_engine(engine)
    assert hooks() < before / 10


def test_quiet_logger_sets_the_level_of_the_logger_deepspeed_logs_to():
    from deepspeed.utils import logging as ds_logging

    logger = logging.getLogger("DeepSpeed")
    saved = logger.level
    try:
        ds_compat.quiet_logger(logging.ERROR)
        assert logger.level == logging.ERROR
        assert ds_logging.logger is logger
    finally:
        logger.setLevel(saved)


# Deterministic MoE routing in eval mode.

def moe_layer(top_k: int):
    ensure_process_group()
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=128, use_moe=True, num_experts=4, top_k=top_k)
    return MarjaraModel(config).blocks[1].ffn


def reference_top_k(layer, x: torch.Tensor, k: int) -> torch.Tensor:
    """Every token to its k most probable experts, written from the weights alone: softmax over the
    gate's logits; top-2 renormalises its two probabilities, top-1 keeps the probability as it is."""
    gate_weight = layer.moe.deepspeed_moe.gate.wg.weight
    experts = layer.moe.deepspeed_moe.experts.deepspeed_experts
    tokens = x.reshape(-1, x.size(-1))
    probs = F.softmax(tokens.float() @ gate_weight.float().t(), dim=-1)
    top = probs.topk(k, dim=-1)
    weights = top.values / top.values.sum(-1, keepdim=True) if k > 1 else top.values
    out = torch.zeros_like(tokens)
    for slot in range(k):
        for expert_index, expert in enumerate(experts):
            rows = top.indices[:, slot] == expert_index
            if rows.any():
                out[rows] += weights[rows, slot, None] * expert(tokens[rows])
    return out.view_as(x)


@pytest.mark.parametrize("top_k", [1, 2])
def test_eval_mode_routes_every_token_to_its_top_k_experts_whatever_the_seed(top_k):
    layer = moe_layer(top_k).eval()
    # 51 tokens: at eval_capacity_factor 1 DeepSpeed's own eval gate keeps only ceil(51 / 4 * k) per
    # expert, drops the rest (chosen at random for top-1) and samples top-2's second expert.
    x = torch.randn(3, 17, 128)
    expected = reference_top_k(layer, x, top_k)
    outputs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            outputs.append(layer(x)[0])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    torch.testing.assert_close(outputs[0], expected, rtol=1e-5, atol=1e-6)
    # DeepSpeed's gate left as it is routes otherwise: without the patch the test above fails.
    layer.eval_routing = "training"
    with torch.no_grad():
        unpatched = layer(x)[0]
    assert (unpatched - expected).abs().max() > 1e-3


def test_the_gate_gets_its_own_settings_back_after_each_eval_forward():
    layer = moe_layer(2)
    gate = layer.moe.deepspeed_moe.gate
    settings = moe_compat.DETERMINISTIC_GATE

    def current():
        return {name: getattr(gate, name) for name in settings}

    before = current()
    assert before != settings  # DeepSpeed's defaults: dropping, min capacity, sampling
    with torch.no_grad():
        layer.eval()(torch.randn(2, 5, 128))
    assert current() == before
    with pytest.raises(RuntimeError, match="inside"):
        with moe_compat.deterministic_moe_gate(layer.moe):
            assert current() == settings
            raise RuntimeError("inside")
    assert current() == before


def test_a_gate_without_a_patched_field_is_refused_in_one_line(monkeypatch):
    layer = moe_layer(2)
    gate = layer.moe.deepspeed_moe.gate
    monkeypatch.delattr(gate, "top2_2nd_expert_sampling")
    with pytest.raises(MarjaraError, match=r"gate has no top2_2nd_expert_sampling: .*marjara/compat/deepspeed_moe.py"):
        with moe_compat.deterministic_moe_gate(layer.moe):
            pass
    assert not hasattr(gate, "top2_2nd_expert_sampling")  # nothing was set on a gate it refused


# ---- lm-eval --------------------------------------------------------------------------------

def test_the_lm_eval_cli_indexes_no_builtin_task_when_all_are_local(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    import lm_eval.tasks
    from lm_eval.config.evaluate_config import EvaluatorConfig

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lm_eval.tasks.TaskManager)  # undone after the test
    (tmp_path / "mine.yaml").write_text(
        "task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: /nonexistent.jsonl\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n")
    assert not lm_eval_compat.skip_builtin_task_index("mine,hellaswag", str(tmp_path))  # a built-in task is asked for
    assert lm_eval_compat.skip_builtin_task_index("mine", str(tmp_path))
    config = EvaluatorConfig(tasks="mine", include_path=str(tmp_path))
    index = config.process_tasks().task_index  # what lm-eval's own `run` command does
    assert "mine" in index and "hellaswag" not in index
    assert config.tasks == ["mine"]
