"""The prepared cache: every image decoded once, resized to S x S uint8, in one memory-mapped array.

Layout of a cache folder:
    images.npy   (N, S, S) uint8, opened as a read-only memory map
    index.csv    the metadata rows of the N images, in the same order (plus their source `path`); the 14
                 finding columns are 1, 0 or blank (not labelled: NaN in `Cache.labels`)
    failed.csv   Image Index, path, reason for every image that could not be prepared
    meta.json    size, count, sources (`data_source`: the generator's marker for synthetic images);
                 written last, so its presence means the cache is complete

While `prepare_cache` runs, the folder holds `images.partial.npy` (all planned rows), `done.npy`
(which of them are written; saved only after the image rows are flushed) and `plan.json`.
Re-running continues from `done.npy`; an interrupt at any moment loses at most the rows written
since the last save, never marks an unwritten row as done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrdx import __version__
from cxrdx.atomic import atomic_path, write_text
from cxrdx.data.imageio import read_image
from cxrdx.data.metadata import read_source_marker
from cxrdx.errors import CxrdxError, ImageReadError
from cxrdx.findings import FINDINGS

FORMAT = 1
IMAGES, INDEX, FAILED, META = "images.npy", "index.csv", "failed.csv", "meta.json"
PARTIAL, DONE, PLAN = "images.partial.npy", "done.npy", "plan.json"
SAVE_EVERY_S = 2.0


def resize_square(image: np.ndarray, size: int, name: str = "image") -> np.ndarray:
    """Resize a 2-D uint8 image to (size, size) with Lanczos (antialiased); the one resize of cache and predict.

    A non-square image is scaled to the square without cropping (as the paper's Resize((S, S))).
    `name` labels the image in the ImageReadError of one too lopsided to resize (e.g. 50,000,000 x 1).
    """
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got {image.dtype} {image.shape}")
    if image.shape == (size, size):
        return np.array(image)
    try:
        return np.array(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))
    except MemoryError:  # Lanczos weights grow with the scale factor of each side
        height, width = image.shape
        raise ImageReadError(name, f"not enough memory to resize the {width:,} x {height:,} pixel image to {size} x {size}") from None


@dataclass
class PrepareResult:
    prepared: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    path: Path | None = None
    excluded_views: dict[str, int] = field(default_factory=dict)  # {view: images} left out by the view filter


@dataclass
class Cache:
    """An opened cache: `images[i]` is the (S, S) uint8 image of `index.iloc[i]` with `labels[i]`.

    `labels` is (N, 14) float32: 1, 0, or NaN where the image's dataset does not label the finding.
    """

    path: Path
    images: np.ndarray
    index: pd.DataFrame
    labels: np.ndarray
    size: int
    meta: dict

    def __len__(self) -> int:
        return len(self.images)

    def __reduce__(self):
        # DataLoader workers reopen the memory map instead of pickling every image.
        return (open_cache, (self.path,))


def open_cache(path: str | Path) -> Cache:
    """Open a complete cache folder; clear errors for a missing, unfinished or damaged one."""
    path = Path(path)
    if not path.is_dir():
        raise CxrdxError(f"{path}: no cache here; create one with 'cxrdx prepare --data-dir D --out {path}'")
    if not (path / META).is_file():
        if (path / PLAN).is_file():
            raise CxrdxError(f"{path}: unfinished cache (an interrupted 'cxrdx prepare'); run the same command again to finish it")
        raise CxrdxError(f"{path}: not a cxrdx cache ({META} is missing)")
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
        int(meta["size"]), int(meta["count"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CxrdxError(f"{path / META}: damaged cache description ({exc.__class__.__name__}: {exc}); prepare it again") from None
    if meta.get("format") != FORMAT:
        raise CxrdxError(f"{path}: cache format {meta.get('format')} is not supported (expected {FORMAT}); prepare it again")
    try:
        images = np.load(path / IMAGES, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise CxrdxError(f"{path / IMAGES}: unreadable cache images ({exc})") from None
    size, count = int(meta["size"]), int(meta["count"])
    if images.dtype != np.uint8 or images.shape != (count, size, size):
        raise CxrdxError(f"{path / IMAGES}: expected uint8 {(count, size, size)}, found {images.dtype} {images.shape}")
    index = _read_index(path / INDEX)
    if len(index) != count:
        raise CxrdxError(f"{path / INDEX}: {len(index)} rows, expected {count} (one per cached image)")
    labels = index[list(FINDINGS)].to_numpy(dtype=np.float32)
    return Cache(path=path, images=images, index=index, labels=labels, size=size, meta=meta)


class _Stacked:
    """The image arrays of several caches read as one (N, S, S) array: rows by integer or integer array."""

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = (int(self.starts[-1]), *self.parts[0].shape[1:])
        self.dtype = self.parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: int | np.integer | np.ndarray) -> np.ndarray:
        if isinstance(rows, (int, np.integer)):
            one = int(np.searchsorted(self.starts, rows, side="right")) - 1
            return self.parts[one][int(rows) - self.starts[one]]
        rows = np.asarray(rows, dtype=np.int64)
        part = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        for k in np.unique(part):
            where = part == k
            out[where] = self.parts[k][rows[where] - self.starts[k]]
        return out


@dataclass
class CacheSet(Cache):
    """Several caches trained on as one: rows follow the order of `paths`. Patient IDs become
    'dataset:id' so that patients of different datasets never merge; labels keep their NaN."""

    paths: tuple[Path, ...] = ()

    def __reduce__(self):
        return (open_caches, (self.paths,))


def open_caches(paths: Sequence[str | Path]) -> Cache:
    """One cache, or several of the same image size as one `CacheSet` (the `data.caches` of a training config)."""
    if len(paths) == 1:
        return open_cache(paths[0])
    caches = [open_cache(p) for p in paths]
    sizes = {c.size for c in caches}
    if len(sizes) > 1:
        raise CxrdxError(f"caches of different sizes ({', '.join(f'{c.path}: {c.size} px' for c in caches)}); prepare them at one size")
    parts = []
    for c in caches:
        dataset = c.index["dataset"] if "dataset" in c.index.columns else pd.Series(c.meta.get("dataset", "nih"), index=c.index.index)
        parts.append(c.index.assign(**{"Patient ID": dataset.astype(str) + ":" + c.index["Patient ID"].astype(str), "dataset": dataset}))
    index = pd.concat(parts, ignore_index=True)
    repeated = index["Image Index"].duplicated()
    if repeated.any():
        raise CxrdxError(f"image {index['Image Index'][repeated].iloc[0]!r} is in more than one of the caches {', '.join(map(str, paths))}")
    meta = {"size": caches[0].size, "count": len(index), "caches": [str(c.path) for c in caches]}
    return CacheSet(
        path=caches[0].path,
        images=_Stacked([c.images for c in caches]),  # type: ignore[arg-type]  # indexed like the array it stands for
        index=index,
        labels=np.concatenate([c.labels for c in caches]),
        size=caches[0].size,
        meta=meta,
        paths=tuple(c.path for c in caches),
    )


def prepare_cache(
    data_dir: str | Path,
    out: str | Path,
    size: int = 256,
    metadata: str | Path | None = None,
    workers: int = 0,
    progress: bool = True,
    dataset: str | None = None,
    views: Sequence[str] | None = ("PA", "AP"),
    **options: str,
) -> PrepareResult:
    """Decode every image of the metadata table once, resize it to size x size and store it in `out`.

    `dataset` (None or "nih": ChestX-ray14's Data_Entry table; else a name of
    `cxrdx.data.datasets.list_datasets()`) reads that dataset's layout with harmonised labels;
    `views` and `options` go to its adapter (`read_dataset`). Resumable: running again with the
    same arguments continues an interrupted run. Unreadable or missing images go to
    `out/failed.csv`; the rest is prepared. A complete cache is left as is.
    """
    data_dir, out = Path(data_dir), Path(out)
    if size < 8:
        raise CxrdxError(f"cache size {size} is too small (use 8 or more pixels)")
    found, missing, excluded, source = _locate(data_dir, metadata, dataset, views, options)
    found = found.reset_index(drop=True)
    names = "\n".join(found["Image Index"]).encode()
    plan = {"size": size, "count": len(found), "images_sha256": hashlib.sha256(names).hexdigest()}
    if (out / META).is_file():
        return _existing_result(out, plan)

    if out.exists() and not out.is_dir():
        raise CxrdxError(f"{out}: is a file; --out must be a folder")
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        result = _prepare(found, missing, out, plan, workers, progress, data_dir, source)
    result.excluded_views = excluded
    return result


def _locate(
    data_dir: Path, metadata: str | Path | None, dataset: str | None, views: Sequence[str] | None, options: dict
) -> tuple[pd.DataFrame, list[str], dict[str, int], dict[str, str]]:
    """The located rows (with `path`), the missing image names, the excluded views and meta.json's source fields."""
    if dataset not in (None, "nih"):
        from cxrdx.data.datasets import read_dataset

        if metadata is not None:
            raise CxrdxError(f"--metadata is for ChestX-ray14's Data_Entry table; dataset {dataset!r} finds its own label files")
        index = read_dataset(dataset, data_dir, views=views, **options)
        if index.table.empty:
            raise CxrdxError(f"{data_dir}: none of the images of dataset {dataset!r} found ({len(index.missing)} listed, none on disk)")
        source = {"dataset": dataset, "options": json.dumps(options, sort_keys=True), "views": ",".join(views or ("all",))}
        return index.table, index.missing, index.excluded_views, source
    if options:
        raise CxrdxError(f"{', '.join(options)}: options of the other datasets' readers; ChestX-ray14 (nih) has none")
    from cxrdx.data.metadata import find_metadata, locate_images, read_metadata

    metadata = Path(metadata) if metadata is not None else find_metadata(data_dir)
    index = read_metadata(metadata)
    found, missing = locate_images(index, data_dir)
    if len(found) == 0:
        first = ", ".join(list(index["Image Index"])[:3])
        raise CxrdxError(f"{data_dir}: none of the {len(index)} images of {metadata} found (first: {first})")
    return found, missing, {}, {"dataset": "nih", "metadata": str(metadata.resolve())}


def pixel_stats(cache: Cache, rows: np.ndarray | None = None, chunk: int = 256) -> tuple[float, float]:
    """Mean and standard deviation of the pixels (scaled to [0, 1]) of the given rows; exact, in chunks."""
    rows = np.arange(len(cache)) if rows is None else np.sort(np.asarray(rows, dtype=np.int64))
    if len(rows) == 0:
        raise CxrdxError("pixel statistics of an empty set of images")
    histogram = np.zeros(256, dtype=np.int64)
    for start in range(0, len(rows), chunk):
        histogram += np.bincount(cache.images[rows[start : start + chunk]].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = histogram.sum()
    mean = float((histogram * values).sum() / total)
    std = float(np.sqrt((histogram * (values - mean) ** 2).sum() / total))
    return mean, std


# --- preparation steps ----------------------------------------------------------------------------


def _prepare(
    found: pd.DataFrame, missing: list[str], out: Path, plan: dict, workers: int, progress: bool, data_dir: Path, source: dict
) -> PrepareResult:
    size = plan["size"]
    images, done = _open_work(out, plan)
    failed: dict[int, str] = {}
    todo = np.flatnonzero(~done)
    try:
        with _progress(progress, len(found), int(done.sum())) as bar:
            last_save = time.monotonic()
            for row, pixels, reason in _decode_rows(found["path"].tolist(), todo, size, workers):
                if pixels is None:
                    failed[row] = reason
                else:
                    images[row] = pixels
                    done[row] = True
                bar.update(1)
                if time.monotonic() - last_save > SAVE_EVERY_S:
                    _save_done(out, images, done)
                    last_save = time.monotonic()
    finally:
        _save_done(out, images, done)
    del images
    failures = [(found.at[r, "Image Index"], str(found.at[r, "path"]), failed[r]) for r in sorted(failed)]
    failures += [(name, "", f"not found under {data_dir}") for name in missing]
    _finish(out, found, done, failures, plan, data_dir, source)
    return PrepareResult(prepared=int(done.sum()), failed=[(n, why) for n, _, why in failures], path=out)


def _load_row(task: tuple[int, str, int]) -> tuple[int, np.ndarray | None, str]:
    """(row, resized pixels or None, reason of the failure); runs in worker processes."""
    row, path, size = task
    try:
        return row, resize_square(read_image(path), size, path), ""
    except ImageReadError as exc:
        return row, None, exc.reason


def _decode_rows(paths: list[str], rows: np.ndarray, size: int, workers: int) -> Iterator[tuple[int, np.ndarray | None, str]]:
    tasks = ((int(r), str(paths[r]), size) for r in rows)
    if workers <= 0:
        yield from map(_load_row, tasks)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(_load_row, tasks, chunksize=8)


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold a lock on the cache folder: two prepares writing one cache would corrupt it."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; run one prepare per folder
        yield
        return
    handle = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CxrdxError(f"{out}: another 'cxrdx prepare' is writing this cache; wait for it or choose another --out") from None
        yield
    finally:
        os.close(handle)


def _open_work(out: Path, plan: dict) -> tuple[np.memmap, np.ndarray]:
    """The partial image array and its done-mask: continued when they match `plan`, else started anew."""
    size, count = plan["size"], plan["count"]
    if (out / PLAN).is_file():
        previous = json.loads((out / PLAN).read_text(encoding="utf-8"))
        if previous != plan:
            raise CxrdxError(
                f"{out}: holds an unfinished cache of other images or size ({previous['count']} images at "
                f"{previous['size']} px); delete the folder or choose another --out"
            )
        if (out / PARTIAL).is_file() and (out / DONE).is_file():
            images = np.lib.format.open_memmap(out / PARTIAL, mode="r+")
            done = np.load(out / DONE)
            if images.shape == (count, size, size) and done.shape == (count,):
                return images, done.astype(bool)
    elif any((out / name).exists() for name in (IMAGES, INDEX, PARTIAL)):
        raise CxrdxError(f"{out}: not empty and not a cxrdx cache; choose another --out")
    write_text(out / PLAN, json.dumps(plan))
    (out / DONE).unlink(missing_ok=True)  # a mask is only valid for the array it was saved with
    try:
        images = np.lib.format.open_memmap(out / PARTIAL, mode="w+", dtype=np.uint8, shape=(count, size, size))
    except OSError as exc:
        raise CxrdxError(f"{out / PARTIAL}: cannot create the {count * size * size / 2**30:.1f} GiB image array ({exc})") from None
    done = np.zeros(count, dtype=bool)
    _save_done(out, images, done)
    return images, done


def _save_done(out: Path, images: np.memmap, done: np.ndarray) -> None:
    images.flush()  # rows reach the disk before the mask that says they are there
    with atomic_path(out / DONE) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, done)


def _finish(out: Path, found: pd.DataFrame, done: np.ndarray, failures: list, plan: dict, data_dir: Path, source: dict) -> None:
    """Write the final files; meta.json last, so a crash before it leaves a resumable folder."""
    size = plan["size"]
    if done.all():
        os.replace(out / PARTIAL, out / IMAGES)
    else:
        partial = np.load(out / PARTIAL, mmap_mode="r")
        keep = np.flatnonzero(done)
        with atomic_path(out / IMAGES) as tmp:
            final = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(keep), size, size))
            for start in range(0, len(keep), 512):
                final[start : start + 512] = partial[keep[start : start + 512]]
            final.flush()
            del final
        del partial
        (out / PARTIAL).unlink()
        found = found.iloc[keep]
    with atomic_path(out / INDEX) as tmp:
        found.to_csv(tmp, index=False)
    with atomic_path(out / FAILED) as tmp:
        pd.DataFrame(failures, columns=["Image Index", "path", "reason"]).to_csv(tmp, index=False)
    meta = {
        "format": FORMAT,
        "size": size,
        "count": int(done.sum()),
        "failed": len(failures),
        "dtype": "uint8",
        "resize": "PIL Lanczos",
        "data_dir": str(data_dir.resolve()),
        **source,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "cxrdx_version": __version__,
        "plan": plan,
    }
    marker = read_source_marker(data_dir)
    if marker is not None:  # synthetic images say so all the way to the model card
        meta["data_source"] = marker
    write_text(out / META, json.dumps(meta, indent=2) + "\n")
    (out / DONE).unlink(missing_ok=True)
    (out / PLAN).unlink(missing_ok=True)


