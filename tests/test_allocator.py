"""marjara.train.allocator tells which malloc a process runs on; the README's LD_PRELOAD line works."""

import os
import subprocess
import sys

import pytest

from marjara.train.allocator import find_tcmalloc

PROBE = "from marjara.train.allocator import active_allocator; print(active_allocator())"


def allocator_of_a_python(preload: str | None) -> str:
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_plain_python_runs_on_glibc_malloc():
    assert allocator_of_a_python(None) == "glibc"


@pytest.mark.skipif(find_tcmalloc() is None, reason="tcmalloc is not installed (.ci/run installs it)")
def test_preloading_the_library_found_runs_the_process_on_tcmalloc():
    assert find_tcmalloc() == "libtcmalloc_minimal.so.4"  # the name the README preloads
    assert allocator_of_a_python(find_tcmalloc()) == "tcmalloc"
