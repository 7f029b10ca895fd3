"""Shared fixtures: a tiny architecture, seeded models, and running the CLI in-process."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from coatnet_export.cli import main
from models import VariantSpec

TINY = VariantSpec("tiny", (1, 1, 2, 2, 1), (8, 12, 16, 24, 32), num_heads=2)
"""A CoAtNet small enough to export in a second, with every block type and a downsampling T."""

TINY_LABELS = [f"class-{i}" for i in range(10)]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # train_fixture, infer


def pytest_report_header() -> str:
    """The CPU class the suite runs on: tests whose truth depends on it say so."""
    from coatnet_export.quantize.presets import preset_for, read_cpu

    cpu = read_cpu()
    return f"cpu class: {preset_for(cpu).name} ({cpu['model']}; {' '.join(cpu['int8'])})"


def export_digits(root: Path) -> dict[str, Path]:
    """The trained digits fixture exported to ``root/export``, with 64 training images in
    ``root/calibration`` and the held-out ones in ``root/test``."""
    from coatnet_export.console import Progress
    from coatnet_export.export.pipeline import run_export

    from train_fixture import export_options, split, write_images

    train, test = split()
    write_images(root / "calibration", train[:64])
    write_images(root / "test", test)
    run_export(export_options(root / "export"), Progress(enabled=False))
    return {
        "root": root,
        "export": root / "export",
        "calibration": root / "calibration",
        "test": root / "test",
    }


def export_tiny(folder: Path, **overrides) -> Path:
    """Export TINY at 64 x 64 with 10 labelled classes to ``folder`` (ExportOptions overrides)."""
    from coatnet_export.console import Progress
    from coatnet_export.export.pipeline import ExportOptions, run_export

    options = {
        "architecture": TINY,
        "output": folder,
        "img_size": (64, 64),
        "num_classes": 10,
        "labels": TINY_LABELS,
        "samples": 1,
        **overrides,
    }
    run_export(ExportOptions(**options), Progress(enabled=False))
    return folder


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def all_gone(pids: list[int], within_s: float = 10) -> bool:
    """Every process in ``pids`` has ended, or does within ``within_s`` (a busy machine)."""
    deadline = time.monotonic() + within_s
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(alive(pid) for pid in pids)


def listing(root: Path) -> set[str]:
    """Every path under ``root``, relative to it (hidden ones included)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_clean_failure(
    result, root: Path, before: set[str], pattern: str, code: int = 2, prefix: str = "error:"
) -> None:
    """Exit ``code``, exactly one error line holding ``pattern``, no traceback, and nothing
    added or removed under ``root``."""
    assert result.code == code, (result.code, result.err)
    lines = [line for line in result.err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err + result.out
    assert pattern in lines[0], lines[0]
    assert listing(root) == before  # nothing half-written


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys):
    """Run ``coatnet-export ARGS`` in this process; returns exit code, stdout, stderr."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(exit_info.value.code, captured.out, captured.err)

    return run
