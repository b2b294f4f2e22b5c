"""The input pipelines a checkpoint can name in its `preprocess` field.

- "cxrdx" (every model cxrdx trains): `resize_square` to the cache size (uint8, Lanczos), then
  `eval_transform` (resize to the input size, `(x / 255 - mean) / std`). See `cxrdx.predict`.
- "xrv" (models imported from torchxrayvision): torchxrayvision's own steps, in its order and float
  arithmetic: the image scaled to [-1024, 1024] (`xrv.datasets.normalize(img, 255)`), the centre square
  cropped (`XRayCenterCrop`), then resized with scikit-image's linear, anti-aliased resize
  (`XRayResizer`). The scaling is `(x / 255 - mean) / std` with mean 0.5 and std 1/2048, which is
  torchxrayvision's `(2 x / 255 - 1) * 1024` to the last bit, so viewers un-normalise both pipelines
  the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

CXRDX = "cxrdx"
XRV = "xrv"
PREPROCESS: tuple[str, ...] = (CXRDX, XRV)
XRV_MEAN: list[float] = [0.5]
XRV_STD: list[float] = [1 / 2048]


def centre_crop(image: np.ndarray) -> np.ndarray:
    """The centred square of side min(H, W) of a 2-D image (the offsets torchxrayvision uses)."""
    height, width = image.shape
    side = min(height, width)
    top, left = height // 2 - side // 2, width // 2 - side // 2
    return image[top : top + side, left : left + side]


def xrv_input(image: np.ndarray, size: int, mean: Sequence[float] = XRV_MEAN, std: Sequence[float] = XRV_STD) -> np.ndarray:
    """A 2-D uint8 image → the float32 (size, size) input of a torchxrayvision model."""
    from skimage.transform import resize

    scaled = (centre_crop(image).astype(np.float32) / np.float32(255) - np.float32(mean[0])) / np.float32(std[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-image's anti-aliasing notices, as torchxrayvision silences them
        resized = resize(scaled[None], (1, size, size), mode="constant", preserve_range=True)
    return resized[0].astype(np.float32)
