"""Where a quantization writes: a hidden work folder inside the export folder, and the outputs
(model.int8.onnx, quantization.json, the updated manifest.json) moved from it into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import onnx

from coatnet_export.errors import InputError, os_error_message, signals_deferred
from coatnet_export.export import external_data
from coatnet_export.layout import INT8_FILE, MANIFEST_FILE, QUANTIZATION_FILE, data_file, data_name
from coatnet_export.metadata import write_json, write_props
from coatnet_export.output import lock
from coatnet_export.quantize.fallback import Attempt, save_model
from coatnet_export.quantize.report import QuantReport, metadata_quantization
from coatnet_export.quantize.source import Source, tensor_bytes

WORK_PREFIX = ".quantize-"
OUTPUTS = [data_name(INT8_FILE), INT8_FILE, QUANTIZATION_FILE, MANIFEST_FILE]
"""What a quantization writes in the export folder, in the order it is moved into place."""


@contextmanager
def workspace(folder: Path) -> Iterator[Path]:
    """A hidden work folder inside ``folder``, under the lock on its int8 model; work folders
    that a killed run left behind are removed first. Removed on exit, whatever happens."""
    with ExitStack() as stack:
        try:
            stack.enter_context(lock(folder / INT8_FILE, option="model folder"))
            for stale in folder.glob(f"{WORK_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
            work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=folder))
        except OSError as exc:
            raise InputError(f"{folder} is not writable ({os_error_message(exc)})") from None
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        yield work


def write_outputs(work: Path, source: Source, final: Attempt, report: QuantReport) -> None:
    """model.int8.onnx with its metadata (weights in model.int8.onnx.data above the
    external-data threshold), quantization.json and the updated manifest, all in ``work``."""
    model = onnx.load(str(final.path))
    if source.metadata is not None:
        source.metadata.quantization = metadata_quantization(report)
        write_props(model, source.metadata)
    weights = sum(tensor_bytes(t) for t in model.graph.initializer)
    external = weights > external_data.EXTERNAL_DATA_THRESHOLD
    save_model(model, work / INT8_FILE, external)
    del model
    files = {INT8_FILE: (work / INT8_FILE).stat().st_size}
    if external:
        files[data_name(INT8_FILE)] = data_file(work / INT8_FILE).stat().st_size
    report.sizes = {"fp32": file_bytes(source.model_path), "int8": sum(files.values())}
    report.files = list(files)
    write_json(work / QUANTIZATION_FILE, report.as_dict())
    write_manifest(work, source.folder / MANIFEST_FILE, files, report)


def write_manifest(
    work: Path, manifest_path: Path, files: dict[str, int], report: QuantReport
) -> None:
    """The export's manifest, listing the int8 model too (none: nothing to update)."""
    if not manifest_path.is_file():
        return
    manifest = json.loads(manifest_path.read_text())
    listed = manifest.setdefault("files", {})
    for name in (INT8_FILE, data_name(INT8_FILE)):
        listed.pop(name, None)
    listed.update(files)
    manifest["quantization"] = {"files": list(files), **metadata_quantization(report)}
    write_json(work / MANIFEST_FILE, manifest)


def publish_outputs(work: Path, folder: Path, report: QuantReport) -> None:
    """Move the outputs from ``work`` into ``folder``: renames, signals held back."""
    umask = os.umask(0)
    os.umask(umask)
    for name in OUTPUTS:  # onnx writes external data private (0600); give the usual mode
        if (work / name).exists():
            (work / name).chmod(0o666 & ~umask)
    with signals_deferred():
        for name in OUTPUTS:
            if (work / name).exists():
                (work / name).replace(folder / name)
        if data_name(INT8_FILE) not in report.files:
            (folder / data_name(INT8_FILE)).unlink(missing_ok=True)


def file_bytes(path: Path) -> int:
    """A model's bytes with its external data."""
    data = data_file(path)
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
