"""Hostile inputs, full disks, signals and a second writer: one error line, nothing left behind.

Every case asserts the exit code, exactly one ``error:`` line naming the problem, no traceback,
and an unchanged directory listing. Bad files are built here from a tiny CoAtNet.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file

from coatnet_export.bench import process_tree
from coatnet_export.console import Progress
from coatnet_export.export.pipeline import ExportOptions, run_export
from coatnet_export.output import clean_stale, lock
from models import init_weights

from conftest import TINY, CliResult, all_gone, assert_clean_failure, listing

SIZE = 64
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "infer.py"
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Assets:
    """Files shared by every case (outside each case's tmp_path, which is checked)."""

    folder: Path
    checkpoint: Path
    state_dict: dict[str, torch.Tensor]
    export: Path
    image: Path


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    folder = tmp_path_factory.mktemp("assets")
    model = init_weights(TINY.build((SIZE, SIZE), num_classes=10), 1)
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = folder / "tiny.pt"
    torch.save(state_dict, checkpoint)
    export = folder / "export"
    run_export(
        ExportOptions(
            architecture=TINY,
            output=export,
            img_size=(SIZE, SIZE),
            num_classes=10,
            exporter="torchscript",
            samples=1,
        ),
        Progress(enabled=False),
    )
    image = folder / "photo.png"
    from PIL import Image

    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(image)
    return Assets(folder, checkpoint, state_dict, export, image)


def export_args(assets: Assets, out: Path, *extra: object) -> list[object]:
    return ["--checkpoint", assets.checkpoint, "--output", out, "--exporter", "torchscript", *extra]


def check(run_cli, root: Path, args: list[object], fragment: str, code: int = 2) -> CliResult:
    before = listing(root)
    result = run_cli(*args)
    assert_clean_failure(result, root, before, fragment, code)
    return result


# --- the command line and numbers -------------------------------------------------------------

COMMAND_LINE = {
    "mistyped command": (["predcit", "x"], "no such command 'predcit'"),
    "close command": (["expor"], "did you mean 'export'"),
    "one img-size value": (["--img-size", "288", "--output", "o"], "takes two values, H W"),
    "img-size zero": (["--img-size", "0", "64"], "not a positive integer"),
    "seed negative": (["--seed", "-1"], "--seed"),
    "seed too big": (["--seed", str(2**70)], "--seed"),
    "std nan": (["--std", "nan,nan,nan"], "not a finite number"),
    "mean inf": (["--mean", "inf,0,0"], "not a finite number"),
    "std zero": (["--std", "0,0,0"], "std values must be positive"),
    "std negative": (["--std", "-1,1,1"], "std values must be positive"),
    "mean count": (["--mean", "0.5,0.5"], "mean has 2 values but std has 3"),
    "samples zero, fixed batch": (["--batch", "1", "--samples", "0"], "nothing to validate"),
    "batch word": (["--batch", "zero"], "neither 'dynamic' nor a positive integer"),
    "batch huge": (["--batch", str(10**7)], "needs at least"),
    "img-size huge": (["--img-size", "100000", "100000"], "needs at least"),
    "opset too old": (["--opset", "5"], "--opset"),
    "crop zero": (["--crop-pct", "0"], "--crop-pct"),
    "unknown option": (["--bogus"], "No such option"),
    "channels vs mean": (["--in-channels", "1"], "channel(s) but the model takes 1"),
    "classes zero": (["--num-classes", "0"], "--num-classes"),
    "no variant": (["--output", "o"], "give --variant"),
    "unknown variant": (["--variant", "coatnet_9"], "valid variants"),
}


@pytest.mark.parametrize("name", COMMAND_LINE)
def test_command_line(name: str, tmp_path: Path, run_cli, assets: Assets, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args, fragment = COMMAND_LINE[name]
    if args[0].startswith("--") and "--variant" not in args and name != "no variant":
        args = ["--checkpoint", assets.checkpoint, *args]
    check(run_cli, tmp_path, args, fragment)


# --- checkpoint contents ----------------------------------------------------------------------


def _replace(state: dict, key: str, value: object) -> dict:
    return {**state, key: value}


CHECKPOINTS: dict[str, tuple[Callable[[dict], object], str]] = {
    "int weights": (lambda s: _replace(s, "fc.weight", s["fc.weight"].long()), "int64, not float"),
    "bool weights": (lambda s: _replace(s, "fc.weight", s["fc.weight"] > 0), "bool, not float"),
    "complex weights": (
        lambda s: _replace(s, "fc.weight", s["fc.weight"].to(torch.complex64)),
        "complex64, not float",
    ),
    "non-string keys": (lambda s: {**s, 7: torch.zeros(1)}, "are not strings"),
    "meta tensor": (
        lambda s: _replace(s, "fc.weight", torch.empty(10, 32, device="meta")),
        "meta tensor",
    ),
    "sparse tensor": (
        lambda s: _replace(s, "fc.weight", s["fc.weight"].to_sparse()),
        "sparse_coo tensor",
    ),
    "nan weights": (
        lambda s: _replace(s, "s1.0.proj.weight", s["s1.0.proj.weight"] * float("nan")),
        "NaN or infinite",
    ),
    "0-d stem": (lambda s: _replace(s, "s0.0.0.weight", torch.tensor(1.0)), "s0.0.0.weight"),
    "0-d head": (lambda s: _replace(s, "fc.weight", torch.tensor(1.0)), "fc.weight"),
    "0-d bias table": (
        lambda s: _replace(s, "s3.0.attn.1.fn.relative_bias_table", torch.tensor(1.0)),
        "relative_bias_table",
    ),
    "wrong shape": (
        lambda s: _replace(s, "s1.0.proj.weight", torch.zeros(5, 5, 1, 1)),
        "s1.0.proj.weight (5, 5, 1, 1) != (12, 8, 1, 1)",
    ),
    "wrong shape and missing": (
        lambda s: {
            **{k: v for k, v in s.items() if k != "s4.0.ff.1.norm.bias"},
            "s1.0.proj.weight": torch.zeros(5, 5, 1, 1),
        },
        "(5, 5, 1, 1) != (12, 8, 1, 1)",
    ),
    "missing keys": (
        lambda s: {k: v for k, v in s.items() if k != "s4.0.ff.1.norm.bias"},
        "missing 1 key(s): s4.0.ff.1.norm.bias",
    ),
    "not a mapping": (lambda s: [s["fc.weight"]], "not a state dict"),
    "not tensors": (lambda s: {**s, "fc.weight": "text"}, "are not tensors"),
}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_checkpoint_contents(name: str, tmp_path: Path, run_cli, assets: Assets) -> None:
    make, fragment = CHECKPOINTS[name]
    path = tmp_path / "bad.pt"
    torch.save(make(assets.state_dict), path)
    check(run_cli, tmp_path, ["--checkpoint", path, "--output", tmp_path / "out"], fragment)


def _truncated(assets: Assets, path: Path) -> None:
    path.write_bytes(assets.checkpoint.read_bytes()[:5000])


def _int_safetensors(assets: Assets, path: Path) -> None:
    save_file({k: v.to(torch.int32) for k, v in assets.state_dict.items()}, str(path))


def _truncated_safetensors(assets: Assets, path: Path) -> None:
    save_file(assets.state_dict, str(path))
    path.write_bytes(path.read_bytes()[:3000])


CHECKPOINT_FILES: dict[str, tuple[str, Callable[[Assets, Path], None], str]] = {
    "truncated .pt": ("bad.pt", _truncated, "not a readable PyTorch file"),
    "empty .pt": ("bad.pt", lambda a, p: p.write_bytes(b""), "not a readable PyTorch file"),
    "int safetensors": ("bad.safetensors", _int_safetensors, "int32, not float"),
    "truncated safetensors": ("bad.safetensors", _truncated_safetensors, "not a readable"),
    "garbage .lcd": ("bad.lcd", lambda a, p: p.write_bytes(b"\x80\x05junk"), "not a readable"),
    "directory": ("dir.pt", lambda a, p: p.mkdir(), "holds no weights"),
}


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_checkpoint_files(name: str, tmp_path: Path, run_cli, assets: Assets) -> None:
    file_name, make, fragment = CHECKPOINT_FILES[name]
    path = tmp_path / file_name
    make(assets, path)
    check(run_cli, tmp_path, ["--checkpoint", path, "--output", tmp_path / "out"], fragment)


# --- files the user passes --------------------------------------------------------------------


def _npz(path: Path, **arrays: np.ndarray) -> None:
    with path.open("wb") as f:
        np.savez(f, **arrays)


def _good_recording() -> dict[str, np.ndarray]:
    x = np.zeros((2, 3, SIZE, SIZE), np.float32)
    return {"x": x, "y": np.zeros((2, 10), np.float32)}


def _truncated_npz(path: Path) -> None:
    _npz(path, **_good_recording())
    path.write_bytes(path.read_bytes()[:2000])


USER_FILES: dict[str, tuple[str, str, Callable[[Path], None], str]] = {
    "labels binary": ("--labels", "l.txt", lambda p: p.write_bytes(b"\x89PNG\x00\x01"), "binary"),
    "labels latin-1": ("--labels", "l.txt", lambda p: p.write_bytes(b"caf\xe9\n" * 10), "UTF-8"),
    "labels empty": ("--labels", "l.txt", lambda p: p.write_text("\n\n"), "holds no labels"),
    "labels bad json": ("--labels", "l.json", lambda p: p.write_text("[1,"), "not valid JSON"),
    "labels json dict": ("--labels", "l.json", lambda p: p.write_text('{"a": 1}'), "JSON list"),
    "labels missing": ("--labels", "l.txt", lambda p: None, "no such file"),
    "labels count": ("--labels", "l.txt", lambda p: p.write_text("a\nb\n"), "2 labels"),
    "recorded .npy": (
        "--reference-outputs",
        "r.npy",
        lambda p: np.save(p, np.zeros(3)),
        "not an .npz",
    ),
    "recorded truncated": ("--reference-outputs", "r.npz", _truncated_npz, "not an .npz"),
    "recorded no y": (
        "--reference-outputs",
        "r.npz",
        lambda p: _npz(p, x=_good_recording()["x"]),
        "no array 'y'",
    ),
    "recorded shapes": (
        "--reference-outputs",
        "r.npz",
        lambda p: _npz(p, x=np.zeros((2, 3, 32, 32), np.float32), y=np.zeros((2, 10))),
        "do not fit",
    ),
    "recorded nan": (
        "--reference-outputs",
        "r.npz",
        lambda p: _npz(p, x=_good_recording()["x"] * np.nan, y=_good_recording()["y"]),
        "NaN",
    ),
    "recorded strings": (
        "--reference-outputs",
        "r.npz",
        lambda p: _npz(p, x=np.array(["a"]), y=_good_recording()["y"]),
        "not real numbers",
    ),
    "recorded missing": ("--reference-outputs", "r.npz", lambda p: None, "does not exist"),
    "images none readable": (
        "--images",
        "img",
        lambda p: (p.mkdir(), (p / "a.jpg").write_bytes(b"no")),
        "no readable image",
    ),
}


@pytest.mark.parametrize("name", USER_FILES)
def test_user_files(name: str, tmp_path: Path, run_cli, assets: Assets) -> None:
    option, file_name, make, fragment = USER_FILES[name]
    path = tmp_path / file_name
    make(path)
    args = export_args(assets, tmp_path / "out", option, path)
    check(run_cli, tmp_path, args, fragment)


# --- output paths -----------------------------------------------------------------------------


def _loop(root: Path) -> Path:
    (root / "loop").symlink_to(root / "loop")
    return root / "loop"


OUTPUTS: dict[str, tuple[Callable[[Path], list[object]], str]] = {
    "exists": (lambda r: ((r / "out").mkdir(), ["--output", r / "out"])[1], "already exists"),
    "symlink loop": (lambda r: ["--output", _loop(r)], "symbolic links"),
    "loop in parent": (lambda r: ["--output", _loop(r) / "out"], "symbolic links"),
    "dangling symlink": (
        lambda r: ((r / "out").symlink_to(r / "gone"), ["--output", r / "out"])[1],
        "no such file",
    ),
    "symlink to a dir": (
        lambda r: ((r / "d").mkdir(), (r / "out").symlink_to(r / "d"), ["--output", r / "out"])[2],
        "is a symbolic link",
    ),
    "dot with force": (lambda r: ["--output", ".", "--force"], "current directory"),
    "parent of cwd": (lambda r: ["--output", "..", "--force"], "current directory"),
    "parent is a file": (
        lambda r: ((r / "f").write_text("x"), ["--output", r / "f" / "out"])[1],
        "not writable",
    ),
    "file with force": (
        lambda r: ((r / "out").write_text("x"), ["--output", r / "out", "--force"])[1],
        "is a file",
    ),
    "report missing dir": (
        lambda r: ["--output", r / "out", "--report", r / "nope" / "r.json"],
        "does not exist",
    ),
    "report is a dir": (
        lambda r: ((r / "rep").mkdir(), ["--output", r / "out", "--report", r / "rep"])[1],
        "is a directory",
    ),
    "report loop": (lambda r: ["--output", r / "out", "--report", _loop(r)], "symbolic links"),
}


@pytest.mark.parametrize("name", OUTPUTS)
def test_output_paths(name: str, tmp_path: Path, run_cli, assets: Assets, monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    make, fragment = OUTPUTS[name]
    args = make(work)
    check(run_cli, tmp_path, ["--checkpoint", assets.checkpoint, *args], fragment)


def test_output_holding_the_checkpoint(tmp_path: Path, run_cli, assets: Assets) -> None:
    (tmp_path / "out").mkdir()
    shutil.copy(assets.checkpoint, tmp_path / "out" / "tiny.pt")
    args = ["--checkpoint", tmp_path / "out" / "tiny.pt", "--output", tmp_path / "out", "--force"]
    check(run_cli, tmp_path, args, "holds the input")


# --- models given to validate, info, bench ----------------------------------------------------


def _with_external_data(model: Path, location: str = "model.onnx.data") -> None:
    proto = onnx.load(str(model))
    onnx.save_model(proto, str(model), save_as_external_data=True, location="model.onnx.data")
    if location != "model.onnx.data":  # point the weights elsewhere (where onnx would not save)
        proto = onnx.load(str(model), load_external_data=False)
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save(proto, str(model))


def _props(model: Path, change: Callable[[dict], None]) -> None:
    proto = onnx.load(str(model))
    props = {p.key: p.value for p in proto.metadata_props}
    change(props)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(model))


def _two_inputs(model: Path) -> None:
    proto = onnx.load(str(model))
    extra = onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [1])
    proto.graph.input.append(extra)
    onnx.save(proto, str(model))


MODELS: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing data": (
        lambda m: (_with_external_data(m), (m.parent / "model.onnx.data").unlink()),
        "which is missing",
    ),
    "truncated data": (
        lambda m: (_with_external_data(m), os.truncate(m.parent / "model.onnx.data", 1000)),
        "is truncated",
    ),
    "data outside": (lambda m: _with_external_data(m, "../model.onnx.data"), "outside the model"),
    "two inputs": (_two_inputs, "has 2 inputs"),
    "metadata not json": (lambda m: _props(m, lambda p: p.update(mean="[0.5,")), "not valid JSON"),
    "metadata lacks field": (lambda m: _props(m, lambda p: p.pop("img_size")), "img_size"),
    "metadata bad value": (
        lambda m: _props(m, lambda p: p.update(std="[0, 1, 1]")),
        "std must be positive",
    ),
    "truncated model": (lambda m: m.write_bytes(m.read_bytes()[:5000]), "not a readable ONNX"),
    "empty model": (lambda m: m.write_bytes(b""), "empty or not an ONNX model"),
}
MODEL_COMMANDS = {
    "validate": ["validate", "{m}", "--samples", "1"],
    "info": ["info", "{m}"],
    "bench": ["bench", "{m}", "--no-torch", "--runs", "5", "--warmup", "0", "--batch", "1"],
    "quantize": ["quantize", "{m}", "--random-calibration", "--calibration-samples", "2"],
}


