"""lm-evaluation-harness, where MARJARA changes what its CLI does. Each function says What, Why,
Upstream, Guard and Test (see marjara/compat/__init__.py)."""

from __future__ import annotations

from marjara.compat import version_guard


def skip_builtin_task_index(tasks: str, include_path: str | None) -> bool:
    """What: when each name in `tasks` is a plain task found in `include_path`, makes lm-eval's
    TaskManager default to include_defaults=False, so the CLI indexes no built-in task. Returns
    whether it did.
    Why: lm-eval indexes its ~230 built-in task folders on every run, seconds of YAML parsing, even
    when every requested task is a local YAML; TaskManager can skip that, but the CLI never asks it to.
    Upstream: https://github.com/EleutherAI/lm-evaluation-harness/issues/1801 (closed: TaskManager
    gained include_defaults, which the CLI does not pass).
    Guard: version_guard("lm-eval").
    Test: tests/test_compat.py (the CLI's own task loading then indexes no built-in task)."""
    if not include_path:
        return False
    version_guard("lm-eval")
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=include_path, include_defaults=False).task_index
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names or any(name not in local or local[name].kind.name != "TASK" for name in names):
        return False

    class LocalTaskManager(TaskManager):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("include_defaults", False)
            super().__init__(*args, **kwargs)

    lm_eval.tasks.TaskManager = LocalTaskManager
    return True
