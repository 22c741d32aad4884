"""Every place MARJARA reaches past the documented API of DeepSpeed or lm-eval, and why.

`marjara.compat.deepspeed` (with `deepspeed_moe` and `deepspeed_sequence`) and `marjara.compat.lm_eval` hold one function per reach: a patch
(it changes what the library does) or an accessor (it reads a name the library does not
document). Each function's docstring says, on lines of their own:

    What:     what it changes or reads
    Why:      what goes wrong without it
    Upstream: the upstream issue or pull request, or "none known"
    Guard:    the version guard it calls (below)
    Test:     the tests that fail when it stops taking effect

tests/test_compat.py checks that every function has these lines, calls its guard and names test
files that exist. Outside this package MARJARA uses only DeepSpeed's documented entry points:
tests/test_architecture.py lists them and fails on any other DeepSpeed name, on an engine attribute
DeepSpeed does not document, and on a private name of either library.

Not here, because they are file formats rather than code: the on-disk layout of DeepSpeed's
checkpoints (file names and state-dict keys, named in marjara/checkpoint/format.py and read by
marjara/checkpoint/zero_reader.py; tests/test_convert.py fails when it changes), and the parameter
names DeepSpeed's MoE layer gives its experts (marjara/model/param_names.py, marjara/hf/layout.py; the
round trips of tests/test_hf_convert.py fail when they change).

The version guard: TESTED is the range of each library these functions were written and tested
for. Outside it, a loud warning on stderr, once per process and from rank 0 only, says what may
have stopped working. The functions still run there; the tests each names tell whether they
still take effect, which is how a new release gets admitted to TESTED.
"""

from __future__ import annotations

import functools
import os
import sys
from importlib.metadata import PackageNotFoundError, version

# package -> (lowest tested version, first untested one); pyproject.toml's bounds match.
TESTED = {"deepspeed": ("0.19.8", "0.20"), "lm-eval": ("0.4.13", "0.4.14")}
REACHES = {
    "deepspeed": "ZeRO-3 fp32 masters shared with the partitions, the one-rank ZeRO-0 all-reduce skip, the ZeRO-0 "
                 "fp16 loss scaling, the universal-checkpoint optimizer repair, MoE expert groups and ranks outside "
                 "the engine, deterministic MoE routing in eval mode, the Ulysses sequence groups and their gradient scale, and reads of undocumented engine, optimizer, "
                 "config, logger, checkpoint-pickle and shared-memory names",
    "lm-eval": "skipping the built-in task index when every task is local",
}
_warned: set[str] = set()


@functools.lru_cache(maxsize=None)
def installed_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def version_guard(package: str) -> bool:
    """Whether the installed `package` is one these functions were tested with; if not, say so
    loudly (once per process, from rank 0 only)."""
    from packaging.version import Version

    installed = installed_version(package)
    low, high = TESTED[package]
    if installed is not None and Version(low) <= Version(installed) < Version(high):
        return True
    if package not in _warned:
        _warned.add(package)
        if os.environ.get("RANK", "0") != "0":
            return False
        print(f"WARNING: {package} {installed} is installed, but marjara/compat/ reaches into {package}'s internals "
              f"as tested with {package} >= {low}, < {high} ({REACHES[package]}); they may no longer take effect. "
              f"Install {package}=={low}, or run tests/test_compat.py before trusting this run.",
              file=sys.stderr, flush=True)
    return False
