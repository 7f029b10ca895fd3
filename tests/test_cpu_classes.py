"""int8 on every CPU class, proven from one machine: this machine's class natively, and x86
without VNNI (AVX2 only) under qemu user mode (``qemu-x86_64 -cpu EPYC-Rome``), where onnxruntime
and OpenVINO detect and run their AVX2 kernels.

qemu >= 8 is needed (7.2's AVX2 emulation computes numpy's fmin wrongly); .ci/run installs it
from Debian's bookworm-backports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coatnet_export.quantize import presets

from conftest import export_digits, export_tiny

REPO = Path(__file__).resolve().parents[1]
AVX2_CPU = "EPYC-Rome"
"""A qemu CPU model with AVX2 and FMA but no AVX-512 and no VNNI (AMD Zen 2)."""
FAST = ("--random-calibration", "--calibration-samples", "2", "--max-fallback-steps", "0")


def qemu_x86() -> str:
    """The qemu-x86_64 binary, or a skip saying what is missing."""
    if presets.read_cpu()["arch"] != "x86_64":
        pytest.skip("the AVX2 class is emulated with qemu-x86_64 on an x86 host")
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip(
            "qemu-x86_64 is not installed (apt-get install -t bookworm-backports qemu-user)"
        )
    version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
    major = int(re.search(r"version (\d+)", version).group(1))
    if major < 8:
        pytest.skip(
            f"qemu {major} emulates AVX2 wrongly; install qemu-user >= 8 (bookworm-backports)"
        )
    return qemu


def on_avx2(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python ARGS`` on an emulated AVX2 CPU (this venv, this checkout first on the path)."""
    command = [qemu_x86(), "-cpu", AVX2_CPU, sys.executable, *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("classes") / "tiny")


def test_this_machine_and_the_emulated_one_are_seen_as_their_classes() -> None:
    here = presets.preset_for(presets.read_cpu())
    print(f"this machine: {here.name} ({presets.read_cpu()})")
    probe = (
        "import json; from coatnet_export.quantize.presets import read_cpu; "
        "print(json.dumps(read_cpu()))"
    )
    emulated = json.loads(on_avx2("-c", probe).stdout)
    assert emulated["int8"] == ["avx2"]
    assert presets.preset_for(emulated).name == "x86-avx2"


def quantize(export: Path, target: str, emulated: bool) -> dict:
    args = ["-m", "coatnet_export", "quantize", str(export), *FAST, "--target-cpu", target]
    if emulated:
        on_avx2(*args)
    else:
        subprocess.run([sys.executable, *args], check=True, capture_output=True, cwd=REPO)
    return json.loads((export / "quantization.json").read_text())


def test_gate_on_a_saturating_cpu_measures_what_the_target_computes(
    seeded: Path, tmp_path: Path
) -> None:
    """A model for x86-vnni quantized on an AVX2 CPU (whose u8 x s8 kernels saturate) passes
    or fails its gate as on a VNNI CPU: the gate measures the QDQ graph unfused, and the
    report adds what the AVX2 kernels give."""
    here, emulated = tmp_path / "here", tmp_path / "avx2"
    shutil.copytree(seeded, here)
    shutil.copytree(seeded, emulated)
    native = quantize(here, "x86-vnni", emulated=False)
    avx2 = quantize(emulated, "x86-vnni", emulated=True)
    assert avx2["judgement"]["exact"] is True
    assert "x86-avx2" in avx2["judgement"]["reason"]
    assert native["judgement"]["exact"] is (presets.preset_for(presets.read_cpu()).saturates)
    assert avx2["passed"] and avx2["gate"]["metric"] == "cosine"
    assert abs(avx2["gate"]["value"] - native["gate"]["value"]) < 1e-4
    # the AVX2 kernels saturate on this model's full-range weights: shown, not gated
    assert avx2["native_agreement"]["min_cosine"] < avx2["gate"]["value"] - 0.01


OPENVINO_BATCHES = """
import sys, numpy as np
from coatnet_export.runtimes import RunOptions, load_model
x = np.random.default_rng(0).standard_normal((24, 1, 64, 64), dtype=np.float32)
model = load_model(sys.argv[1], "openvino", RunOptions(threads=2))
by = {b: np.concatenate([model.run(x[i:i + b]) for i in range(0, 24, b)]) for b in (1, 2, 3, 8)}
print(max(float(np.abs(by[b] - by[1]).max() / np.abs(by[1]).max()) for b in by))
"""


