"""The PyTorch half of an export runs in a spawned child: answers, progress, errors, signals,
and an export's parent that never imports PyTorch."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Generator
from pathlib import Path

import pytest

from coatnet_export.child import run_in_child
from coatnet_export.console import Progress
from coatnet_export.errors import InputError

from conftest import all_gone

HERE = __name__


def counting_steps(start: int, progress: Progress) -> Generator[int, int, tuple[int, int]]:
    """Yield our pid and ``start + 1``; given x, one progress step, and return (x * 2, pid)."""
    answer = yield os.getpid() * 1000 + start + 1
    progress.expect(2)
    with progress.step("doubling"):
        progress.note(f"got {answer}")
    return answer * 2, os.getpid()


def failing_steps(kind: str, progress: Progress) -> Generator[None, None, None]:
    yield None
    if kind == "input":
        raise InputError("the checkpoint is odd (give another one)")
    if kind == "unpicklable":
        raise UnpicklableError(lambda: None)
    if kind == "killed":
        os.kill(os.getpid(), signal.SIGKILL)


def sleeping_steps(seconds: float, progress: Progress) -> Generator[int, None, None]:
    yield os.getpid()
    time.sleep(seconds)


class UnpicklableError(Exception):
    def __init__(self, callback) -> None:
        super().__init__("holds a lambda")
        self.callback = callback


@pytest.mark.parametrize("in_process", [False, True])
def test_steps_answer_and_report_progress_the_same_here_and_in_a_child(capsys, in_process):
    progress = Progress(enabled=True)
    with run_in_child(f"{HERE}:counting_steps", (41,), progress, in_process=in_process) as steps:
        first = steps.next()
        doubled, pid = steps.next(21)
        assert steps.finished
    with progress.step("after the child"):
        pass
    assert first == pid * 1000 + 42 and doubled == 42
    assert (pid == os.getpid()) == in_process
    err = capsys.readouterr().err
    assert err.startswith("[1/2] doubling ...\n      got 21\n      ... ")
    assert "\n[2/2] after the child ... " in err  # the count goes on where the child left it


@pytest.mark.parametrize("in_process", [False, True])
def test_an_input_error_in_the_steps_is_raised_here(in_process):
    with run_in_child(
        f"{HERE}:failing_steps", ("input",), Progress(False), in_process=in_process
    ) as steps:
        steps.next()
        with pytest.raises(InputError) as raised:
            steps.next()
    assert str(raised.value) == "the checkpoint is odd (give another one)"  # the CLI's line


def test_an_error_that_cannot_travel_becomes_a_runtime_error_with_its_traceback():
    with run_in_child(f"{HERE}:failing_steps", ("unpicklable",), Progress(False)) as steps:
        steps.next()
        with pytest.raises(RuntimeError, match="UnpicklableError: holds a lambda") as raised:
            steps.next()
    assert "Traceback" in str(raised.value) and "failing_steps" in str(raised.value)


def test_a_child_killed_by_sigkill_is_reported_as_out_of_memory():
    with run_in_child(f"{HERE}:failing_steps", ("killed",), Progress(False)) as steps:
        steps.next()
        with pytest.raises(InputError, match=r"killed \(SIGKILL, most likely out of memory"):
            steps.next()


def test_leaving_the_block_stops_a_busy_child():
    start = time.monotonic()
    pid = None
    with (
        pytest.raises(KeyError),  # as an interruption would, mid-work
        run_in_child(f"{HERE}:sleeping_steps", (60.0,), Progress(False)) as steps,
    ):
        pid = steps.next()
        raise KeyError("the caller gave up")
    assert pid is not None and all_gone([pid], within_s=0)
    assert time.monotonic() - start < 20


KILLED_CALLER = """
import os, signal, sys
sys.path[:0] = {paths!r}
from coatnet_export.child import run_in_child
from coatnet_export.console import Progress
with run_in_child("{module}:sleeping_steps", (60.0,), Progress(False)) as steps:
    print(steps.next(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_child_dies_with_a_caller_killed_by_sigkill():
    script = KILLED_CALLER.format(paths=sys.path, module=HERE)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert all_gone([int(done.stdout.split()[0])])


TORCH_FREE_EXPORT = """
import sys
from coatnet_export.cli import main
try:
    main(["--variant", "coatnet_0", "--img-size", "32", "32", "--num-classes", "10",
          "--output", sys.argv[1], "--samples", "1"])
except SystemExit as exit:
    assert exit.code == 0, exit.code
loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "onnxscript"))
print("loaded:", loaded[:5])
"""


def test_the_export_command_validates_in_a_process_without_pytorch(tmp_path: Path):
    """The CLI's process never imports PyTorch: the child did the PyTorch half and exited
    (about 0.5 GiB less peak memory); the progress lines count on across both."""
    out = tmp_path / "export"
    done = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_EXPORT, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "loaded: []" in done.stdout
    steps = [line.split("]")[0] + "]" for line in done.stderr.splitlines() if line.startswith("[")]
    assert steps == [f"[{k}/6]" for k in range(1, 7)], done.stderr
    assert (out / "model.onnx").is_file() and (out / "manifest.json").is_file()


TWO_PROCESSES = """
import subprocess, sys, time
hold = bytearray(150 * 2**20)  # touched: resident
child = subprocess.Popen([sys.executable, "-c",
    "import time; hold = bytearray(250 * 2**20); print('ready', flush=True); time.sleep(1)"],
    stdout=subprocess.PIPE)
child.stdout.readline()
child.wait()
"""


def test_run_measured_sums_the_memory_of_a_process_and_its_children():
    """Benchmarks measure an export's peak as its process tree's: 150 MiB here while 250 MiB
    lives in a child is at least 400 MiB, where the largest process alone holds 250."""
    from coatnet_export.bench import run_measured

    run = run_measured([sys.executable, "-c", TWO_PROCESSES])
    assert run.returncode == 0, run.output
    assert run.peak_rss_bytes >= 400 * 2**20, run.peak_rss_bytes / 2**20


def decide_here(queue) -> None:
    from coatnet_export.export.pipeline import pytorch_in_process

    queue.put((pytorch_in_process(None), "torch" in sys.modules))


def test_the_pytorch_half_runs_here_when_a_child_would_not_help_or_cannot_start():
    from coatnet_export.export.pipeline import pytorch_in_process

    assert pytorch_in_process(True) and not pytorch_in_process(False)  # as asked
    import torch  # noqa: F401 (as most test modules have)

    assert pytorch_in_process(None)  # torch is here already: a child would import it again
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    worker = context.Process(target=decide_here, args=(queue,), daemon=True)
    worker.start()
    assert queue.get(timeout=120) == (True, False)  # daemonic: may not start a child
    worker.join()
