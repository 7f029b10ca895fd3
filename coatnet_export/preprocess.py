"""Image preprocessing shared by validation, calibration and inference.

This module imports only numpy, Pillow and the standard library, so that the edge inference
script can use the very same code without torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # numpy loads with the first image, not with the command line's --help
    import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
CROP_MODES = ("center", "squash")
"""center: scale keeping the aspect ratio to cover ``size / crop_pct``, centre crop; squash:
scale each axis to ``size / crop_pct`` (the aspect ratio changes), centre crop (timm's)."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input: resize, centre crop, scale, normalise.

    ``center``: the image is scaled (keeping its aspect ratio) until it covers
    ``size / crop_pct``; ``squash``: each axis is scaled to ``floor(size / crop_pct)`` (the
    aspect ratio changes, as timm's ``squash``). Then it is centre cropped to ``size``,
    converted to floats in [0, 1], and normalised by ``mean``/``std``.
    """

    size: tuple[int, int]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {self.std}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )
        if self.crop_mode not in CROP_MODES:
            raise ValueError(
                f"crop_mode must be one of {', '.join(CROP_MODES)}, got {self.crop_mode!r}"
            )

    @property
    def channels(self) -> int:
        return len(self.mean)

    def as_dict(self) -> dict:
        return asdict(self)

    def resized_size(self, image_height: int, image_width: int) -> tuple[int, int]:
        """(height, width) the image is resized to before the centre crop."""
        height, width = self.size
        if self.crop_mode == "squash":
            return math.floor(height / self.crop_pct), math.floor(width / self.crop_pct)
        scale = max(height / self.crop_pct / image_height, width / self.crop_pct / image_width)
        return (
            max(height, math.ceil(image_height * scale - 1e-6)),
            max(width, math.ceil(image_width * scale - 1e-6)),
        )

    def __call__(self, image: Image.Image) -> np.ndarray:
        """A (channels, height, width) float32 array for one decoded image."""
        import numpy as np

        image = image.convert("L" if self.channels == 1 else "RGB")
        height, width = self.size
        resized_h, resized_w = self.resized_size(image.height, image.width)
        image = image.resize((resized_w, resized_h), INTERPOLATIONS[self.interpolation])
        left, top = (resized_w - width) // 2, (resized_h - height) // 2
        image = image.crop((left, top, left + width, top + height))
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if pixels.shape[2] != self.channels:
            raise ValueError(
                f"image has {pixels.shape[2]} channels, the model takes {self.channels}"
            )
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return ((pixels - mean) / std).transpose(2, 0, 1).copy()


def list_images(paths: Iterable[Path]) -> list[Path]:
    """Files named by ``paths``, with directories expanded to their image files (sorted)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(
                sorted(
                    p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                )
            )
        else:
            found.append(path)
    return found


def open_image(source: Path | BinaryIO) -> Image.Image:
    """Decode an image file fully and turn it upright as its EXIF orientation says, as browsers
    and photo viewers show it (a phone photo is often stored sideways with a rotation tag)."""
    with Image.open(source) as image:
        image.load()
        return ImageOps.exif_transpose(image)


def load_images(
    paths: Iterable[Path], preprocessing: Preprocessing
) -> Iterator[tuple[Path, np.ndarray | None, str | None]]:
    """Yield (path, array, None) for each readable image and (path, None, reason) otherwise."""
    for path in paths:
        try:
            yield path, preprocessing(open_image(path)), None
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            yield path, None, reason
