"""Reference vectors from real timm, for the timm CoAtNet family (run where timm is installed).

timm is never a dependency of the toolkit: this script runs in a separate environment, e.g.

    python3 -m venv /work/timmenv
    /work/timmenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm safetensors onnx onnxscript
    PYTHONPATH=$PWD /work/timmenv/bin/python scripts/timm_vectors.py fixtures
    PYTHONPATH=$PWD /work/timmenv/bin/python scripts/timm_vectors.py full coatnet_0_rw_224 --out DIR

``fixtures`` writes small configurations with random, non-trivial weights (random BatchNorm
statistics, bias tables, relative-position MLPs, layer scales) to tests/fixtures/timm/: for each,
timm's state dict as it saves it (``.safetensors``), a ``.json`` with the architecture and the
scaled widths, and an ``.io.npz`` with inputs ``x`` and timm's logits ``y``. Together they cover
every feature of the family. ``full NAME`` builds a full-size architecture with timm's own
initialisation and writes a hub-style folder (config.json + model.safetensors) with timm's
logits (``io.npz``) and, with ``--onnx``, timm's own ONNX export (``timm.onnx``) for benchmarks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from timm.models import maxxvit

from models.timm_config import TIMM_VARIANTS

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "timm"

SMALL = {"embed_dim": (32, 32, 32, 64), "depths": (1, 1, 2, 2), "stem_width": (16, 32)}
"""The scaled widths and depths of every fixture (heads of 32 channels: 1 to 2 per block)."""

CASES: dict[str, dict] = {
    # name: (timm architecture, image size, what the fixture is there for)
    "coatnet_0_rw": {"arch": "coatnet_0_rw_224", "img_size": (64, 96)},
    "coatnet_1_rw": {"arch": "coatnet_1_rw_224", "img_size": (64, 64)},
    "coatnet_2_rw": {"arch": "coatnet_2_rw_224", "img_size": (64, 64)},
    "coatnet_pico_rw": {"arch": "coatnet_pico_rw_224", "img_size": (64, 64)},
    "coatnet_nano_rw": {"arch": "coatnet_nano_rw_224", "img_size": (96, 64)},
    "coatnet_bn_0_rw": {"arch": "coatnet_bn_0_rw_224", "img_size": (64, 64)},
    "coatnet_rmlp_1_rw": {"arch": "coatnet_rmlp_1_rw_224", "img_size": (64, 96)},
    "coatnet_rmlp_2_rw": {"arch": "coatnet_rmlp_2_rw_224", "img_size": (64, 64)},
    "coatnet_nano_cc": {"arch": "coatnet_nano_cc_224", "img_size": (64, 64)},
    "coatnext_nano_rw": {"arch": "coatnext_nano_rw_224", "img_size": (64, 64)},
    "coatnet_0_paper": {"arch": "coatnet_0_224", "img_size": (64, 96)},
    # bias tables trained at 64x64, model built at 96x64 (timm's checkpoint_filter_fn resize)
    "coatnet_0_rw_resized": {"arch": "coatnet_0_rw_224", "img_size": (96, 64), "trained": (64, 64)},
}
NUM_CLASSES = 10
SEED = 0


def scales(arch: str) -> tuple[dict, dict]:
    """The changes that scale ``arch`` down: to timm's MaxxVitCfg, and to our TimmSpec."""
    ours: dict[str, Any] = {k: list(v) for k, v in SMALL.items()}
    theirs: dict[str, Any] = dict(SMALL)
    if TIMM_VARIANTS[arch].head_hidden:  # paper-like: one stem width, pre-logits width
        width = SMALL["stem_width"][1]
        theirs["stem_width"], ours["stem_width"] = width, [width, width]
        theirs["head_hidden_size"] = ours["head_hidden"] = SMALL["embed_dim"][-1]
    return theirs, ours


def timm_cfg(arch: str, changes: dict | None = None) -> maxxvit.MaxxVitCfg:
    """timm's own configuration of ``arch``, with ``changes``."""
    cfg = maxxvit.model_cfgs[arch.rsplit("_", 1)[0]]
    return dataclasses.replace(cfg, **changes) if changes else cfg


