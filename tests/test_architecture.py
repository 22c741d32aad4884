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
