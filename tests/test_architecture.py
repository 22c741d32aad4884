"""The shape of the package, checked statically over marjara/**.py: where each on-disk format is
named, which rooms import which, and that no import cycle exists."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "marjara"


def modules() -> dict[str, ast.Module]:
    """Dotted module name -> parsed source, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def string_constants(tree: ast.Module) -> list[str]:
    """String literals of a module, docstrings left out (those describe the format, they do not define it)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def modules_naming(token: str, exact: bool = False) -> set[str]:
    """Modules with a literal that is, or builds, a file name holding `token` (prose, which has
    spaces, only mentions a name and is not counted)."""
    def names(value: str) -> bool:
        return value == token if exact else token in value and " " not in value

    return {name for name, tree in modules().items() if any(names(v) for v in string_constants(tree))}


CHECKPOINT_FORMAT = "marjara.checkpoint.format"


def test_every_checkpoint_file_name_is_spelled_in_the_format_module_only():
    for token in ("marjara.json", "marjara_rank", "global_step", "marjara_universal", "mp_rank_00", "zero_pp_rank",
                  "optim_states"):
        assert modules_naming(token) == {CHECKPOINT_FORMAT}, token
    assert modules_naming("latest", exact=True) == {CHECKPOINT_FORMAT}
    assert modules_naming("_universal", exact=True) == {CHECKPOINT_FORMAT}


def test_each_file_format_keeps_its_version_in_one_module():
    # Three formats, each versioned where it is defined: training checkpoints (marjara.json),
    # exported models (config.json, read by the model package, which may not import checkpoint/),
    # and prepared token files (meta.json).
    assert modules_naming("format_version") == {CHECKPOINT_FORMAT, "marjara.model.pretrained", "marjara.data.formats"}
    for token in ("config.json", "model.safetensors"):
        assert modules_naming(token) == {"marjara.model.pretrained"}, token
    for name, tree in modules().items():
        assigned = {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    for target in node.targets if isinstance(target, ast.Name)}
        if "FORMAT_VERSION" in assigned:
            assert name in (CHECKPOINT_FORMAT, "marjara.model.pretrained", "marjara.data.formats"), name


def imported_modules(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The marjara modules `name` imports anywhere in its source, lazy imports inside functions
    included: `from a.b import c` counts as a.b.c when that is a module, else as a.b."""
    package = name if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists() else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {module for module in found if module in known and module != name}


def import_graph() -> dict[str, set[str]]:
    trees = modules()
    return {name: imported_modules(name, tree, set(trees)) for name, tree in trees.items()}


