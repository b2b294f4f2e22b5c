"""Inputs of `cxrdx explain / localize`: images and boxes of a split, with the run folder's split file and cache as defaults."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cxrdx.errors import CxrdxError, ParameterError
from cxrdx.explain.registry import check_methods

if TYPE_CHECKING:
    import torch
    from torch import nn

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


def cam_predictor(
    checkpoint: str | Path, device: str = "auto", batch_size: int = 32, target_layer: str | None = None, trust_pickle: bool = False
) -> tuple[Predictor, list[nn.Module] | None]:
    """The predictor of a checkpoint and the module named `target_layer` to explain (None: chosen for the model)."""
    from cxrdx.predict import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, device=device, batch_size=batch_size, trust_pickle=trust_pickle)
    if not target_layer:
        return predictor, None
    try:
        return predictor, [predictor.model.get_submodule(target_layer)]
    except AttributeError:
        raise ParameterError("target_layer", target_layer, f"no such module in {predictor.info.model_name}") from None


@dataclass(frozen=True)
class LocalizationResult:
    """What `localize_checkpoint` measured: the Markdown tables, the summary rows, one record per map, and the
    boxed images scored and not found."""

    text: str
    summary: pd.DataFrame
    records: pd.DataFrame
    names: list[str]
    missing: list[str]


def localize_checkpoint(
    predictor: Predictor,
    checkpoint: str | Path,
    boxes_path: str | Path,
    methods: Sequence[str] = ("groupcam", "gradcam"),
    target_layers: Sequence[nn.Module] | None = None,
    split: str | None = None,
    split_file: str | Path | None = None,
    data_dir: str | Path | None = None,
    cache: str | Path | None = None,
    box_size: int | None = None,
    limit: int | None = None,
    threshold: float = 0.5,
    mode: str = "relative",
    tolerance: float = 0.0,
    out: str | Path | None = None,
    progress: bool = True,
    **options: object,
) -> LocalizationResult:
    """Pointing game and IoU of each method's maps against the boxes of `boxes_path` (of `split` only, when given),
    written to `out` when given (localization.md, localization.json, localization_records.csv)."""
    from cxrdx.explain.localization import localize, markdown_tables, read_boxes, summarize, write_localization

    check_methods(methods, "methods")
    boxes = read_boxes(boxes_path)
    inputs = localization_inputs(predictor, checkpoint, boxes, split, split_file, data_dir, cache, box_size, limit)
    boxes, names, load, missing = inputs.boxes, inputs.names, inputs.load, inputs.missing
    if not names:
        where = f"the cache {cache or 'of the run'}" if not data_dir else data_dir
        raise CxrdxError(f"none of the {boxes['Image Index'].nunique()} boxed images of {boxes_path} is in {where}")
    images = ((name, *load(name)) for name in names)
    records = localize(
        predictor,
        images,
        boxes,
        methods=methods,
        threshold=threshold,
        mode=mode,
        tolerance=tolerance,
        progress=progress,
        total=len(names),
        target_layers=target_layers,
        **options,
    )
    summary = summarize(records)
    text = markdown_tables(summary, threshold, mode)
    if out:
        settings = {
            "split": split,
            "threshold": threshold,
            "threshold_mode": mode,
            "tolerance": tolerance,
            "boxes": str(boxes_path),
            "checkpoint": str(checkpoint),
            "images": len(names),
        }
        write_localization(out, text, summary, records, settings)
    return LocalizationResult(text, summary, records, list(names), list(missing))
