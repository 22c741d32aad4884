"""The end of a run: nothing of ours keeps a finished Learner (and its engine's process groups)
alive, and exit_now() ends a launched process with its exit code and all of its output."""

import gc
import os
import signal
import subprocess
import sys
import weakref

from train_helpers import QUICK, ROOT

from marjara.distributed import ensure_process_group
from marjara.train.args import parse_config


def stop_handlers() -> dict:
    return {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}


def test_fit_gives_the_signal_handlers_back_and_lets_the_learner_go(tmp_path):
    from marjara.train.learner import Learner

    ensure_process_group()
    before = stop_handlers()
    learner = Learner(parse_config(QUICK + ["--max_steps", "1", "--save_interval", "0",
                                          "--out_dir", str(tmp_path / "ckpt"), "--log_dir", str(tmp_path / "tb")]))
    assert learner.fit() == 0
    assert stop_handlers() == before  # Ctrl-C after training behaves as it did before it
    learner.engine.destroy()
    finished = weakref.ref(learner)
    del learner
    gc.collect()
    assert finished() is None, "something still holds the Learner, and with it the engine's process groups"


def test_exit_now_runs_the_exit_handlers_keeps_code_and_output_and_skips_the_teardown():
    script = ("import atexit, sys\n"
              "from marjara.distributed import exit_now\n"
              "class Finalized:\n"
              "    def __del__(self): print('|torn down')\n"
              "held_until_teardown = Finalized()\n"
              "atexit.register(print, '|exit handler ran', end='')\n"
              "print('trained', end='')\n"  # block-buffered: stdout is a pipe
              "sys.stderr.write('warned')\n"
              "exit_now(3)\n")
    buffered = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=buffered,
                            timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (3, "trained|exit handler ran", "warned")