@torch.no_grad()
def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial values for everything timm initialises to constants."""

    def normal(t: torch.Tensor, mean: float, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen).mul_(std).add_(mean))

    for name, tensor in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.endswith("running_var"):
            tensor.copy_(torch.rand(tensor.shape, generator=gen).add_(0.5))
        elif name.endswith("running_mean") or name.endswith(".bias"):
            normal(tensor, 0.0, 0.1)
        elif name.endswith("gamma"):
            tensor.copy_(torch.rand(tensor.shape, generator=gen).add_(0.5))
        elif name.endswith("relative_position_bias_table"):
            normal(tensor, 0.0, 0.5)
        elif tensor.ndim == 1:  # norm weights
            normal(tensor, 1.0, 0.1)
        else:
            fan_in = tensor[0].numel()
            normal(tensor, 0.0, 1.0 / fan_in**0.5)


def write_fixture(name: str, case: dict) -> None:
    arch, size = case["arch"], tuple(case["img_size"])
    trained = tuple(case.get("trained", size))
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    theirs, ours = scales(arch)
    cfg = timm_cfg(arch, theirs)
    source = maxxvit.MaxxVit(cfg, img_size=trained, num_classes=NUM_CLASSES).eval()
    randomise(source, gen)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    model = source
    if trained != size:
        model = maxxvit.MaxxVit(cfg, img_size=size, num_classes=NUM_CLASSES).eval()
        model.load_state_dict(maxxvit.checkpoint_filter_fn(dict(state), model))
    x = torch.randn(3, 3, *size, generator=gen)
    with torch.no_grad():
        y = model(x)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    save_file(state, str(FIXTURES / f"{name}.safetensors"))
    np.savez(FIXTURES / f"{name}.io.npz", x=x.numpy(), y=y.numpy())
    meta = {
        "architecture": arch,
        "scale": ours,
        "img_size": list(size),
        "trained_img_size": list(trained),
        "num_classes": NUM_CLASSES,
        "timm": __import__("timm").__version__,
    }
    (FIXTURES / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{name}: {sum(v.numel() for v in state.values()):,} values, max|y| {y.abs().max():.3f}")


def write_full(arch: str, out: Path, onnx: bool, batch: int) -> None:
    """A full-size ``arch`` with timm's initialisation, as a hub folder with timm's logits."""
    import timm

    torch.manual_seed(SEED)
    model = timm.create_model(arch, pretrained=False).eval()
    spec = TIMM_VARIANTS[arch]
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(out / "model.safetensors"),
    )
    cfg = model.pretrained_cfg
    config = {
        "architecture": arch,
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "global_pool": "avg",
        "pretrained_cfg": {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in cfg.items()
            if k in ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")
        },
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(batch, 3, *spec.img_size, generator=gen)
    with torch.no_grad():
        start = time.perf_counter()
        y = model(x)
        print(f"{arch}: timm forward {time.perf_counter() - start:.2f} s")
    np.savez(out / "io.npz", x=x.numpy(), y=y.numpy())
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"architecture": arch, "parameters": params}))
    if onnx:
        export_timm_onnx(model, out / "timm.onnx", spec.img_size)


def export_timm_onnx(model: torch.nn.Module, path: Path, size: tuple[int, int]) -> None:
    """timm's own ONNX export, as its onnx_export.py does it (TorchScript exporter, opset 17,
    dynamic batch), for the speed comparison."""
    example = torch.randn(1, 3, *size)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["input0"],
            output_names=["output0"],
            dynamic_axes={"input0": {0: "batch"}, "output0": {0: "batch"}},
            opset_version=17,
            dynamo=False,
            do_constant_folding=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fixtures = sub.add_parser("fixtures", help="write the small fixtures")
    fixtures.add_argument("names", nargs="*", help="only these fixtures")
    full = sub.add_parser("full", help="one full-size architecture as a hub folder")
    full.add_argument("arch", choices=sorted(TIMM_VARIANTS))
    full.add_argument("--out", type=Path, required=True)
    full.add_argument("--onnx", action="store_true", help="also write timm's own ONNX export")
    full.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    if args.command == "fixtures":
        for name in args.names or CASES:
            write_fixture(name, CASES[name])
    else:
        write_full(args.arch, args.out, args.onnx, args.batch)


if __name__ == "__main__":
    main()
