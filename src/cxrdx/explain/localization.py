"""Where the model looks, as numbers: pointing game and IoU of saliency maps against boxes.

Boxes are the NIH `BBox_List_2017.csv` layout (Image Index, Finding Label, x, y, w, h in pixels of
the original image; the phantoms write the same file in their own pixel size). They are scaled to
the model input, which is the original image stretched to a square (resize_square, then Resize).
A pixel (row r, column c) covers [c, c+1) x [r, r+1); it belongs to a box when its centre does.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from cxrdx import rundir
from cxrdx.atomic import write_text
from cxrdx.data.packaged import nih_boxes
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS
from cxrdx.preprocess import XRV

if TYPE_CHECKING:
    from cxrdx.data.cache import Cache
    from cxrdx.predict import Predictor

BOX_FIELDS = ("x", "y", "w", "h")
BOX_FILES = ("BBox_List_2017.csv", "BBox_List_2017.csv.gz")
FINDING_ALIASES = {"Infiltrate": "Infiltration"}  # the NIH box file's spelling
NIH_SIZE = 1024  # side of the images the NIH boxes refer to
THRESHOLD_MODES = ("relative", "top")


def box_file(boxes: str | Path | None, data_dir: str | Path | None = None) -> str | Path:
    """`boxes` as given, else the box file in `data_dir`, else NIH's box file shipped with cxrdx."""
    if boxes is None and data_dir:
        boxes = next((p for p in (Path(data_dir) / n for n in BOX_FILES) if p.is_file()), None)
    return nih_boxes() if boxes is None else boxes


def boxes_in_split(boxes: pd.DataFrame, split: pd.Series, name: str) -> pd.DataFrame:
    """The boxes of the images that `split` (Image Index -> split name, as read_split gives) puts in `name`."""
    return boxes[boxes["Image Index"].isin(split.index[split.to_numpy() == name])]


def read_boxes(path: str | Path) -> pd.DataFrame:
    """Columns "Image Index", "Finding", x, y, w, h (float), one row per box; .csv or .csv.gz."""
    path = Path(path)
    if not path.is_file():
        raise CxrdxError(f"{path}: box file not found")
    try:
        table = pd.read_csv(path, header=0, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError) as exc:
        raise CxrdxError(f"{path}: not a readable CSV ({exc})") from None
    if table.shape[1] < 6 or list(table.columns[:2]) != ["Image Index", "Finding Label"]:
        raise CxrdxError(
            f"{path}: expected the columns Image Index, Finding Label, Bbox [x, y, w, h]; found {', '.join(map(str, table.columns[:6]))}"
        )
    boxes = pd.DataFrame({"Image Index": table.iloc[:, 0].str.strip()})
    findings = table.iloc[:, 1].str.strip().replace(FINDING_ALIASES)
    unknown = ~findings.isin(FINDINGS)
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise CxrdxError(f"{path}, line {row + 2}: unknown finding {findings.iloc[row]!r}")
    boxes["Finding"] = findings
    for position, name in enumerate(BOX_FIELDS, start=2):
        values = pd.to_numeric(table.iloc[:, position].str.strip(), errors="coerce")
        bad = values.isna() | (values < 0 if name in "xy" else values <= 0)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise CxrdxError(
                f"{path}, line {row + 2}: box {name} = {table.iloc[row, position]!r}; "
                f"expected a {'non-negative' if name in 'xy' else 'positive'} number"
            )
        boxes[name] = values.astype(np.float64)
    return boxes


def scale_boxes(
    boxes: pd.DataFrame,
    source: tuple[int, int] | Mapping[str, tuple[int, int]],
    target: tuple[int, int],
) -> pd.DataFrame:
    """Boxes from source image pixels (width, height; one size or one per Image Index) to `target` (width, height)."""
    if isinstance(source, Mapping):
        missing = sorted(set(boxes["Image Index"]) - set(source))
        if missing:
            raise CxrdxError(f"no image size for {len(missing)} boxed image(s), e.g. {', '.join(missing[:3])}")
        sizes = np.array([source[name] for name in boxes["Image Index"]], dtype=np.float64)
    else:
        sizes = np.broadcast_to(np.asarray(source, dtype=np.float64), (len(boxes), 2))
    fx, fy = target[0] / sizes[:, 0], target[1] / sizes[:, 1]
    scaled = boxes.copy()
    scaled["x"], scaled["w"] = boxes["x"] * fx, boxes["w"] * fx
    scaled["y"], scaled["h"] = boxes["y"] * fy, boxes["h"] * fy
    return scaled