def _existing_result(out: Path, plan: dict) -> PrepareResult:
    """The result of the complete cache in `out` when it was prepared from the same images at the same size."""
    cache = open_cache(out)
    if (cache.size, cache.meta.get("plan")) != (plan["size"], plan):
        raise CxrdxError(
            f"{out}: already holds a complete cache of other images or size ({len(cache)} images at {cache.size} px, "
            f"asked for {plan['count']} found images at {plan['size']} px); delete it or choose another --out"
        )
    failed = pd.read_csv(out / FAILED, dtype=str, keep_default_na=False) if (out / FAILED).is_file() else None
    pairs = [] if failed is None else list(zip(failed["Image Index"], failed["reason"]))
    return PrepareResult(prepared=len(cache), failed=pairs, path=out)


def _read_index(path: Path) -> pd.DataFrame:
    try:
        index = pd.read_csv(path, dtype={"Image Index": str, "Finding Labels": str, "path": str}, keep_default_na=False)
    except (OSError, pd.errors.ParserError) as exc:
        raise CxrdxError(f"{path}: unreadable cache index ({exc})") from None
    missing = [c for c in ("Image Index", "Patient ID", *FINDINGS) if c not in index.columns]
    if missing:
        raise CxrdxError(f"{path}: cache index lacks columns {', '.join(missing)}")
    # blank = not labelled (NaN); caches of ChestX-ray14 alone hold 0/1 only
    labels = index[list(FINDINGS)].apply(pd.to_numeric, errors="coerce").astype(np.float32)
    bad = ~(labels.isin((0.0, 1.0)) | (index[list(FINDINGS)] == "")).to_numpy()
    if bad.any():
        row, column = np.argwhere(bad)[0]
        raise CxrdxError(
            f"{path}: line {row + 2}: {FINDINGS[column]} {index.iat[row, index.columns.get_loc(FINDINGS[column])]!r}; expected 1, 0 or blank"
        )
    index[list(FINDINGS)] = labels
    if "Patient Age" in index.columns:
        index["Patient Age"] = pd.to_numeric(index["Patient Age"], errors="coerce")
    return index


def _progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="prepare", disable=not enabled, dynamic_ncols=True)
