"""Images that are not chest radiographs, for the input guard: the photographs and micrographs
scikit-image ships in `skimage/data/`, plus generated text, blank and noise images. All 8-bit grey."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PACKAGED_SUFFIXES = (".png", ".jpg", ".gif")
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "report", "findings", "normal", "chest", "radiograph"]


def packaged_images() -> dict[str, np.ndarray]:
    """skimage's own data files (photographs, micrographs, a page of text...), first frame, grey."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    out = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in PACKAGED_SUFFIXES:
            with Image.open(path) as image:
                out[f"skimage {path.stem}"] = np.asarray(image.convert("L"))
    return out


def text_image(size: int, seed: int) -> np.ndarray:
    """Lines of random words, dark on light or light on dark."""
    rng = np.random.default_rng(seed)
    dark = bool(seed % 2)
    image = Image.new("L", (size, size), 20 if dark else 235)
    draw = ImageDraw.Draw(image)
    for y in range(2, size - 8, 12):
        draw.text((2, y), " ".join(rng.choice(WORDS, 4)), fill=230 if dark else 25)
    return np.asarray(image)


def generated_images(size: int, per_kind: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Text pages, blank images (grey levels from black to white) and noise (uniform, Gaussian, salt and pepper)."""
    rng = np.random.default_rng(seed)
    out = {f"text {i}": text_image(size, seed + i) for i in range(per_kind)}
    for level in np.linspace(0, 255, per_kind).round().astype(np.uint8):
        out[f"blank {level}"] = np.full((size, size), level, np.uint8)
    for i in range(per_kind):
        kind = ("uniform", "gaussian", "salt-and-pepper")[i % 3]
        if kind == "uniform":
            noise = rng.integers(0, 256, (size, size))
        elif kind == "gaussian":
            noise = rng.normal(128, 20 + 10 * i, (size, size))
        else:
            noise = rng.choice([0, 255], (size, size), p=[0.5, 0.5])
        out[f"noise {kind} {i}"] = np.clip(noise, 0, 255).astype(np.uint8)
    return out


def foreign_images(size: int, per_kind: int = 8) -> dict[str, np.ndarray]:
    """Every image above, by name."""
    return {**packaged_images(), **generated_images(size, per_kind)}