def box_mask(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) union of boxes (K, 4) x, y, w, h: pixels whose centre lies inside one."""
    rows = np.arange(shape[0]) + 0.5
    cols = np.arange(shape[1]) + 0.5
    mask = np.zeros(shape, dtype=bool)
    for x, y, w, h in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        inside_r = (rows >= y) & (rows < y + h)
        inside_c = (cols >= x) & (cols < x + w)
        mask |= inside_r[:, None] & inside_c[None, :]
    return mask


def peak(saliency: np.ndarray) -> tuple[int, int]:
    """(row, column) of the map's maximum; on a plateau (bilinear upsampling clamps the borders of a
    coarse map into flat regions) the maximal pixel nearest the plateau's centre, not its first corner."""
    rows_cols = np.argwhere(saliency == saliency.max())
    centre = rows_cols.mean(axis=0)
    r, c = rows_cols[np.argmin(((rows_cols - centre) ** 2).sum(axis=1))]
    return int(r), int(c)


def pointing_hit(saliency: np.ndarray, boxes: np.ndarray, tolerance: float = 0.0) -> bool:
    """True when the map's peak pixel centre lies within `tolerance` pixels of a box. A flat map points nowhere: False."""
    if saliency.max() <= saliency.min():
        return False
    r, c = peak(saliency)
    px, py = c + 0.5, r + 0.5
    for x, y, w, h in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        dx = max(x - px, 0.0, px - (x + w))
        dy = max(y - py, 0.0, py - (y + h))
        if np.hypot(dx, dy) <= tolerance:
            return True
    return False


def threshold_map(saliency: np.ndarray, threshold: float = 0.5, mode: str = "relative") -> np.ndarray:
    """Boolean mask: "relative" keeps pixels >= threshold x max; "top" keeps the top `threshold`
    fraction of pixels (ties at the cut included). A flat map gives an empty mask."""
    if mode not in THRESHOLD_MODES:
        raise CxrdxError(f"threshold mode {mode!r}: expected one of {', '.join(THRESHOLD_MODES)}")
    if not 0 < threshold <= 1:
        raise CxrdxError(f"threshold {threshold} must lie in (0, 1]")
    if saliency.max() <= saliency.min():
        return np.zeros(saliency.shape, dtype=bool)
    if mode == "relative":
        return saliency >= threshold * saliency.max()
    keep = max(1, int(round(threshold * saliency.size)))
    cut = np.partition(saliency.ravel(), saliency.size - keep)[saliency.size - keep]
    return saliency >= cut


def box_iou(saliency: np.ndarray, boxes: np.ndarray, threshold: float = 0.5, mode: str = "relative") -> float:
    """IoU of the thresholded map with the union of the boxes."""
    region = threshold_map(saliency, threshold, mode)
    target = box_mask(boxes, saliency.shape)
    union = np.logical_or(region, target).sum()
    return float(np.logical_and(region, target).sum() / union) if union else 0.0


def localize(
    predictor: Predictor,
    images: Iterable[tuple[str, torch.Tensor, tuple[int, int]]],
    boxes: pd.DataFrame,
    methods: Sequence[str] = ("groupcam", "gradcam"),
    threshold: float = 0.5,
    mode: str = "relative",
    tolerance: float = 0.0,
    progress: bool = False,
    total: int | None = None,
    **options: Any,
) -> pd.DataFrame:
    """One row per (image, boxed finding, method): the predictor's probability (its checkpoint's
    temperature applied, as prediction does), hit, iou, flat.

    `images` yields (Image Index, model input (1, C, H, W), (width, height) of the pixels its
    boxes are written in); the boxes are scaled to the input. Boxes of findings the predictor
    does not output are skipped. `options` go to `explain` (groups, batch_size, target_layers).
    """
    from cxrdx.explain.groupcam import explaining
    from cxrdx.explain.registry import FlatSaliencyWarning, explain

    threshold_map(np.ones((1, 2)), threshold, mode)  # reject a bad threshold before any work
    model = predictor.model
    position = {name: i for i, name in enumerate(predictor.findings)}
    wanted = boxes[boxes["Finding"].isin(position)]
    per_image = {name: group for name, group in wanted.groupby("Image Index", sort=False)}
    rows = []
    with tqdm(total=total, desc="localize", unit="img", disable=not progress) as bar, warnings.catch_warnings():
        warnings.simplefilter("ignore", FlatSaliencyWarning)  # counted in the "flat" column
        for name, image, source_size in images:
            bar.update(1)
            if name not in per_image:
                continue
            scaled = scale_boxes(per_image[name], source_size, (image.shape[-1], image.shape[-2]))
            with explaining(model), torch.no_grad():
                logits = model(image.to(next(model.parameters()).device)).float().cpu().numpy()
            probabilities = predictor.probabilities(logits)[0].tolist()
            for finding, group in scaled.groupby("Finding", sort=False):
                xywh = group[list(BOX_FIELDS)].to_numpy()
                for method in methods:
                    saliency = explain(model, image, position[finding], method=method, **options)
                    rows.append(
                        {
                            "Image Index": name,
                            "Finding": finding,
                            "method": method,
                            "probability": probabilities[position[finding]],
                            "hit": pointing_hit(saliency, xywh, tolerance),
                            "iou": box_iou(saliency, xywh, threshold, mode),
                            "flat": bool(saliency.max() <= saliency.min()),
                        }
                    )
    return pd.DataFrame(rows, columns=["Image Index", "Finding", "method", "probability", "hit", "iou", "flat"])


