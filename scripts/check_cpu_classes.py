"""Prove int8 on every CPU class from one machine: the torch-free scripts/infer.py runs the
digits fixture, fp32 and int8 for each --target-cpu preset, on CPUs emulated by qemu user mode.

  x86-avx2        qemu-x86_64 -cpu EPYC-Rome: AVX2, no AVX-512, no VNNI (this venv's Python)
  arm64           qemu-aarch64 -cpu cortex-a72: no dot product (the arm64 Debian root of
                  scripts/check_arm64.sh, with the same onnxruntime, numpy and Pillow)
  arm64-dotprod   qemu-aarch64 -cpu cortex-a76: the dot product (SDOT)
  host            this machine, natively

For each class and model the table gives the class the emulated infer.py detects, top-1
accuracy on the held-out digits, top-1 agreement with fp32 on this machine, the largest
probability difference against fp32, and against the gate's measurement (what
``coatnet-export quantize`` measured for that model here: quantize/presets.judge). A model
quantized for the class it runs on must agree with the gate's measurement (top-1 on every
image, |dp| <= --max-dp); a model for another class is shown, not judged (that is what
infer.py's warning is for). Exit 0: every judged row passed; 1: a failure; 2: bad usage.
Emulated run times are not performance figures; none is reported. ``--export DIR`` checks
another fp32 export the same way (e.g. a timm model: ``coatnet-export --checkpoint HUB_FOLDER``),
calibrated and tested on the same digits, with no accuracy column.

Needs qemu-user >= 8 (Debian bookworm-backports: ``apt-get install -t bookworm-backports
qemu-user qemu-user-static``; qemu 7.2's AVX2 emulation computes numpy's fmin wrongly) and,
for the arm64 classes, root and the network once (scripts/check_arm64.sh --build-only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from coatnet_export.console import Progress, render_table  # noqa: E402
from coatnet_export.export.pipeline import run_export  # noqa: E402
from coatnet_export.preprocess import load_images  # noqa: E402
from coatnet_export.quantize import (  # noqa: E402
    PRESETS,
    QuantOptions,
    choose_types,
    judge,
    preset_for,
    read_cpu,
    run_quantize,
    saturates_on,
)
from coatnet_export.runtimes import RunOptions, load_model  # noqa: E402

from train_fixture import export_options, split, write_images  # noqa: E402


@dataclass(frozen=True)
class Emulation:
    """How to run a command on one CPU class."""

    name: str
    qemu: str | None
    """The qemu binary (None: natively)."""
    cpu: str | None
    arm64: bool = False
    """Runs in the arm64 Debian root (chroot)."""


CLASSES = {
    "host": Emulation("host", None, None),
    "x86-avx2": Emulation("x86-avx2", "qemu-x86_64", "EPYC-Rome"),
    "arm64": Emulation("arm64", "qemu-aarch64-static", "cortex-a72", arm64=True),
    "arm64-dotprod": Emulation("arm64-dotprod", "qemu-aarch64-static", "cortex-a76", arm64=True),
}


@dataclass
class Row:
    cpu: str
    detected: str
    model: str
    images: int
    top1_accuracy: float | None
    """Against the digits' labels; None for another model (--export)."""
    top1_vs_fp32: float
    max_dp_vs_fp32: float
    top1_vs_gate: float
    max_dp_vs_gate: float
    judged: bool
    result: str


def make_fixture(work: Path, images: int, say, export: Path | None = None) -> dict[str, Path]:
    """The digits export (or a copy of ``export``), one int8 copy per preset (64 calibration
    digits), ``images`` held-out digits; returns model name -> path."""
    train, test = split()
    write_images(work / "calibration", train[:64])
    write_images(work / "test", test[:images])
    if export is None:
        say("exporting the digits fixture")
        run_export(export_options(work / "export"), Progress(enabled=False))
    else:
        say(f"copying {export}")
        shutil.copytree(export, work / "export", ignore=shutil.ignore_patterns("*int8*", "ort"))
    models = {"fp32": work / "export" / "model.onnx"}
    for target in PRESETS:
        folder = work / f"int8-{target}"
        shutil.copytree(work / "export", folder)
        say(f"quantizing for {target}")
        quantized = QuantOptions(
            model=folder,
            calibration_data=work / "calibration",
            eval_data=work / "test",
            target_cpu=target,
            latency_runs=1,
        )
        models[f"int8 for {target}"] = run_quantize(quantized, Progress(enabled=False)).model
    return models


