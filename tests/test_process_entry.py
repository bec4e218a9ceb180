"""vaeflow.cli.run, the process entry of every stage command. It exits without the
interpreter's teardown, yet delivers everything a normal exit would (exit code, buffered
output, exit handlers), and falls back to the normal exit while a non-daemon thread still
works or a profiler runs; and it keeps freed memory for reuse. Real interpreters."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from support import REPO


def _python(code: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # pipes block-buffer
    code = textwrap.dedent(PRELUDE) + textwrap.dedent(code)  # PRELUDE: below
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


PRELUDE = """
    import atexit, sys
    from vaeflow.cli import run

    class Finalised:  # freed by the interpreter's teardown, which run() skips
        def __del__(self):
            sys.stderr.write("teardown ran\\n")

    KEEP = Finalised()
    atexit.register(lambda: sys.stderr.write("exit handler ran\\n"))
"""


def test_output_exit_code_and_handlers_survive_the_fast_exit(tmp_path):
    res = _python("run(['validate', 'config/config.yaml'])", tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Pipeline validation passed!" in res.stdout
    assert res.stdout.rstrip().endswith("val_recon, val_kl")  # the last line, after the block buffer
    assert "exit handler ran" in res.stderr
    assert "teardown ran" not in res.stderr


def test_a_refused_command_keeps_its_exit_code_and_message(tmp_path):
    res = _python("run(['provenance', sys.argv[1]])", tmp_path, str(tmp_path / "missing.json"))
    assert res.returncode == 2
    assert res.stderr.startswith("vaeflow: error:") and "missing.json" in res.stderr
    assert "teardown ran" not in res.stderr


def test_a_live_non_daemon_thread_gets_the_normal_exit(tmp_path):
    done = tmp_path / "thread_done"
    code = """
    import threading, time
    from pathlib import Path

    def work():
        time.sleep(0.5)
        Path(sys.argv[2]).write_text("finished")

    threading.Thread(target=work).start()
    run(['sync-mtimes', '--root', sys.argv[1]])
    """
    res = _python(code, tmp_path, str(tmp_path), str(done))
    assert res.returncode == 0, res.stderr
    assert done.read_text() == "finished"
    assert "exit handler ran" in res.stderr


@pytest.mark.parametrize("script", ["prepare", "train", "evaluate", "sample", "curves", "summary"])
def test_every_stage_script_exits_through_run(script):
    text = (REPO / "scripts" / f"{script}.py").read_text()
    assert f'run(["{script}", *sys.argv[1:]])' in text


def test_a_profiled_command_still_writes_its_profile(tmp_path):
    for i, script in enumerate([[str(REPO / "scripts" / "prepare.py")], ["-m", "vaeflow.cli", "prepare"]]):
        stats = tmp_path / f"prepare{i}.prof"
        res = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(stats), *script, "--config",
                              "config/config.yaml", "--results", str(tmp_path / "results")],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert stats.stat().st_size > 0, script


def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    """Five blocks of 8-24 MB held together, then freed, 20 times (a decode pass's pattern):
    glibc's default trims the heap top and maps large blocks afresh, so each round faults
    pages in again; a stage command's setting (vaeflow.cli.run) reuses the first round's."""
    code = textwrap.dedent("""
        import resource, sys
        import numpy as np
        from vaeflow.cli import reuse_freed_memory
        if sys.argv[1] == "stage":
            reuse_freed_memory()
        def one_round():
            held = [np.ones(n, dtype=np.float32) for n in (2 << 20, 4 << 20, 6 << 20, 4 << 20, 2 << 20)]
            del held
        one_round()  # faulted in either way
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            one_round()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    faults = {how: int(subprocess.run([sys.executable, "-c", code, how], cwd=REPO, capture_output=True, text=True,
                                      check=True, timeout=60).stdout)
              for how in ("default", "stage")}
    assert faults["default"] > 20 * 500, faults  # measured: about 31,500
    assert faults["stage"] < faults["default"] / 10, faults  # measured: 0