def summarize(records: pd.DataFrame) -> pd.DataFrame:
    """Per method and finding (plus "all"): n, pointing-game hit rate, mean IoU, flat maps."""
    tables = []
    for method, rows in records.groupby("method", sort=False):
        per = rows.groupby("Finding").agg(n=("hit", "size"), pointing_game=("hit", "mean"), iou=("iou", "mean"), flat=("flat", "sum"))
        per.loc["all"] = [len(rows), rows["hit"].mean(), rows["iou"].mean(), rows["flat"].sum()]
        tables.append(per.reset_index().assign(method=method))
    columns = ["method", "Finding", "n", "pointing_game", "iou", "flat"]
    if not tables:
        return pd.DataFrame(columns=columns)
    summary = pd.concat(tables, ignore_index=True)[columns]
    return summary.astype({"n": int, "flat": int})


def markdown_tables(summary: pd.DataFrame, threshold: float, mode: str) -> str:
    """One markdown table per method."""
    cut = f"map >= {threshold:g} x max" if mode == "relative" else f"top {threshold:.0%} of pixels"
    parts = []
    for method, rows in summary.groupby("method", sort=False):
        lines = [f"### {method}", "", f"| finding | n | pointing game | IoU ({cut}) | flat maps |", "|---|---:|---:|---:|---:|"]
        for row in rows.itertuples(index=False):
            lines.append(f"| {row.Finding} | {row.n} | {row.pointing_game:.3f} | {row.iou:.3f} | {row.flat} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_localization(out: str | Path, text: str, summary: pd.DataFrame, records: pd.DataFrame, settings: Mapping[str, object]) -> Path:
    """out/localization.md (the tables), localization.json (`settings` and the "summary" rows), localization_records.csv."""
    out = Path(out)
    write_text(out / rundir.LOCALIZATION_MD, text)
    rundir.write_localization(out, summary, settings)
    write_text(out / rundir.LOCALIZATION_RECORDS, records.to_csv(index=False))
    return out


def boxed_images(
    boxes: pd.DataFrame,
    predictor: Predictor,
    data_dir: str | Path | None = None,
    cache: Cache | None = None,
    box_size: int | None = None,
    limit: int | None = None,
) -> tuple[list[str], Callable[[str], tuple[torch.Tensor, tuple[int, int]]], list[str]]:
    """The boxed images found in `data_dir` or `cache`: (names, load, missing names).

    `load(name)` gives the model input (1, 1, H, W), preprocessed as by `predictor`, and the
    (width, height) of the pixels the boxes refer to: `box_size` when given, else the original
    file's size (read from `data_dir`, or from the cache index's source path when it still
    exists), else the NIH 1024 px.
    """
    from cxrdx.data.cache import resize_square
    from cxrdx.data.imageio import read_image
    from cxrdx.data.metadata import locate_images

    names = list(dict.fromkeys(boxes["Image Index"]))
    fixed = (box_size, box_size) if box_size else None
    if data_dir is not None:
        found, missing = locate_images(pd.DataFrame({"Image Index": names}), data_dir)
        paths = dict(zip(found["Image Index"], found["path"]))

        def load(name: str) -> tuple[torch.Tensor, tuple[int, int]]:
            raw = read_image(paths[name], name=name)
            pixels = predictor.load(raw, name=name)
            return predictor.to_tensor(pixels[None]), fixed or (raw.shape[1], raw.shape[0])

        present = [n for n in names if n in paths]
    elif cache is not None:
        if predictor.info.preprocess == XRV:
            raise CxrdxError(
                f"{predictor.info.model_name} imported from torchxrayvision crops and resizes the original "
                "images (preprocess 'xrv'), not a prepared cache: pass --data-dir DIR"
            )
        rows = {name: i for i, name in enumerate(cache.index["Image Index"])}
        present = [n for n in names if n in rows]
        missing = [n for n in names if n not in rows]
        sources = cache.index["path"] if "path" in cache.index.columns else None

        def load(name: str) -> tuple[torch.Tensor, tuple[int, int]]:
            row = rows[name]
            pixels = resize_square(np.asarray(cache.images[row]), predictor.info.image_size)
            size = fixed
            if size is None and sources is not None and Path(str(sources.iloc[row])).is_file():
                original = read_image(str(sources.iloc[row]), name=name)
                size = (original.shape[1], original.shape[0])
            return predictor.to_tensor(pixels[None]), size or (NIH_SIZE, NIH_SIZE)

    else:
        raise CxrdxError("give the images: a data folder or a prepared cache")
    return present[:limit] if limit else present, load, missing