def gate_measurement(path: Path, images: list[Path], quantized: bool) -> np.ndarray:
    """Probabilities as the quantize gate measured them on this machine: its own kernels, or
    the QDQ graph unfused where this machine saturates and the target does not."""
    from coatnet_export.describe import load_proto, metadata_of

    metadata = metadata_of(load_proto(path), path)
    if metadata is None:
        raise SystemExit(f"{path} has no coatnet-export metadata")
    unfused = False
    if quantized and metadata.quantization:
        q = metadata.quantization
        choice = choose_types(
            q["target_cpu"], q["activation_type"], q["weight_type"], q["reduce_range"]
        )
        unfused = judge(choice).exact
    model = load_model(path, "onnxruntime", RunOptions(threads=1, unfused=unfused))
    loaded = load_images(images, metadata.preprocessing())
    arrays = [array for _, array, _ in loaded if array is not None]
    logits = np.concatenate(
        [model.run(np.stack(arrays[i : i + 8])) for i in range(0, len(arrays), 8)]
    )
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class Runner:
    """Runs infer.py (and a CPU probe) on one class, staging files where it can see them."""

    def __init__(self, emulation: Emulation, work: Path, arm64_root: Path | None) -> None:
        self.emulation = emulation
        self.work = work
        self.root = arm64_root if emulation.arm64 else None

    def command(self, args: list[str]) -> list[str]:
        e = self.emulation
        if e.qemu is None or e.cpu is None:
            return [sys.executable, *args]
        if self.root is None:
            return [e.qemu, "-cpu", e.cpu, sys.executable, *args]
        return [
            shutil.which("chroot") or "/usr/sbin/chroot",
            str(self.root),
            f"/usr/bin/{e.qemu}",
            "-cpu",
            e.cpu,
            "/usr/bin/python3",
            *args,
        ]

    def path(self, path: Path) -> str:
        """``path`` as the command sees it (inside the arm64 root, under /tmp)."""
        if self.root is None:
            return str(path)
        return "/" + str(path.relative_to(self.root))

    def run(self, args: list[str]) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": ""}
        if self.root is not None:
            env = {
                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                "PYTHONPATH": "/opt/site",
                "LANG": "C.UTF-8",
            }
        return subprocess.run(self.command(args), capture_output=True, text=True, env=env)

    def detected(self) -> str:
        script = self.path(self.work / "probe.py")
        result = self.run([script])
        if result.returncode:
            raise SystemExit(f"error: {self.emulation.name}: the CPU probe failed: {result.stderr}")
        cpu = json.loads(result.stdout)
        return f"{cpu['class']} ({' '.join(cpu['int8']) or 'no int8 features'})"

    def infer(self, model: Path, images: Path) -> dict[str, np.ndarray]:
        args = [
            self.path(self.work / "infer.py"),
            self.path(model),
            self.path(images),
            "--json",
            "--top-k",
            "1000",
            "--threads",
            "1",
        ]
        result = self.run(args)
        if result.returncode:
            raise SystemExit(f"error: {self.emulation.name}: infer.py failed: {result.stderr}")
        out = {}
        for line in result.stdout.splitlines():
            row = json.loads(line)
            probs = sorted(row["top_k"], key=lambda e: e["index"])
            out[Path(row["image"]).name] = np.array([e["probability"] for e in probs])
        return out


PROBE = """import json, sys
sys.path.insert(0, sys.argv[0].rsplit("/", 1)[0])
from infer import read_cpu
cpu = read_cpu()
x86, vnni = cpu["arch"] == "x86_64", {"avx512_vnni", "avx_vnni"} & set(cpu["int8"])
name = ("x86-amx" if "amx_int8" in cpu["int8"] else "x86-vnni" if vnni else "x86-avx2") if x86 \
    else ("arm64-dotprod" if "asimddp" in cpu["int8"] else "arm64")
print(json.dumps({**cpu, "class": name}))
"""


def stage(work: Path, root: Path | None) -> Path:
    """The folder the runs read: ``work`` itself, or a copy inside the arm64 root."""
    if root is None:
        return work
    staged = Path(tempfile.mkdtemp(dir=root / "tmp", prefix="cpu-classes."))
    shutil.copytree(work, staged, dirs_exist_ok=True)
    return staged


def computes_as_target(cpu: str, model: Path) -> bool:
    """Whether the class ``cpu`` computes ``model`` (int8) as its target CPU does: neither
    saturates, or both do."""
    from coatnet_export.describe import load_proto, metadata_of

    metadata = metadata_of(load_proto(model), model)
    q = metadata.quantization if metadata is not None else None
    if q is None:
        raise SystemExit(f"{model} is not an int8 model of coatnet-export")
    choice = choose_types(
        q["target_cpu"], q["activation_type"], q["weight_type"], q["reduce_range"]
    )
    return saturates_on(cpu, choice) == choice.saturates