def test_openvino_int8_does_not_depend_on_the_batch_on_avx2(tmp_path: Path) -> None:
    """OpenVINO's int8 kernels on x86 without VNNI gave batch-dependent logits with two
    threads (5 % of max |logit| at batch 2): such a CPU runs int8 on one thread, saying so."""
    pytest.importorskip("openvino")
    digits = export_digits(tmp_path)
    args = [
        "-m",
        "coatnet_export",
        "quantize",
        str(digits["export"]),
        "--calibration-data",
        str(digits["calibration"]),
        "--latency-runs",
        "1",
        "--target-cpu",
        "x86-avx2",
    ]
    subprocess.run([sys.executable, *args], check=True, capture_output=True, cwd=REPO)
    int8 = str(digits["export"] / "model.int8.onnx")
    result = on_avx2("-c", OPENVINO_BATCHES, int8)
    assert float(result.stdout) < 1e-6
    assert result.stderr.count("warning: OpenVINO runs int8 models on one thread") == 1
    here = subprocess.run(
        [sys.executable, "-c", OPENVINO_BATCHES, int8],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert float(here.stdout) < 1e-6
    one_thread = presets.preset_for(presets.read_cpu()).saturates
    assert ("warning: OpenVINO runs int8" in here.stderr) is one_thread


@pytest.mark.slow
def test_emulation_check_on_the_digits_fixture(tmp_path: Path) -> None:
    """scripts/check_cpu_classes.py on this machine and the emulated AVX2 class: the model for
    each class agrees with the gate's measurement there; models for VNNI lose accuracy on AVX2."""
    qemu_x86()
    out = tmp_path / "classes.json"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "check_cpu_classes.py"),
            "--classes",
            "host,x86-avx2",
            "--images",
            "40",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    rows = {(r["cpu"], r["model"]): r for r in json.loads(out.read_text())["rows"]}
    avx2 = rows["x86-avx2", "int8 for x86-avx2"]
    assert avx2["result"] == "pass" and avx2["max_dp_vs_gate"] < 1e-6
    vnni = rows["x86-avx2", "int8 for x86-vnni"]
    assert vnni["result"] == "not judged" and vnni["max_dp_vs_gate"] > 1e-3
    assert np.isclose(rows["x86-avx2", "fp32"]["max_dp_vs_fp32"], 0, atol=1e-5)


SATURATION_PROBE = """
import json, numpy as np, onnx, onnxruntime as ort
from onnx import TensorProto, helper
from coatnet_export.quantize.presets import read_cpu
graph = helper.make_graph(
    [helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "probe",
    [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 64])],
    [helper.make_tensor_value_info("c", TensorProto.INT32, [1, 16])],
    [onnx.numpy_helper.from_array(np.full((64, 16), 127, np.int8), "b")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
c = session.run(None, {"a": np.full((1, 64), 255, np.uint8)})[0]
print(json.dumps({"int8": read_cpu()["int8"], "c": int(c[0, 0])}))
"""


def test_hiding_avx512_gives_native_avx2_kernels(tmp_path: Path) -> None:
    """scripts/hide_avx512.c, which times the AVX2 class natively on an AVX-512 machine: under
    it the toolkit sees the x86-avx2 class and onnxruntime runs its AVX2 u8 x s8 kernel, whose
    pairwise int16 sums saturate (255 * 127 * 2 > 32767), where VNNI sums exactly."""
    if presets.read_cpu()["arch"] != "x86_64" or shutil.which("gcc") is None:
        pytest.skip("needs an x86_64 machine with gcc")
    if "cpuid_fault" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU or hypervisor has no CPUID faulting")
    library = tmp_path / "hide_avx512.so"
    source = REPO / "scripts" / "hide_avx512.c"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", library, source], check=True)
    probe = [sys.executable, "-c", SATURATION_PROBE]
    hidden_env = {**os.environ, "LD_PRELOAD": str(library)}
    hidden = json.loads(
        subprocess.run(probe, env=hidden_env, capture_output=True, text=True, check=True).stdout
    )
    native = json.loads(subprocess.run(probe, capture_output=True, text=True, check=True).stdout)
    exact = 255 * 127 * 64
    assert hidden["int8"] == ["avx2"]
    assert hidden["c"] < exact  # saturated pairs: the AVX2 kernel
    here = presets.preset_for(presets.read_cpu())
    assert (native["c"] == exact) is (not here.saturates), native
