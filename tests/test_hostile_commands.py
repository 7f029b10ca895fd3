"""Hostile inputs to package, predict, bench, validate and quantize: paths, locks, numbers, shapes.

Each case asserts the exit code, exactly one ``error:`` line naming the problem, no traceback,
and the file system as it was: every file under the case's folder (a copy of the export among
them) with the same bytes and modification time. Memory limits, races and signals are real:
``prlimit --as``, two processes, SIGTERM to the process itself.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from coatnet_export.output import lock
from coatnet_export.runtimes import check_logits, load_model

from conftest import CliResult, assert_clean_failure, export_tiny

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
AS_LIMIT = 3 * GIB
"""The address-space limit (``prlimit --as``) of the memory cases: torch, onnxruntime and
OpenVINO map about 1 GiB of it at start."""


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every path under ``root``; each file with its content hash and modification time (a
    folder's own mtime moves with any staging folder or lock made and removed in it)."""
    state = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            state[str(path.relative_to(root))] = (digest, path.lstat().st_mtime_ns)
        else:
            state[str(path.relative_to(root))] = ("", 0)
    return state


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A TINY export with its e2e model (for the web target), and three photos."""
    folder = tmp_path_factory.mktemp("commands")
    export = export_tiny(folder / "export", exporter="torchscript")
    done = run_cli_in(REPO, "package", export, "--target", "e2e")
    assert done.code == 0, done.err
    photos = folder / "photos"
    photos.mkdir()
    from PIL import Image

    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"{i}.png")
    return {"export": export, "photos": photos}


def run_cli_in(cwd: Path, *args: object, prefix: tuple[str, ...] = ()) -> CliResult:
    """``coatnet-export ARGS`` in a real process (``prefix``: e.g. prlimit), from ``cwd``."""
    argv = [*prefix, sys.executable, "-m", "coatnet_export", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    return CliResult(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def case(tmp_path: Path, assets: dict[str, Path], monkeypatch) -> dict[str, Path]:
    """This case's folder (checked whole): its own copy of the export and the photos in
    ``case/``, and ``work/``, the working directory."""
    folder = tmp_path / "case"
    shutil.copytree(assets["export"], folder / "export")
    shutil.copytree(assets["photos"], folder / "photos")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return {
        "root": tmp_path,
        "folder": folder,
        "export": folder / "export",
        "photos": folder / "photos",
    }


def check_refused(run: Callable[[], CliResult], root: Path, fragment: str, code: int = 2):
    """Run, then: ``code``, one error line with ``fragment``, no traceback, nothing changed."""
    before = snapshot(root)
    result = run()
    assert_clean_failure(result, root, set(before), fragment, code)
    assert snapshot(root) == before  # the same bytes, the same modification times
    return result


# --- outputs against inputs: no overlap, whatever --force says --------------------------------

WEB = ("--target", "web", "--ort-web-cdn", "https://cdn.example/ort.min.js")
TRITON = ("--target", "triton")
OVERLAPS = {
    "triton into the export, --force": (TRITON, "{export}", "is the input"),
    "web into the export, --force": (WEB, "{export}", "is the input"),
    "triton to the export's parent, --force": (TRITON, "{folder}", "holds the input"),
    "web to the export's parent, --force": (WEB, "{folder}", "holds the input"),
    "triton inside the export": (TRITON, "{export}/repo", "is inside the input"),
    "web inside the export": (WEB, "{export}/site", "is inside the input"),
    "triton, the current directory": (TRITON, ".", "current directory"),
}


@pytest.mark.parametrize("name", OVERLAPS)
def test_output_apart_from_the_export(name: str, case, run_cli) -> None:
    target, output, fragment = OVERLAPS[name]
    out = output.format(**{k: str(v) for k, v in case.items()})
    args = ["package", case["export"], *target, "--output", out, "--force"]
    check_refused(lambda: run_cli(*args), case["root"], fragment)


NAMES = {
    "parent": ("..", "the folder above"),
    "itself": (".", "the folder itself"),
    "a path": ("a/b", "path separator"),
    "absolute": ("/tmp/model", "an absolute path"),
    "empty": ("", "it is empty"),
}


@pytest.mark.parametrize("name", NAMES)
def test_triton_name_stays_inside(name: str, case, run_cli) -> None:
    given, fragment = NAMES[name]
    args = ["package", case["export"], *TRITON, "--output", case["root"] / "repo"]
    result = check_refused(lambda: run_cli(*args, "--name", given), case["root"], fragment)
    assert f"--name {given!r}" in result.err


SIDE_FILES = {
    "json in a missing folder": (["--json", "{root}/nope/x.json"], "--json"),
    "json is a folder": (["--json", "{photos}"], "is a directory"),
    "json inside the repository": (["--json", "{root}/repo/x.json", "--force"], "--json"),
    "json is the export's model": (["--json", "{export}/model.onnx"], "is inside the input"),
    "json is the export": (["--json", "{export}"], "is a directory"),
}


@pytest.mark.parametrize("name", SIDE_FILES)
def test_package_side_file_checked_before_publishing(name: str, case, run_cli) -> None:
    (case["root"] / "repo").mkdir()
    extra, fragment = SIDE_FILES[name]
    extra = [e.format(**{k: str(v) for k, v in case.items()}) for e in extra]
    args = ["package", case["export"], *TRITON, "--output", case["root"] / "repo", *extra]
    result = check_refused(lambda: run_cli(*args), case["root"], fragment)
    assert "--output" not in result.err.split("(")[-1]  # the fix names --json, not --output


def test_read_only_json_publishes_nothing(case, run_cli) -> None:
    from test_hostile import tmpfs

    with tmpfs(case["root"] / "ro", "1m", readonly=True) as readonly:
        args = ["package", case["export"], *TRITON, "--output", case["root"] / "repo"]
        result = check_refused(
            lambda: run_cli(*args, "--json", readonly / "x.json"), case["root"], "--json"
        )
        assert "read-only file system" in result.err


def test_predict_json_and_output_apart(case, run_cli) -> None:
    out = case["root"] / "p.parquet"
    common = ["predict", case["export"], case["photos"], "--output", out]
    check_refused(lambda: run_cli(*common, "--json", out), case["root"], "is the --output")
    check_refused(
        lambda: run_cli(*common, "--json", case["root"] / "nope" / "s.json"), case["root"], "--json"
    )
    photo = case["photos"] / "0.png"
    args = ["predict", case["export"], photo, "--output", photo, "--force"]
    check_refused(lambda: run_cli(*args), case["root"], "is the input")
    args = ["predict", case["export"], case["photos"], "--output", case["export"] / "p.parquet"]
    check_refused(lambda: run_cli(*args), case["root"], "is inside the input")


def test_predictions_may_be_written_among_the_photos(case, run_cli) -> None:
    """An image folder is scanned for images only: a Parquet file (or --json) among them is
    no overlap, and a rerun with --force replaces it."""
    out, summary = case["photos"] / "p.parquet", case["photos"] / "s.json"
    pattern = str(case["photos"] / "*.png")
    for extra in ([], ["--force"]):
        result = run_cli("predict", case["export"], pattern, "-o", out, "--json", summary, *extra)
        assert result.code == 0, result.err
    assert out.is_file() and summary.is_file()


def test_bench_and_validate_side_files(case, run_cli) -> None:
    model = case["export"] / "model.onnx"
    bench = ["bench", model, "--no-torch", "--json", model]
    check_refused(lambda: run_cli(*bench), case["root"], "is the input")
    bench = ["bench", case["export"], "--no-torch", "--json", model]
    check_refused(lambda: run_cli(*bench), case["root"], "is inside the input")
    validate = ["validate", case["export"], "--report", case["export"]]
    check_refused(lambda: run_cli(*validate), case["root"], "is a directory")
    validate = ["validate", model, "--report", model]
    check_refused(lambda: run_cli(*validate), case["root"], "is the input")


def test_checkpoint_directory_is_named_a_directory(case, run_cli) -> None:
    """A folder as --checkpoint is read as a timm model folder (issue 22): one without weights
    is refused with what it lacks."""
    args = ["validate", case["export"], "--checkpoint", case["photos"]]
    check_refused(lambda: run_cli(*args), case["root"], "holds no weights")


# --- predict's file output: created folders removed, locked against a second writer -----------


def test_predict_failure_removes_the_folders_it_made(case, run_cli) -> None:
    empty = case["root"] / "empty"
    empty.mkdir()
    out = case["root"] / "new" / "deeper" / "p.parquet"
    args = ["predict", case["export"], empty, "--output", out]
    check_refused(lambda: run_cli(*args), case["root"], "hold no image files")


def test_predict_lock_in_process(case, run_cli) -> None:
    out = case["root"] / "p.parquet"
    with lock(out):
        args = ["predict", case["export"], case["photos"], "--output", out]
        root = case["root"]
        before = snapshot(root)
        result = run_cli(*args)
        assert_clean_failure(result, root, set(before), f"(pid {os.getpid()})")
    assert not out.exists()


def test_two_predict_processes_race_for_one_output(case) -> None:
    """The second of two real processes writing one new Parquet file fails at once, naming the
    first one's pid; the first writes its file."""
    out = case["root"] / "p.parquet"
    argv = [sys.executable, "-m", "coatnet_export", "predict", str(case["export"])]
    argv += [str(case["photos"]), "--output", str(out), "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lock_file = out.with_name(f".{out.name}.lock")
    deadline = time.monotonic() + 60
    while not lock_file.exists():
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first run never locked its output"
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # holds its lock while the second starts (a busy machine
    try:  # could otherwise let it finish first)
        assert first.poll() is None, "the first run ended before the second started"
        second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    won = first.communicate(timeout=120)
    assert first.returncode == 0, won[1].decode()
    assert second.returncode == 2, second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in second.stderr
    assert f"is writing {out} (pid {first.pid})" in errors[0]
    assert sorted(p.name for p in case["root"].iterdir()) == ["case", "p.parquet", "work"]


# --- numbers the machine bounds -----------------------------------------------------------------

THREADS = {
    "validate": ["validate", "{export}", "--threads", "100000"],
    "bench": ["bench", "{export}", "--threads", "1", "--threads", "100000"],
    "predict threads": [
        "predict",
        "{export}",
        "{photos}",
        "-o",
        "p.parquet",
        "--threads-per-worker",
        "300",
    ],
    "predict workers": [
        "predict",
        "{export}",
        "{photos}",
        "-o",
        "p.parquet",
        "--workers",
        "100000",
    ],
    "quantize": ["quantize", "{export}", "--random-calibration", "--threads", "100000"],
    "export": ["--variant", "coatnet_0", "--output", "out", "--threads", "100000"],
    "package": ["package", "{export}", "--target", "e2e", "--force", "--threads", "257"],
}


@pytest.mark.parametrize("name", THREADS)
def test_threads_bounded_by_the_cores(name: str, case, run_cli) -> None:
    args = [a.format(**{k: str(v) for k, v in case.items()}) for a in THREADS[name]]
    check_refused(lambda: run_cli(*args), case["root"], "more than this machine runs usefully")


def test_workers_times_threads_bounded(case, run_cli) -> None:
    cores = len(os.sched_getaffinity(0))
    workers = min(4 * cores, 256)
    args = ["predict", case["export"], case["photos"], "-o", "p.parquet", "--workers", workers]
    result = check_refused(
        lambda: run_cli(*args, "--threads-per-worker", 2), case["root"], "--workers x"
    )
    assert "more than this machine runs usefully" in result.err


def test_threads_refused_under_a_memory_limit(case) -> None:
    """Under a real 3 GiB address-space limit, 100000 threads are refused at once (they made
    the run die of signal 11 before)."""
    root = case["root"]
    before = snapshot(root)
    prefix = ("prlimit", f"--as={AS_LIMIT}")
    result = run_cli_in(
        root / "work", "validate", case["export"], "--threads", "100000", prefix=prefix
    )
    assert_clean_failure(result, root, set(before), "more than this machine runs usefully")
    assert snapshot(root) == before


def test_bench_batch_checked_against_a_memory_limit(case) -> None:
    """A batch that fits the machine but not a real 3 GiB address-space limit is refused with
    the estimate, before any runtime allocates it."""
    root = case["root"]
    before = snapshot(root)
    args = ["bench", case["export"], "--no-torch", "--batch", "20000", "--threads", "1"]
    result = run_cli_in(root / "work", *args, prefix=("prlimit", f"--as={AS_LIMIT}"))
    assert_clean_failure(result, root, set(before), "needs at least")
    assert "use a smaller --batch" in result.err


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="needs openvino")
def test_openvino_short_of_memory_gives_no_figure(case) -> None:
    """OpenVINO, short of memory under a real limit, returns no rows without an error: the
    logits' shape check turns that into exit 2 instead of a p50 of a fraction of a ms (on
    this machine; where the estimate or an allocation fails first, that is exit 2 as well)."""
    root = case["root"]
    before = snapshot(root)
    args = ["bench", case["export"], "--no-torch", "--runtime", "openvino", "--batch", "12000"]
    args += ["--threads", "1", "--runs", "5", "--warmup", "0"]
    result = run_cli_in(root / "work", *args, prefix=("prlimit", f"--as={AS_LIMIT}"))
    assert result.code == 2, (result.out, result.err)
    assert "images_per_s" not in result.out  # no table
    errors = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.err
    guards = ("returned logits of shape", "out of memory", "needs at least")  # whichever fires
    assert any(t in errors[0] for t in guards), errors
    assert snapshot(root) == before


