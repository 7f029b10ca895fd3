"""Train the small CoAtNet that quantization is measured against: scikit-learn's digits.

    python scripts/train_fixture.py [--out tests/fixtures/digits] [--epochs 30] [--seed 0]

The 8x8 handwritten digits that ship inside scikit-learn are saved as PNG images and read
through the very preprocessing an export records (upscaled to 64x64, bicubic, grey,
normalised by 0.5/0.5), so the checkpoint, the calibration images and the evaluation images
all agree. A fixed split holds out 360 images for testing. Writes ``digits.safetensors`` and
``labels.txt`` to --out, and prints the test accuracy; takes 2-4 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from coatnet_export.export.pipeline import ExportOptions
from coatnet_export.preprocess import Preprocessing
from models import VariantSpec, init_weights

ARCHITECTURE = VariantSpec("digits", (1, 1, 2, 2, 1), (16, 24, 32, 48, 64), num_heads=2)
IMG_SIZE = (64, 64)
PREPROCESSING = Preprocessing(
    IMG_SIZE, mean=(0.5,), std=(0.5,), crop_pct=1.0, interpolation="bicubic"
)
TEST_COUNT = 360
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "digits"
"""The trained checkpoint and its labels, as committed."""


def export_options(output: Path, **overrides: object) -> ExportOptions:
    """The committed checkpoint exported as it was trained (its preprocessing and labels, one
    random validation sample), wherever it is measured; ``overrides`` are ExportOptions'."""
    labels = [line for line in (FIXTURE / "labels.txt").read_text().splitlines() if line]
    settings: dict = {
        "architecture": None,
        "output": output,
        "checkpoint": FIXTURE / "digits.safetensors",
        "mean": PREPROCESSING.mean,
        "std": PREPROCESSING.std,
        "crop_pct": PREPROCESSING.crop_pct,
        "labels": labels,
        "samples": 1,
    }
    return ExportOptions(**{**settings, **overrides})


def digit_images() -> tuple[list[Image.Image], np.ndarray]:
    """The 1797 digits as 8x8 greyscale images (0-255) and their labels, in a fixed order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    return [Image.fromarray(p, mode="L") for p in pixels], digits.target.astype(np.int64)


def split(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and the held-out test images (fixed by ``seed``)."""
    order = np.random.default_rng(seed).permutation(1797)
    return order[TEST_COUNT:], order[:TEST_COUNT]


def write_images(folder: Path, indices: np.ndarray) -> None:
    """Save digits as ``folder/<label>/<index>.png`` (an image folder with class sub-folders)."""
    images, labels = digit_images()
    for i in indices:
        target = folder / str(labels[i])
        target.mkdir(parents=True, exist_ok=True)
        images[i].save(target / f"{i:04d}.png")


def tensors(indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = digit_images()
    x = np.stack([PREPROCESSING(images[i]) for i in indices])
    return torch.from_numpy(x), torch.from_numpy(labels[indices])


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 4 pixels (in the 64x64 frame), padded with the background."""
    shifts = torch.randint(-4, 5, (2,), generator=generator).tolist()
    background = float(x.min())
    shifted = torch.roll(x, shifts=shifts, dims=(2, 3))
    if shifts[0] > 0:
        shifted[:, :, : shifts[0]] = background
    elif shifts[0] < 0:
        shifted[:, :, shifts[0] :] = background
    if shifts[1] > 0:
        shifted[:, :, :, : shifts[1]] = background
    elif shifts[1] < 0:
        shifted[:, :, :, shifts[1] :] = background
    return shifted


def train(epochs: int, seed: int) -> tuple[torch.nn.Module, float]:
    torch.manual_seed(seed)
    train_idx, test_idx = split()
    x_train, y_train = tensors(train_idx)
    x_test, y_test = tensors(test_idx)
    model = init_weights(ARCHITECTURE.build(IMG_SIZE, num_classes=10, in_channels=1), seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = epochs * ((len(x_train) + 63) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            logits = model(augment(x_train[batch], generator))
            loss = torch.nn.functional.cross_entropy(logits, y_train[batch], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
        print(
            f"epoch {epoch + 1:2d}/{epochs}: loss {loss.item():.3f}, test accuracy {accuracy:.4f}",
            flush=True,
        )
    return model, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/digits"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    model, accuracy = train(args.epochs, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / "digits.safetensors"))
    (args.out / "labels.txt").write_text("".join(f"{d}\n" for d in range(10)))
    summary = {
        "test_accuracy": accuracy,
        "epochs": args.epochs,
        "seed": args.seed,
        "train_seconds": round(time.perf_counter() - start, 1),
        "architecture": ARCHITECTURE.as_dict(),
        "img_size": list(IMG_SIZE),
        "preprocessing": PREPROCESSING.as_dict(),
    }
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