@pytest.mark.parametrize("command", MODEL_COMMANDS)
@pytest.mark.parametrize("name", MODELS)
def test_bad_models(name: str, command: str, tmp_path: Path, run_cli, assets: Assets) -> None:
    folder = tmp_path / "export"
    shutil.copytree(assets.export, folder)
    make, fragment = MODELS[name]
    make(folder / "model.onnx")
    args = [str(a).replace("{m}", str(folder)) for a in MODEL_COMMANDS[command]]
    check(run_cli, tmp_path, args, fragment)


def test_validate_nothing_to_validate(tmp_path: Path, run_cli, assets: Assets) -> None:
    folder = tmp_path / "export"
    shutil.copytree(assets.export, folder)
    _props(folder / "model.onnx", lambda p: p.update(batch="1"))
    check(run_cli, tmp_path, ["validate", folder, "--samples", "0"], "nothing to validate")


@pytest.mark.parametrize("where", ["missing dir", "is a dir"])
def test_validate_report_checked_first(where: str, tmp_path: Path, run_cli, assets: Assets) -> None:
    (tmp_path / "rep").mkdir()
    report = tmp_path / "nope" / "r.json" if where == "missing dir" else tmp_path / "rep"
    args = ["validate", assets.export, "--samples", "1", "--report", report]
    check(run_cli, tmp_path, args, "does not exist" if where == "missing dir" else "directory")