TRITON_NUMBERS = {
    "max batch": (["--max-batch-size", str(2**40)], "--max-batch-size 1099511627776"),
    "instances": (["--instances", str(2**40)], "--instances 1099511627776"),
    "max batch just over": (["--max-batch-size", str(2**31)], "32-bit"),
}


@pytest.mark.parametrize("name", TRITON_NUMBERS)
def test_triton_numbers_fit_its_fields(name: str, case, run_cli) -> None:
    extra, fragment = TRITON_NUMBERS[name]
    args = ["package", case["export"], *TRITON, "--output", case["root"] / "repo", *extra]
    check_refused(lambda: run_cli(*args), case["root"], fragment)


def test_triton_memory_beyond_this_machine_is_noted(case, run_cli) -> None:
    """The server may be another machine: a repository it needs more memory for is written,
    with the estimate in a note."""
    args = ["package", case["export"], *TRITON, "--output", case["root"] / "repo"]
    result = run_cli(*args, "--instances", 100000, "--max-batch-size", 100000)
    assert result.code == 0, result.err
    assert "100000 instance(s) at batch 100000 need at least" in result.out


# --- every runtime's logits checked before a figure ---------------------------------------------


@pytest.mark.parametrize(
    "runtime",
    [
        "onnxruntime",
        pytest.param(
            "openvino",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("openvino") is None, reason="needs openvino"
            ),
        ),
    ],
)
def test_logits_checked_for_rows_and_classes(runtime: str, assets) -> None:
    from coatnet_export.errors import InputError

    model_path = assets["export"] / "model.onnx"
    model = load_model(model_path, runtime)
    batch = np.random.default_rng(0).standard_normal((3, 3, 64, 64), dtype=np.float32)
    logits = model.run(batch)
    assert logits.shape == (3, 10) and model.classes == 10
    for short in (logits[:2], logits[:0], logits[:, :9], logits[0]):
        with pytest.raises(InputError, match="returned logits of shape"):
            check_logits(short, 3, model.classes, runtime, model_path)


