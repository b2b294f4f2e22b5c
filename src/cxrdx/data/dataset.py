"""Torch datasets over the prepared cache or raw files, the train / eval transforms, and the loader.

Every item is (image float32 (1, H, W), labels float32 (14,), Image Index). Transforms are
torchvision v2 callables on uint8 (1, S, S) tensors. The train order: flip, resize to the model
size, AutoAugment (ImageNet policy), to float, normalise, random erasing. With
`augment_before_resize` AutoAugment runs before the resize, on the cached image as it is: the
released code's order (on a 1024-px cache, its exact input).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from cxrdx.data.cache import Cache, open_cache, resize_square
from cxrdx.data.imageio import read_image
from cxrdx.errors import CxrdxError, MissingImagesWarning
from cxrdx.findings import FINDINGS
from cxrdx.preprocess import xrv_input

Transform = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_MEAN, DEFAULT_STD = 0.5, 0.25  # placeholders; use pixel_stats of the training split


def _normalize(mean: float | Sequence[float], std: float | Sequence[float]) -> list[v2.Transform]:
    means = [float(m) for m in np.atleast_1d(np.asarray(mean, dtype=np.float64))]
    stds = [float(s) for s in np.atleast_1d(np.asarray(std, dtype=np.float64))]
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=means, std=stds)]


def train_transform(
    input_size: int = 224,
    mean: float | Sequence[float] = DEFAULT_MEAN,
    std: float | Sequence[float] = DEFAULT_STD,
    autoaugment: bool = True,
    hflip: bool = True,
    random_erasing: float = 0.5,
    augment_before_resize: bool = False,
) -> Transform:
    """The paper's training augmentation for uint8 (1, S, S) tensors -> float32 (1, input_size, input_size)."""
    steps: list[v2.Transform] = []
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    resize = v2.Resize((input_size, input_size), antialias=True)
    if not augment_before_resize:
        steps.append(resize)
    if autoaugment:
        # On one 8-bit channel torchvision's PIL kernels run AutoAugment about twice as fast as its
        # tensor kernels (rotate and shear: PIL's 8-bit affine vs a float grid_sample).
        # fill=0: pixels uncovered by rotate/shear/translate become black, an X-ray's background.
        steps += [v2.ToPILImage(), v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, fill=0), v2.PILToTensor()]
    if augment_before_resize:
        steps.append(resize)
    steps += _normalize(mean, std)
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing, value=0))
    return v2.Compose(steps)


def eval_transform(
    input_size: int = 224,
    mean: float | Sequence[float] = DEFAULT_MEAN,
    std: float | Sequence[float] = DEFAULT_STD,
) -> Transform:
    """Deterministic: resize to the model size and normalise."""
    return v2.Compose([v2.Resize((input_size, input_size), antialias=True), *_normalize(mean, std)])


def _to_float(image: torch.Tensor) -> torch.Tensor:
    return image.to(torch.float32).div_(255.0)


class CacheDataset(Dataset):
    """Rows of a prepared cache; `rows=None` means all of them."""

    def __init__(self, cache: Cache | str | Path, rows: np.ndarray | None = None, transform: Transform | None = None):
        self.cache = cache if isinstance(cache, Cache) else open_cache(cache)
        self.rows = np.arange(len(self.cache)) if rows is None else np.asarray(rows, dtype=np.int64)
        if len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= len(self.cache)):
            raise CxrdxError(f"row numbers outside the {len(self.cache)} rows of the cache {self.cache.path}")
        self.transform = transform or _to_float
        self.labels = torch.from_numpy(self.cache.labels[self.rows].astype(np.float32))
        self.names = self.cache.index["Image Index"].to_numpy()[self.rows].tolist()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        image = torch.from_numpy(np.array(self.cache.images[self.rows[i]]))[None]
        return self.transform(image), self.labels[i], self.names[i]


class FileDataset(Dataset):
    """Raw image files, decoded and resized like the cache (read_image -> resize_square) on every access."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: np.ndarray | None = None,
        cache_size: int = 256,
        transform: Transform | None = None,
        names: Sequence[str] | None = None,
    ):
        """`names`: each image's Image Index (default: its file name)."""
        self.paths = [Path(p) for p in paths]
        self.names = [p.name for p in self.paths] if names is None else [str(n) for n in names]
        if labels is None:
            labels = np.zeros((len(self.paths), len(FINDINGS)), dtype=np.float32)
        labels = np.array(labels, dtype=np.float32)  # a copy: the tensor shares its memory
        if labels.shape != (len(self.paths), len(FINDINGS)):
            raise CxrdxError(f"labels of shape {labels.shape}; expected ({len(self.paths)}, {len(FINDINGS)})")
        self.labels = torch.from_numpy(labels)
        self.cache_size = cache_size
        self.transform = transform or _to_float

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        image = resize_square(read_image(self.paths[i]), self.cache_size, str(self.paths[i]))
        return self.transform(torch.from_numpy(image)[None]), self.labels[i], self.names[i]


class XrvFileDataset(FileDataset):
    """Raw image files through torchxrayvision's pipeline (`cxrdx.preprocess.xrv_input`), as `Predictor`
    feeds a model imported from torchxrayvision: centre crop and resize of the original image."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: np.ndarray | None,
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        names: Sequence[str] | None = None,
    ):
        super().__init__(paths, labels, input_size, names=names)
        self.mean, self.std = list(mean), list(std)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        image = xrv_input(read_image(self.paths[i]), self.cache_size, self.mean, self.std)
        return torch.from_numpy(image)[None], self.labels[i], self.names[i]


def rows_for_split(cache: Cache, split: pd.Series, name: str, allow_missing: bool = False) -> np.ndarray:
    """Row numbers of the cache whose image is in split `name` (split: Image Index -> train/val/test).

    Images the split lists but the cache lacks are an error, or with `allow_missing` a
    MissingImagesWarning giving their number and names.
    """
    wanted = split.index[split.to_numpy() == name]
    cached = cache.index["Image Index"]
    rows = np.flatnonzero(cached.isin(wanted).to_numpy())
    if len(rows) == 0:
        raise CxrdxError(f"no image of the '{name}' split is in the cache {cache.path} ({len(wanted)} listed in the split)")
    missing = wanted.difference(cached, sort=False)
    if len(missing):
        text = (
            f"{len(missing):,} of the {len(wanted):,} images of the '{name}' split are not in the cache {cache.path}: "
            f"{', '.join(map(str, missing[:5]))}{', ...' if len(missing) > 5 else ''}"
        )
        if not allow_missing:
            raise CxrdxError(f"{text}; prepare them, or leave them out with --allow-missing (train: --set data.allow_missing=true)")
        warnings.warn(f"{text} (left out)", MissingImagesWarning, stacklevel=2)
    return rows


def _init_worker(worker_id: int) -> None:
    torch.set_num_threads(1)  # each worker is one core; intra-op threads would only oversubscribe


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    workers: int,
    sampler: Sampler | None = None,
    drop_last: bool = False,
    pin_memory: bool | None = None,
    batch_sampler: Sampler | None = None,
) -> DataLoader:
    """A DataLoader set for speed: pinned memory for a CUDA device (default: when CUDA exists),
    persistent workers, 4 batches prefetched each. A `batch_sampler` replaces batch_size, shuffle,
    sampler and drop_last."""
    if batch_sampler is not None:
        batching: dict = {"batch_sampler": batch_sampler}
    else:
        batching = {"batch_size": batch_size, "shuffle": shuffle and sampler is None, "sampler": sampler, "drop_last": drop_last}
    return DataLoader(
        dataset,
        **batching,
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_init_worker if workers > 0 else None,
    )