def test_no_import_cycle_among_marjara_modules():
    """Every arrow of the design points one way. (`import a.b.c` runs a/__init__ and a/b/__init__
    too, but counts as an import of a.b.c only: a package's __init__ is an edge where it is named.)"""
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target] if target in path else [module, target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


COMMANDS = {f"marjara.{verb}" for verb in ("convert", "generate", "prepare", "evaluate", "plan", "preflight")}


def test_no_module_imports_a_command():
    """Commands parse their flags and call in; their work lives in the rooms, where other modules
    reach it. A module importing a command imports a parser instead of the work."""
    assert COMMANDS <= set(modules())
    importers = {name: sorted(targets & COMMANDS) for name, targets in import_graph().items() if targets & COMMANDS}
    assert importers == {}, f"these modules import commands: {importers}"


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through the modules it imports."""
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def in_room(name: str, room: str) -> bool:
    return name == room or name.startswith(room + ".")


def test_the_model_package_imports_nothing_of_training_checkpoints_launchers_or_evaluation():
    """Not even through another room: the model reads Hugging Face folders through marjara.hf,
    whose readers must then keep to the same rule."""
    forbidden = ("marjara.train", "marjara.checkpoint", "marjara.launch", "marjara.eval", "marjara.distributed")
    graph = import_graph()
    for name in graph:
        if in_room(name, "marjara.model"):
            wrong = sorted(t for t in reachable(graph, name) if any(in_room(t, room) for room in forbidden))
            assert not wrong, f"{name} imports {', '.join(wrong)}"


def test_the_hugging_face_room_reads_on_its_own_and_writes_with_the_export_writers():
    """marjara.hf maps, reads and writes the transformers layout; only its writer uses checkpoint/'s
    export machinery (the output-folder check, weight pieces, the streaming safetensors writer)."""
    writers = {"marjara.checkpoint.export", "marjara.checkpoint.pieces", "marjara.checkpoint.safetensors_writer"}
    forbidden = ("marjara.train", "marjara.launch", "marjara.eval", "marjara.distributed")
    for name, targets in import_graph().items():
        if in_room(name, "marjara.hf"):
            wrong = {t for t in targets if any(in_room(t, room) for room in forbidden)}
            checkpoint = {t for t in targets if in_room(t, "marjara.checkpoint")}
            wrong |= checkpoint - (writers if name == "marjara.hf.export" else set())
            assert not wrong, f"{name} imports {', '.join(sorted(wrong))}"


def test_the_hugging_face_layout_lives_in_one_room():
    """Every module that names a transformers-only file or config key is in marjara.hf, apart from
    model/pretrained.py, which names every exported file (both layouts) and dispatches on them."""
    for token in ("tokenizer_config", "Qwen3ForCausalLM", "model_type", "safetensors.index"):
        assert {name for name in modules_naming(token) if not in_room(name, "marjara.hf")} <= {
            "marjara.model.pretrained"}, token


def test_the_import_checks_see_lazy_and_relative_imports():
    tree = ast.parse("def f():\n    from marjara.train import ema\n    from .config import ModelConfig\n")
    known = {"marjara.train", "marjara.train.ema", "marjara.model.config", "marjara.model.x"}
    assert imported_modules("marjara.model.x", tree, known) == {"marjara.train.ema", "marjara.model.config"}


def library_aliases(tree: ast.Module) -> set[str]:
    """Local names bound to DeepSpeed or lm-eval modules and objects (import x, from x import y)."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {(a.asname or a.name).split(".")[0] for a in node.names
                        if a.name.split(".")[0] in ("deepspeed", "lm_eval")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("deepspeed", "lm_eval"):
            aliases |= {a.asname or a.name for a in node.names}
    return aliases


def private_library_uses(tree: ast.Module) -> list[str]:
    """`alias._name` attribute uses (dunders aside) where alias, or the head of a dotted chain,
    is a DeepSpeed or lm-eval import."""
    aliases, found = library_aliases(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            head = node.value
            while isinstance(head, ast.Attribute):
                head = head.value
            if isinstance(head, ast.Name) and head.id in aliases:
                found.append(f"{head.id}...{node.attr}")
    return found


def in_compat(name: str) -> bool:
    return name == "marjara.compat" or name.startswith("marjara.compat.")


def test_only_the_compat_package_reaches_into_deepspeed_or_lm_eval_internals():
    offenders = {name: uses for name, tree in modules().items()
                 if not in_compat(name) and (uses := private_library_uses(tree))}
    assert offenders == {}, "move these into marjara/compat/, with what, why, upstream, guard and test"


def test_the_internals_check_sees_a_private_use():
    tree = ast.parse("from deepspeed.utils import groups\ndef f():\n    return groups._get_expert_parallel_rank('x')\n")
    assert private_library_uses(tree) == ["groups..._get_expert_parallel_rank"]
    assert private_library_uses(ast.parse("import os\nos._exit(0)\n")) == []


# DeepSpeed's documented API: the names MARJARA may use outside marjara/compat/, each with the page
# of DeepSpeed's documentation (its repository's docs/ folder) that documents it.
DEEPSPEED_PUBLIC = {
    "deepspeed.initialize": "code-docs/source/initialize.rst",
    "deepspeed.init_distributed": "code-docs/source/initialize.rst",
    "deepspeed.add_config_arguments": "code-docs/source/initialize.rst",
    "deepspeed.checkpointing.configure": "code-docs/source/activation-checkpointing.rst",
    "deepspeed.checkpointing.is_configured": "code-docs/source/activation-checkpointing.rst",
    "deepspeed.checkpointing.checkpoint": "code-docs/source/activation-checkpointing.rst",
    "deepspeed.checkpointing.reset": "code-docs/source/activation-checkpointing.rst",
    "deepspeed.moe.layer.MoE": "code-docs/source/moe.rst",
    "deepspeed.sequence.layer.DistributedAttention": "_tutorials/ds-sequence.md",
    "deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer": "_tutorials/mixture-of-experts.md",
    "deepspeed.accelerator.get_accelerator": "_tutorials/accelerator-abstraction-interface.md",
    "deepspeed.runtime.config.DeepSpeedConfig": "_tutorials/monitor.md",
    "deepspeed.zero.GatheredParameters": "code-docs/source/zero3.rst",
    "deepspeed.utils.safe_get_full_fp32_param": "code-docs/source/zero3.rst",
    "deepspeed.utils.safe_get_local_fp32_param": "code-docs/source/zero3.rst",
    "deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint": "code-docs/source/model-checkpointing.rst",
    "deepspeed.utils.zero_to_fp32.load_state_dict_from_zero_checkpoint": "code-docs/source/model-checkpointing.rst",
    "deepspeed.utils.zero_to_fp32.convert_zero_checkpoint_to_fp32_state_dict": "code-docs/source/model-checkpointing.rst",
}
# Whole namespaces: deepspeed.comm mirrors torch.distributed (_pages/training.md, communication logging).
DEEPSPEED_PUBLIC_MODULES = {"deepspeed.comm"}
# What the engine deepspeed.initialize returns documents (code-docs/source/training.rst,
# model-checkpointing.rst; `module` and `device` in _tutorials/getting-started.md and cifar-10.md),
# and the torch.nn.Module methods it inherits that MARJARA calls.
ENGINE_PUBLIC = {"forward", "backward", "scale", "step", "is_gradient_accumulation_boundary",
                 "set_gradient_accumulation_boundary", "no_sync", "save_checkpoint", "load_checkpoint",
                 "save_16bit_model", "compile", "module", "device", "optimizer", "train", "eval"}
# Attributes DeepSpeed sets on engines, optimizers, parameters and MoE layers without documenting
# them. (ZeRO-3's `ds_tensor` and `ds_shape` are used in code-docs/source/zero3.rst's examples.)
DEEPSPEED_INTERNAL_ATTRIBUTES = {
    "get_lr", "get_global_grad_norm", "skipped_steps", "global_steps", "destroy", "dp_world_size",
    "zero_optimization_stage", "enable_backward_allreduce", "allreduce_gradients", "loss_scale",
    "loss_scaler", "cur_scale", "loss_scale_config", "custom_loss_scaler", "ds_numel", "ds_id", "ds_status",
    "ds_persist", "ds_process_group", "_dp_group", "deepspeed_moe", "deepspeed_experts", "ep_group",
    "group_name", "expert_group_name", "num_local_experts", "set_deepspeed_parallelism",
    "fp32_partitioned_groups_flat", "bit16_groups", "single_partition_of_fp32_groups",
}
# Modules that define these names on modules of their own rather than reading DeepSpeed's: the
# inference MoE layer mirrors DeepSpeed's MoE attribute names so its parameter names (the files'
# layout) are DeepSpeed's, and it runs without DeepSpeed's layer or a process group.
DEFINES_DEEPSPEED_NAMES = {"marjara.model.inference_moe": {"deepspeed_moe", "deepspeed_experts"}}
SCANNED_SCRIPTS = [PACKAGE.parent / "train.py", *sorted((PACKAGE.parent / "bench").glob("*.py"))]


def deepspeed_names(tree: ast.Module) -> list[str]:
    """Every dotted DeepSpeed name the source imports or reaches through an attribute chain
    (`import deepspeed` then `deepspeed.a.b`, `from deepspeed.a import b as c` then `c.d`). What a
    call returns is not followed: the engine's attributes are checked by engine_attributes."""
    aliases, used = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "deepspeed":
                    used.append(alias.name)
                    aliases[alias.asname or "deepspeed"] = alias.name if alias.asname else "deepspeed"
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "deepspeed":
            for alias in node.names:
                used.append(f"{node.module}.{alias.name}")
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, head = [], node
            while isinstance(head, ast.Attribute):
                chain.append(head.attr)
                head = head.value
            if isinstance(head, ast.Name) and head.id in aliases:
                used.append(".".join([aliases[head.id], *reversed(chain)]))
    return used


def is_public(name: str) -> bool:
    return (name == "deepspeed" or name in DEEPSPEED_PUBLIC
            or any(name == m or name.startswith(m + ".") for m in DEEPSPEED_PUBLIC_MODULES)
            or any(public.startswith(name + ".") for public in [*DEEPSPEED_PUBLIC, *DEEPSPEED_PUBLIC_MODULES]))


def engine_attributes(tree: ast.Module) -> list[str]:
    """Attributes read from a DeepSpeed engine: from a name `engine` or an attribute `.engine`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            receiver = node.value
            if (isinstance(receiver, ast.Name) and receiver.id == "engine") or (
                    isinstance(receiver, ast.Attribute) and receiver.attr == "engine"):
                found.append(node.attr)
    return found


def internal_attributes(tree: ast.Module) -> list[str]:
    """Uses of DEEPSPEED_INTERNAL_ATTRIBUTES: `x.name`, and getattr/hasattr/setattr(x, "name", ...)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in DEEPSPEED_INTERNAL_ATTRIBUTES:
            found.append(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and node.args[1].value in DEEPSPEED_INTERNAL_ATTRIBUTES):
            found.append(node.args[1].value)
    return found


def sources_outside_compat() -> dict[str, ast.Module]:
    found = {name: tree for name, tree in modules().items() if not in_compat(name)}
    for path in SCANNED_SCRIPTS:
        found[str(path.relative_to(PACKAGE.parent))] = ast.parse(path.read_text(), filename=str(path))
    return found


def test_outside_compat_deepspeed_is_used_through_its_documented_entry_points_only():
    offenders = {name: wrong for name, tree in sources_outside_compat().items()
                 if (wrong := sorted({n for n in deepspeed_names(tree) if not is_public(n)}))}
    assert offenders == {}, "use these through marjara/compat/deepspeed.py (what, why, upstream, guard, test)"


def test_outside_compat_no_undocumented_engine_optimizer_parameter_or_moe_attribute_is_used():
    offenders = {}
    for name, tree in sources_outside_compat().items():
        wrong = sorted({a for a in engine_attributes(tree) if a not in ENGINE_PUBLIC} | set(internal_attributes(tree)))
        wrong = [a for a in wrong if a not in DEFINES_DEEPSPEED_NAMES.get(name, ())]
        if wrong:
            offenders[name] = wrong
    assert offenders == {}, "use these through marjara/compat/deepspeed.py (what, why, upstream, guard, test)"


def test_the_deepspeed_checks_see_internal_names_however_they_are_reached():
    tree = ast.parse("import deepspeed\nimport deepspeed.comm as comm\nfrom deepspeed.runtime import zero as z\n"
                     "from deepspeed.moe.layer import MoE\n"
                     "def f(engine, p, self):\n    deepspeed.utils.logger.setLevel(1)\n    comm.get_rank()\n"
                     "    z.stage3.Thing\n    MoE(1)\n    deepspeed.initialize()\n"
                     "    engine.get_lr(); engine.backward(1); self.engine.skipped_steps\n"
                     "    getattr(p, 'ds_persist', False); p.ds_tensor; p.group_name\n")
    assert sorted(n for n in deepspeed_names(tree) if not is_public(n)) == [
        "deepspeed.runtime.zero", "deepspeed.runtime.zero.stage3", "deepspeed.runtime.zero.stage3.Thing",
        "deepspeed.utils.logger", "deepspeed.utils.logger.setLevel"]
    assert sorted(a for a in engine_attributes(tree) if a not in ENGINE_PUBLIC) == ["get_lr", "skipped_steps"]
    assert sorted(internal_attributes(tree)) == ["ds_persist", "get_lr", "group_name", "skipped_steps"]


TORCH_DTYPES = {"float32", "bfloat16", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"}


def dtype_tables(tree: ast.Module) -> int:
    """Dict literals with a torch dtype (torch.bfloat16, ...) as a key or a value."""
    def is_dtype(node) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr in TORCH_DTYPES and isinstance(node.value, ast.Name)
                and node.value.id == "torch")

    return sum(1 for node in ast.walk(tree) if isinstance(node, ast.Dict)
               and any(is_dtype(n) for n in [*node.keys, *node.values] if n is not None))


def test_dtype_names_are_mapped_in_one_module():
    assert {name for name, tree in modules().items() if dtype_tables(tree)} == {"marjara.dtypes"}


def test_the_dtype_check_sees_a_table():
    assert dtype_tables(ast.parse('D = {"bf16": torch.bfloat16}\n')) == 1
    assert dtype_tables(ast.parse('D = {"bf16": "bfloat16"}\n')) == 0


def json_parsers(tree: ast.Module) -> int:
    return sum(1 for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
               and node.func.attr in ("load", "loads") and isinstance(node.func.value, ast.Name)
               and node.func.value.id == "json")


def test_json_object_files_are_read_by_one_reader():
    """marjara.fileio.read_json_object (and its parse_json_object) gives every JSON file the same
    one-line errors. JSON *lines* are another matter, each line a record: prepare's .jsonl inputs
    (errors name the line) and metrics.jsonl (a line cut by a crash is dropped). checkpoint/export
    only normalises a config it built (tuples to lists) by a round trip."""
    readers = {name for name, tree in modules().items() if json_parsers(tree)}
    assert readers == {"marjara.fileio", "marjara.data.documents", "marjara.train.run_dir", "marjara.checkpoint.export"}


COMMAND_ENTRY_POINTS = {"main", "parse_args", "build_parser"}


def test_each_public_function_and_class_name_is_defined_once():
    """Two read_meta or two expert_parallel_rank in different rooms read as one thing and are two;
    a name says what it does across the whole package. Commands' entry points are alike by design."""
    defined: dict[str, list[str]] = {}
    for name, tree in modules().items():
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                defined.setdefault(node.name, []).append(name)
    twice = {n: where for n, where in defined.items() if len(where) > 1 and n not in COMMAND_ENTRY_POINTS}
    assert twice == {}


def test_one_module_is_called_ds_config():
    assert [name for name in modules() if name.rpartition(".")[2] == "ds_config"] == ["marjara.train.ds_config"]