# --- SIGTERM during package --target ort: 'aborted', nothing else ------------------------------

SIGTERM_IN_SHAPE_INFERENCE = """
import os, signal, sys
import onnx.shape_inference
real = onnx.shape_inference.infer_shapes
def infer_then_terminated(*args, **kwargs):  # the signal lands inside ModelProtoWithShapeInfo
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
onnx.shape_inference.infer_shapes = infer_then_terminated
from coatnet_export.cli import main
main(sys.argv[1:])
"""


def test_sigterm_during_ort_prints_aborted_only(case) -> None:
    root = case["root"]
    before = snapshot(root)
    argv = [sys.executable, "-c", SIGTERM_IN_SHAPE_INFERENCE, "package", str(case["export"])]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [*argv, "--target", "ort"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 143, done.stderr
    assert done.stderr == "aborted\n"  # no "Exception ignored in ... __del__" after it
    assert snapshot(root) == before


# --- --help answers without torch or onnxruntime -------------------------------------------------

HELP_PROBE = """
import sys
from coatnet_export.cli import main
try:
    main(sys.argv[1:] + ["--help"])
except SystemExit as done:
    assert done.code == 0, done.code
heavy = ("torch", "onnxruntime", "openvino", "ray", "pyarrow", "onnx", "numpy")
heavy = [m for m in heavy if m in sys.modules]
print("HEAVY", heavy)
"""


@pytest.mark.parametrize(
    "command",
    ["", "export", "quantize", "validate", "info", "variants", "bench", "predict", "package"],
)
def test_help_imports_no_heavy_library(command: str) -> None:
    """``--help`` (of the group, of each command) loads neither torch nor onnxruntime, nor
    even onnx or numpy: it answers in a fraction of a second (imports are what cost; the test
    checks them, it times nothing)."""
    argv = [sys.executable, "-c", HELP_PROBE, *([command] if command else [])]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout, done.stdout.splitlines()[-1]
    assert "Usage: coatnet-export" in done.stdout
