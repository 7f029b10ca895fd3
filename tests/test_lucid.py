"""lucid checkpoints: detection, safe reading, conversion and exact parity with lucid's outputs."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from coatnet_export.sources.architecture import infer_architecture
from coatnet_export.sources.checkpoint import read_checkpoint
from coatnet_export.sources.lucid import convert_lucid_state_dict
from models import VariantSpec, init_weights

VECTORS = Path(__file__).parent / "fixtures" / "lucid"
SAFETENSORS = VECTORS / "lucid_tiny.safetensors"
LCD = VECTORS / "lucid_tiny.lcd"
IO = VECTORS / "lucid_tiny.io.npz"


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("checkpoint", [SAFETENSORS, LCD], ids=["safetensors", "lcd"])
def test_lucid_checkpoint_matches_lucid_outputs(tmp_path: Path, run_cli, checkpoint: Path) -> None:
    report = tmp_path / "report.json"
    result = run_cli(
        "--checkpoint",
        checkpoint,
        "--reference-outputs",
        IO,
        "--output",
        tmp_path / "out",
        "--report",
        report,
    )
    assert result.code == 0, result.err
    recorded = [
        r
        for r in json.loads(report.read_text())["results"]
        if r["case"].startswith("recorded outputs")
    ]
    assert len(recorded) == 1
    assert recorded[0]["max_rel"] <= 1e-5 and recorded[0]["top1"] == 1.0
    assert recorded[0]["max_abs"] > 0
    info = json.loads(run_cli("info", tmp_path / "out", "--json", "-").out)
    assert info["checkpoint_format"] == "lucid"
    assert info["numerics"] == {"gelu_tanh": True, "maxpool_zero_pad": True, "scale_multiply": True}
    assert info["img_size"] == [64, 64] and info["num_classes"] == 10
    config = json.loads(str(np.load(IO)["config"]))
    assert info["architecture"]["num_blocks"] == config["num_blocks"]
    assert info["architecture"]["channels"] == config["channels"]
    assert info["architecture"]["num_heads"] == config["num_heads"]


def test_treating_lucid_as_torch_fails_the_recorded_gate(tmp_path: Path, run_cli) -> None:
    """Conversion and lucid numerics are what make the outputs agree: without them, exit 1."""
    result = run_cli(
        "--checkpoint",
        SAFETENSORS,
        "--checkpoint-format",
        "torch",
        "--reference-outputs",
        IO,
        "--output",
        tmp_path / "out",
        "--quiet",
    )
    assert result.code == 1
    assert "validation failed" in result.err
    assert not (tmp_path / "out").exists()


def test_architecture_inferred_from_keys_and_shapes() -> None:
    spec = infer_architecture(read_checkpoint(SAFETENSORS).state_dict)
    assert spec.num_blocks == (1, 1, 2, 2, 1)
    assert spec.channels == (16, 24, 32, 48, 64)
    assert spec.num_heads == 2 and spec.tandem is None


def test_detection() -> None:
    assert read_checkpoint(SAFETENSORS).format == "lucid"
    assert read_checkpoint(LCD).format == "lucid"
    arrays = read_checkpoint(LCD).state_dict
    from_st = read_checkpoint(SAFETENSORS).state_dict
    assert arrays.keys() == from_st.keys()
    assert all(torch.equal(arrays[k], from_st[k]) for k in arrays)


def test_variant_mismatch_is_explained(tmp_path: Path, run_cli) -> None:
    result = run_cli(
        "--variant", "coatnet_0", "--checkpoint", SAFETENSORS, "--output", tmp_path / "out"
    )
    assert result.code == 2
    assert "does not hold a coatnet_0" in result.err
    assert "num_blocks: coatnet_0 has [2, 2, 3, 5, 2], the checkpoint [1, 1, 2, 2, 1]" in result.err
    assert "num_heads: coatnet_0 has 32, the checkpoint 2" in result.err


def test_table_permutation_is_a_transpose_of_the_grid() -> None:
    table = torch.arange(9 * 2, dtype=torch.float32).reshape(9, 2)  # 3x3 grid, 2 heads
    converted = convert_lucid_state_dict(
        {
            "s4.0.attn.1.fn.relative_bias_table": table,
            "s4.0.attn.1.fn.relative_index": torch.zeros(4, 1),
        },
        (64, 64),
    )
    assert list(converted) == ["s4.0.attn.1.fn.relative_bias_table"]
    grid = table.reshape(3, 3, 2)
    for r in range(3):
        for c in range(3):
            assert torch.equal(
                converted["s4.0.attn.1.fn.relative_bias_table"][r * 3 + c], grid[c, r]
            )


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def lucid_bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    arrays = load_file(str(SAFETENSORS))
    made = {}
    evil = tmp_path / "evil.lcd"
    evil.write_bytes(pickle.dumps({"type": "dict", "content": {"x": RunsCode(tmp_path / "pwned")}}))
    made["code"] = (evil, "names posix.system")
    strings = tmp_path / "strings.lcd"
    strings.write_bytes(pickle.dumps({"type": "dict", "content": {"fc.weight": "hello"}}))
    made["not arrays"] = (strings, "not numeric arrays: fc.weight")
    truncated = tmp_path / "truncated.lcd"
    truncated.write_bytes(LCD.read_bytes()[:5000])
    made["truncated lcd"] = (truncated, "truncated or corrupt")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(SAFETENSORS.read_bytes()[:4000])
    made["truncated safetensors"] = (cut, "not a readable safetensors file")
    missing = dict(arrays)
    del missing["s3.1.ff.1.fn.ff.0.bias"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    made["missing key"] = (
        tmp_path / "missing.safetensors",
        "missing 1 key(s): s3.1.ff.1.fn.ff.0.bias",
    )
    extra = dict(arrays, **{"s9.extra": np.zeros(3, np.float32)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    made["extra key"] = (tmp_path / "extra.safetensors", "unexpected 1 key(s): s9.extra")
    wrong = dict(arrays)
    wrong["s2.0.proj.weight"] = np.zeros((32, 5, 1, 1), np.float32)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    made["inconsistent shape"] = (tmp_path / "wrong.safetensors", "s2.0.proj.weight (32, 5, 1, 1)")
    return made


def test_bad_lucid_checkpoints(tmp_path: Path, run_cli) -> None:
    for name, (path, fragment) in lucid_bad_files(tmp_path).items():
        before = listing(tmp_path)
        result = run_cli(
            "--checkpoint", path, "--checkpoint-format", "lucid", "--output", tmp_path / "out"
        )
        assert result.code == 2, (name, result.err)
        errors = [line for line in result.err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and fragment in errors[0], (name, result.err)
        assert "Traceback" not in result.err
        assert listing(tmp_path) == before, name
        assert not (tmp_path / "pwned").exists()


def test_non_square_lucid_checkpoint_is_refused(tmp_path: Path, run_cli) -> None:
    spec = VariantSpec("tiny", (1, 1, 2, 2, 1), (16, 24, 32, 48, 64), 2)
    model = init_weights(spec.build((64, 96), num_classes=10), 0)
    arrays = {
        k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    arrays["s4.0.attn.1.fn.relative_index"] = np.zeros((6, 1))  # lucid saves it
    save_file(arrays, str(tmp_path / "wide.safetensors"))
    result = run_cli("--checkpoint", tmp_path / "wide.safetensors", "--output", tmp_path / "out")
    assert result.code == 2
    assert "trained at 64x96" in result.err and "only correct on square" in result.err