# --- scripts/infer.py ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def infer():
    spec = importlib.util.spec_from_file_location("infer_hostile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["infer_hostile"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


INFER: dict[str, tuple[list[str], Callable[[Path], None] | None, str]] = {
    "threads negative": (["--threads", "-1"], None, "--threads must be at least 1"),
    "size zero": (["--size", "0", "0"], None, "size must be two positive integers"),
    "mean for one channel": (["--mean", "0.5", "--std", "0.5"], None, "takes 3 channel(s)"),
    "std nan": (["--std", "nan", "nan", "nan"], None, "finite numbers"),
    "size mismatch": (["--size", "32", "32"], None, "does not fit the model's input"),
    "metadata not json": ([], lambda m: _props(m, lambda p: p.update(mean="[0.5,")), "not valid"),
    "two inputs": ([], _two_inputs, "exactly one"),
    "missing data": (
        [],
        lambda m: (_with_external_data(m), (m.parent / "model.onnx.data").unlink()),
        "cannot load",
    ),
}


@pytest.mark.parametrize("name", INFER)
def test_infer_script(name: str, tmp_path: Path, assets: Assets, infer, capsys) -> None:
    extra, damage, fragment = INFER[name]
    folder = tmp_path / "export"
    shutil.copytree(assets.export, folder)
    if damage is not None:
        damage(folder / "model.onnx")
    before = listing(tmp_path)
    capsys.readouterr()
    try:
        code = infer.main([str(folder), str(assets.image), *extra])
    except SystemExit as exit_info:  # argparse's own errors: "infer.py: error: ..."
        code = exit_info.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, err
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err
    assert listing(tmp_path) == before


# --- the error boundary itself ----------------------------------------------------------------


def _raise(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc

    return fail


def _wrapped(inner: BaseException, outer: Exception) -> Exception:
    try:
        try:
            raise inner
        except BaseException as caught:
            raise outer from caught
    except Exception as exc:
        return exc


BOUNDARY = {
    "internal bug": (RuntimeError("boom"), 3, "internal error: RuntimeError: boom", "internal"),
    "disk full": (OSError(28, "No space left on device"), 2, "no space left on device", "error:"),
    "wrapped interrupt": (
        _wrapped(KeyboardInterrupt(), RuntimeError("TorchExportError")),
        130,
        "aborted",
        "aborted",
    ),
    "wrapped os error": (
        _wrapped(OSError(30, "Read-only file system", "x"), RuntimeError("wrapper")),
        2,
        "read-only file system",
        "error:",
    ),
    "memory": (MemoryError(), 2, "out of memory", "error:"),
    "torch allocation": (
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"),
        2,
        "out of memory",
        "error:",
    ),
    "decode": (
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        2,
        "UTF-8",
        "error:",
    ),
}


@pytest.mark.parametrize("name", BOUNDARY)
def test_error_boundary(name: str, tmp_path: Path, run_cli, monkeypatch) -> None:
    exc, code, fragment, prefix = BOUNDARY[name]
    monkeypatch.setattr("coatnet_export.describe.describe", _raise(exc))
    before = listing(tmp_path)
    result = run_cli("info", tmp_path)
    assert_clean_failure(result, tmp_path, before, fragment, code, prefix)


def test_internal_error_traceback_on_request(tmp_path: Path, run_cli, monkeypatch) -> None:
    monkeypatch.setattr("coatnet_export.describe.describe", _raise(RuntimeError("boom")))
    monkeypatch.setenv("COATNET_EXPORT_DEBUG", "1")
    result = run_cli("info", tmp_path)
    assert result.code == 3 and "Traceback" in result.err


# --- full disks (a real small tmpfs) ----------------------------------------------------------


@contextlib.contextmanager
def tmpfs(where: Path, size: str, readonly: bool = False) -> Iterator[Path]:
    """A real small file system at ``where``; skips the test where mounting is not allowed."""
    where.mkdir(exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)
        where.rmdir()


def fill(folder: Path) -> None:
    """Leave no free space in ``folder``'s file system."""
    with contextlib.suppress(OSError), (folder / "filler").open("wb") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_disk_full_during_export(tmp_path: Path, run_cli, assets: Assets, exporter: str) -> None:
    with tmpfs(tmp_path / "small", "96k") as small:
        args = ["--checkpoint", assets.checkpoint, "--output", small / "out", "--samples", "1"]
        result = check(
            run_cli, tmp_path, [*args, "--exporter", exporter], "no space left on device"
        )
        assert "free space, or choose another --output" in result.err


def test_disk_full_writing_the_report(tmp_path: Path, run_cli, assets: Assets) -> None:
    with tmpfs(tmp_path / "small", "64k") as small:
        fill(small)
        args = export_args(assets, tmp_path / "out", "--samples", "1", "--report", small / "r.json")
        result = check(run_cli, tmp_path, args, "no space left on device while writing")
        assert "choose another --report" in result.err  # and the model was not published


def test_disk_full_during_quantize(tmp_path: Path, run_cli, assets: Assets) -> None:
    with tmpfs(tmp_path / "small", "400k") as small:
        shutil.copytree(assets.export, small / "export")
        args = ["quantize", small / "export", "--random-calibration", "--calibration-samples", "2"]
        check(run_cli, tmp_path, args, "no space left on device")


def test_read_only_output(tmp_path: Path, run_cli, assets: Assets) -> None:
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as readonly:
        args = export_args(assets, readonly / "out")
        check(run_cli, tmp_path, args, "read-only file system")
        args = export_args(assets, tmp_path / "out", "--report", readonly / "r.json")
        check(run_cli, tmp_path, args, "read-only file system")


# --- signals, SIGKILL and a second writer (real processes) -------------------------------------


def start_export(assets: Assets, out: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "coatnet_export", "--checkpoint", str(assets.checkpoint)]
    return subprocess.Popen(
        [*argv, "--output", str(out), "--samples", "1", *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for(process: subprocess.Popen, text: str, timeout: float = 120) -> str:
    """Read the process's stderr until ``text`` appears (progress lines end without newline)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        assert process.poll() is None, seen.decode()
        assert time.monotonic() < deadline, f"no {text!r} in time: {seen.decode()}"
        ready, _, _ = select.select([process.stderr], [], [], 0.5)
        if ready:
            seen += os.read(process.stderr.fileno(), 65536)
    return seen.decode()


def finish(process: subprocess.Popen, seen: str = "") -> CliResult:
    out, err = process.communicate(timeout=120)
    return CliResult(process.returncode, out.decode(), seen + err.decode())


def staging_left(root: Path) -> list[str]:
    return [p for p in listing(root) if ".partial-" in p or ".old-" in p or p.endswith(".lock")]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_dynamo_export(tmp_path: Path, assets: Assets, signum: int, code: int):
    process = start_export(assets, tmp_path / "out")
    seen = wait_for(process, "exporting with the dynamo exporter")
    time.sleep(1.0)  # inside dynamo's tracing
    workers = process_tree(process.pid)[1:]
    assert workers  # the PyTorch half's process (and multiprocessing's resource tracker)
    process.send_signal(signum)
    result = finish(process, seen)
    assert result.code == code, result.err
    assert result.err.rstrip().endswith("aborted") and "Traceback" not in result.err
    assert listing(tmp_path) == set(), listing(tmp_path)
    assert all_gone(workers)  # stopped with the command


def test_sigkill_then_rerun_cleans_stale_staging(tmp_path: Path, assets: Assets, run_cli) -> None:
    process = start_export(assets, tmp_path / "out")
    wait_for(process, "exporting with the dynamo exporter")
    workers = process_tree(process.pid)[1:]
    process.kill()
    process.wait()
    assert all_gone(workers)  # the kernel killed the PyTorch half too
    left = staging_left(tmp_path)
    assert any(".out.partial-" in p for p in left) and ".out.lock" in left, left
    result = run_cli(*export_args(assets, tmp_path / "out", "--samples", "1"))
    assert result.code == 0, result.err
    assert staging_left(tmp_path) == []


def test_stale_staging_is_removed_and_a_half_publish_restored(tmp_path: Path) -> None:
    final = tmp_path / "out"
    (tmp_path / ".out.partial-abc").mkdir()
    (tmp_path / ".out.partial-abc" / "model.onnx").write_text("half")
    (tmp_path / ".out.old-abc").mkdir()
    (tmp_path / ".out.old-abc" / "model.onnx").write_text("the previous export")
    (tmp_path / ".other.partial-x").mkdir()  # another output's staging: not ours to remove
    with lock(final):
        clean_stale(final)
    assert (final / "model.onnx").read_text() == "the previous export"
    assert listing(tmp_path) == {"out", "out/model.onnx", ".other.partial-x"}


def test_second_writer_fails_fast_on_the_lock(tmp_path: Path, assets: Assets) -> None:
    first = start_export(assets, tmp_path / "out")
    seen = wait_for(first, "building")
    second = start_export(assets, tmp_path / "out", "--exporter", "torchscript")
    lost = finish(second)
    won = finish(first, seen)
    assert won.code == 0, won.err
    assert lost.code == 2 and "Traceback" not in lost.err
    errors = [line for line in lost.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"is writing {tmp_path / 'out'} (pid {first.pid})" in errors[0]
    assert staging_left(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.json",
        "model.onnx",
        "validation.json",
    ]


def test_lock_in_process(tmp_path: Path, run_cli, assets: Assets) -> None:
    """A held lock refuses a second export at once, before any work."""
    with lock(tmp_path / "out"):
        before = listing(tmp_path)
        result = run_cli(*export_args(assets, tmp_path / "out"))
        assert_clean_failure(result, tmp_path, before, f"(pid {os.getpid()})")
    assert listing(tmp_path) == set()