def compare(
    cpu: str,
    detected: str,
    name: str,
    probs: dict,
    fp32: dict,
    gate: dict,
    labels: dict | None,
    judged: bool,
    limits: tuple[float, float],
) -> Row:
    """One table row: ``probs`` against fp32 and the gate's measurement (both on this machine);
    a judged row passes with top-1 agreement >= limits[0] and |dp| <= limits[1] against the
    gate's measurement."""
    names = sorted(fp32)
    p, f, g = (np.stack([d[n] for n in names]) for d in (probs, fp32, gate))
    agree_gate, dp_gate = float((p.argmax(1) == g.argmax(1)).mean()), float(np.abs(p - g).max())
    passed = agree_gate >= limits[0] and dp_gate <= limits[1]
    return Row(
        cpu,
        detected,
        name,
        len(names),
        float(np.mean([p[i].argmax() == labels[n] for i, n in enumerate(names)]))
        if labels is not None
        else None,
        float((p.argmax(1) == f.argmax(1)).mean()),
        float(np.abs(p - f).max()),
        agree_gate,
        dp_gate,
        judged,
        ("pass" if passed else "FAIL") if judged else "not judged",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--classes",
        default="host,x86-avx2,arm64,arm64-dotprod",
        help="comma-separated: " + ", ".join(CLASSES),
    )
    parser.add_argument("--images", type=int, default=120, help="held-out digits")
    parser.add_argument(
        "--min-top1",
        type=float,
        default=0.99,
        help="smallest top-1 agreement with the gate's measurement",
    )
    parser.add_argument(
        "--max-dp",
        type=float,
        default=0.05,
        help="largest probability difference from the gate's measurement",
    )
    parser.add_argument(
        "--arm64-cache",
        type=Path,
        default=Path(os.environ.get("COATNET_ARM64_CACHE", "/var/cache/coatnet-arm64")),
    )
    parser.add_argument(
        "--export",
        type=Path,
        help="check this fp32 export (e.g. a timm model) instead of the digits fixture; the "
        "digits are still its calibration and test images, so no accuracy is shown",
    )
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    if args.export is not None and not (args.export / "model.onnx").is_file():
        parser.error(f"{args.export} holds no model.onnx (pass a folder coatnet-export wrote)")
    args.classes = args.classes.split(",")
    unknown = [c for c in args.classes if c not in CLASSES]
    if unknown or not 1 <= args.images <= 360:
        parser.error(f"unknown class {unknown} or --images outside 1..360")
    return args


def arm64_root(cache: Path) -> Path:
    """The arm64 Debian root of check_arm64.sh, built on first use."""
    build = subprocess.run(
        ["bash", str(REPO / "scripts" / "check_arm64.sh"), "--build-only", "--cache", str(cache)],
        capture_output=True,
        text=True,
    )
    if build.returncode:
        raise SystemExit(f"error: the arm64 root could not be built: {build.stderr.strip()}")
    return cache / "root"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say = lambda text: print(f"[cpu-classes] {text}", file=sys.stderr, flush=True)  # noqa: E731
    host = preset_for(read_cpu()).name
    with tempfile.TemporaryDirectory(prefix="cpu-classes.") as tmp:
        work = Path(tmp)
        models = make_fixture(work, args.images, say, args.export)
        shutil.copy(REPO / "scripts" / "infer.py", work / "infer.py")
        (work / "probe.py").write_text(PROBE)
        images = sorted((work / "test").rglob("*.png"))
        labels = {p.name: int(p.parent.name) for p in images} if args.export is None else None
        say(f"the gate's measurements on this machine ({host})")
        gates = {
            name: dict(
                zip(
                    [p.name for p in images],
                    gate_measurement(path, images, name != "fp32"),
                    strict=True,
                )
            )
            for name, path in models.items()
        }
        root = arm64_root(args.arm64_cache) if any(CLASSES[c].arm64 for c in args.classes) else None
        rows: list[Row] = []
        for cpu in args.classes:
            emulation = CLASSES[cpu]
            staged = stage(work, root if emulation.arm64 else None)
            try:
                runner = Runner(emulation, staged, root)
                detected = runner.detected()
                say(f"{cpu}: infer.py sees {detected}")
                for name, path in models.items():
                    probs = runner.infer(staged / path.relative_to(work), staged / "test")
                    judged = name == "fp32" or computes_as_target(detected.split()[0], path)
                    rows.append(
                        compare(
                            cpu,
                            detected,
                            name,
                            probs,
                            gates["fp32"],
                            gates[name],
                            labels,
                            judged,
                            (args.min_top1, args.max_dp),
                        )
                    )
            finally:
                if staged != work:
                    shutil.rmtree(staged, ignore_errors=True)
    table = [asdict(r) for r in rows]
    columns = [c for c in table[0] if c != "judged"]
    print(render_table(table, columns))
    if args.json:
        args.json.write_text(json.dumps({"host": read_cpu(), "rows": table}, indent=2))
    return 1 if any(r.result == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
