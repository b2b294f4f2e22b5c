"""Inputs of `cxrdx explain / localize`: images and boxes of a split, with the run folder's split file and cache as defaults."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cxrdx.errors import CxrdxError

if TYPE_CHECKING:
    import torch

    from cxrdx.predict import ImageSource, Predictor


@dataclass(frozen=True)
class LocalizationInputs:
    """The boxes to score and their images (`localization_inputs`)."""

    boxes: pd.DataFrame  # the box table, narrowed to the split when one was asked for
    names: list[str]  # boxed images found, at most `limit`
    load: Callable[[str], tuple[torch.Tensor, tuple[int, int]]]  # name -> model input, size the boxes refer to
    missing: list[str]  # boxed images not found


def run_split_file(checkpoint: str | Path) -> Path | None:
    """RUN/split.csv of the run a checkpoint (RUN/checkpoints/X.pt) comes from, when it exists."""
    from cxrdx.rundir import run_dir_of, split_path

    path = split_path(run_dir_of(Path(checkpoint).resolve()))
    return path if path.is_file() else None


def run_cache(predictor: Predictor) -> str | None:
    """The prepared cache the checkpoint was trained on, as its config names it."""
    return (predictor.checkpoint.config.get("data") or {}).get("cache")


def explain_inputs(
    predictor: Predictor,
    checkpoint: str | Path,
    images: Sequence[str] = (),
    split: str | None = None,
    split_file: str | Path | None = None,
    cache: str | Path | None = None,
    limit: int | None = None,
) -> tuple[int, Iterator[tuple[str, ImageSource]]]:
    """(count, lazy (name, image) pairs): the IMAGE files and folders, or with `split` that split of a cache (default: the run's)."""
    if split:
        from cxrdx.data.cache import open_cache
        from cxrdx.data.dataset import rows_for_split
        from cxrdx.data.splits import read_split

        cache_path = cache or run_cache(predictor)
        split_path = split_file or run_split_file(checkpoint)
        if not cache_path or not split_path:
            raise CxrdxError("batch mode needs --cache and --split-file (no run folder defaults beside the checkpoint)")
        opened = open_cache(cache_path)
        rows = rows_for_split(opened, read_split(split_path), split, allow_missing=True)[:limit]  # maps of those there; the rest named
        names = opened.index["Image Index"].to_numpy()
        return len(rows), ((str(names[r]), np.asarray(opened.images[r])) for r in rows)  # lazily: a split can be large
    from cxrdx.predict import collect_images

    files = collect_images(images)
    if not files:
        raise CxrdxError(f"no image files in {', '.join(images)}")
    return len(files), ((name, path) for path, name in files)


def localization_inputs(
    predictor: Predictor,
    checkpoint: str | Path,
    boxes: pd.DataFrame,
    split: str | None = None,
    split_file: str | Path | None = None,
    data_dir: str | Path | None = None,
    cache: str | Path | None = None,
    box_size: int | None = None,
    limit: int | None = None,
) -> LocalizationInputs:
    """The boxes (of `split` only, when given) and their images, found as by `boxed_images` in `data_dir` or else a
    cache (default: the run's). Options in `explain_inputs`' order."""
    from cxrdx.explain.localization import boxed_images, boxes_in_split

    if split:
        from cxrdx.data.splits import read_split

        split_path = split_file or run_split_file(checkpoint)
        if not split_path:
            raise CxrdxError("--split needs --split-file (no RUN/split.csv beside the checkpoint)")
        table = read_split(split_path)
        chosen = boxes_in_split(boxes, table, split)
        if chosen.empty:
            names = boxes["Image Index"].unique()
            where = table.reindex(names).fillna("no split").value_counts()
            raise CxrdxError(
                f"none of the {len(names)} boxed image(s) is in the '{split}' split of {split_path} "
                f"({', '.join(f'{n} in {s}' for s, n in where.items())}); choose one of those splits or leave out --split"
            )
        boxes = chosen
    opened = None
    if not data_dir:
        from cxrdx.data.cache import open_cache

        cache_path = cache or run_cache(predictor)
        if not cache_path:
            raise CxrdxError("give the boxed images: --data-dir D or --cache C")
        opened = open_cache(cache_path)
    return LocalizationInputs(boxes, *boxed_images(boxes, predictor, data_dir, opened, box_size, limit))
