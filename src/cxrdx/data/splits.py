"""Train/val/test splits (random, patient-wise, official, imported), leakage report, the paper's Table 1."""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from cxrdx.atomic import atomic_path
from cxrdx.data import packaged
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS

SPLITS = ("train", "val", "test")
STRATEGIES = ("random", "patient", "official")
OFFICIAL_LISTS = ("train_val_list.txt", "test_list.txt")
BUILTIN_SPLITS = {"paper": packaged.paper_split}  # names accepted wherever a split file is
LABEL_COUNT_ROWS = ("0", "1", "2", "3", ">=4")
_YAML_NAME = re.compile(r"^(?P<prefix>.*)(?P<split>train|val|test)(?P<suffix>\.ya?ml)$")


def make_split(
    index: pd.DataFrame,
    strategy: str = "patient",
    ratios: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    lists_dir: str | Path | None = None,
) -> pd.Series:
    """Assign every image of `index` to train / val / test.

    random: image-level, as in the paper (one patient's images can land in several splits).
    patient: no patient in two splits, stratified by finding: every finding gets positives in
    each split where it has enough patients, and image fractions follow `ratios` (see
    _patient_split). Deterministic for a seed.
    official: NIH's train_val_list.txt / test_list.txt (plain or .gz) from `lists_dir`, by default
    the lists shipped with cxrdx; validation is carved out of train_val by patient, stratified,
    with the share ratios[1] / (ratios[0] + ratios[1]).
    """
    fractions = _check_ratios(ratios)
    rng = np.random.default_rng(seed)
    if strategy == "random":
        labels = _random_split(len(index), fractions, rng)
    elif strategy == "patient":
        labels = _patient_split(index["Patient ID"].to_numpy(), _findings(index), fractions, rng)
    elif strategy == "official":
        labels = _official_split(index, fractions, rng, lists_dir)
    else:
        raise CxrdxError(f"unknown split strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    return _series(index["Image Index"].to_numpy(), labels)


def read_split(path: str | Path, index: pd.DataFrame | None = None) -> pd.Series:
    """A split file -> Series (index "Image Index", values train/val/test).

    Reads the CSV `Image Index,split`, or the paper code release's YAML lists (a folder or one of
    the three files, see import_split), or a built-in split name (see resolve_split_file).
    With `index`, names that are not in it are an error.
    """
    path = resolve_split_file(path)
    if path.is_dir() or path.suffix.lower() in (".yaml", ".yml"):
        split = import_split(path)
    else:
        split = _read_split_csv(path)
    if index is not None:
        _join(index, split, source=path)
    return split


def resolve_split_file(name_or_path: str | Path) -> Path:
    """A built-in split name -> its packaged file ("paper": the paper's exact split); anything else is a path.

    The name wins over a file of the same name in the working folder; write ./paper for that file.
    """
    builtin = BUILTIN_SPLITS.get(str(name_or_path))
    return builtin() if builtin is not None else Path(name_or_path)


def import_split(path: str | Path) -> pd.Series:
    """The YAML lists of the paper's code release (NIH_multi_{train,val,test}.yaml) -> split Series.

    `path` is their folder or any one of the three files; each file holds
    `data: [{file_name: 00012562_001.png, label: [...], path: ...}, ...]`.
    """
    files = _yaml_files(Path(path))
    names, labels = [], []
    for split, file in files.items():
        entries = _load_yaml_list(file)
        names += entries
        labels += [split] * len(entries)
    return _validated(_series(np.asarray(names, dtype=object), np.asarray(labels, dtype=object)), source=path)


def write_split(split: pd.Series, path: str | Path) -> Path:
    """Write the split file `Image Index,split` atomically (gzip when the name ends in .gz)."""
    path = Path(path)
    split = _validated(split, source=path)
    table = pd.DataFrame({"Image Index": split.index.to_numpy(), "split": split.to_numpy()})
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, compression="gzip" if path.suffix == ".gz" else None)
    return path


def leakage_report(index: pd.DataFrame, split: pd.Series) -> dict[str, int]:
    """How many val and test images belong to a patient who also has images in train."""
    return _leakage(_join(index, split))


def split_summary(index: pd.DataFrame, split: pd.Series) -> dict[str, dict[str, float]]:
    """Per split: images, patients and the image fraction of the whole."""
    frame = _join(index, split)
    total = max(len(frame), 1)
    summary = {}
    for name in SPLITS:
        part = frame.loc[frame["split"] == name]
        summary[name] = {
            "images": len(part),
            "patients": int(part["Patient ID"].nunique()),
            "fraction": len(part) / total,
        }
    return summary


def table1(index: pd.DataFrame, split: pd.Series) -> dict:
    """The paper's Table 1 counts for each split and all images of the split, plus the leakage report.

    {"splits": {"train"|"val"|"test"|"all": {"images": int, "findings": {name: int},
    "label_counts": {"0", "1", "2", "3", ">=4": int}}}, "leakage": leakage_report(...)}
    """
    frame = _join(index, split)
    labels = _findings(frame)
    per_image = np.minimum(labels.sum(axis=1), len(LABEL_COUNT_ROWS) - 1)
    names = frame["split"].to_numpy()

    def counts(mask: np.ndarray) -> dict:
        return {
            "images": int(mask.sum()),
            "findings": {f: int(c) for f, c in zip(FINDINGS, labels[mask].sum(axis=0))},
            "label_counts": {row: int(c) for row, c in zip(LABEL_COUNT_ROWS, np.bincount(per_image[mask], minlength=5))},
        }

    splits = {name: counts(names == name) for name in SPLITS}
    splits["all"] = counts(np.ones(len(frame), dtype=bool))
    return {"splits": splits, "leakage": _leakage(frame)}


def format_table1(table: dict, fmt: str = "md") -> str:
    """Table 1 as markdown (count/total (%) cells like the paper), CSV (numbers) or JSON."""
    if fmt == "json":
        return json.dumps(table, indent=2) + "\n"
    if fmt not in ("md", "csv"):
        raise CxrdxError(f"unknown table format {fmt!r}; expected md, csv or json")
    splits, columns = table["splits"], [*SPLITS, "all"]
    # (section, key in each split's dict, row name)
    rows = [("finding", "findings", f) for f in FINDINGS]
    rows += [("labels_per_image", "label_counts", k) for k in LABEL_COUNT_ROWS]
    if fmt == "csv":
        header = ["section", "row"] + [f"{c}_{part}" for c in columns for part in ("count", "total", "percent")]
        lines = [",".join(header)]
        for section, key, row in rows:
            cells = [section, row]
            for c in columns:
                count, total = splits[c][key][row], splits[c]["images"]
                cells += [str(count), str(total), f"{_percent(count, total):.1f}" if total else ""]
            lines.append(",".join(cells))
        return "\n".join(lines) + "\n"

    everything = splits["all"]["images"]
    titles = {"train": "Train", "val": "Validation", "test": "Test"}
    head = [f"{titles[c]} ({_percent(splits[c]['images'], everything):.0f}%)" for c in SPLITS] + ["Total"]
    lines = ["| | " + " | ".join(head) + " |", "|---" * (len(columns) + 1) + "|"]
    section_titles = {"finding": "**Labels**", "labels_per_image": "**Findings per image**"}
    row_titles = {"0": "0 (No Finding)", ">=4": "≥4"}
    current = None
    for section, key, row in rows:
        if section != current:
            lines.append(f"| {section_titles[section]} |" + " |" * len(columns))
            current = section
        cells = [_cell(splits[c][key][row], splits[c]["images"]) for c in columns]
        lines.append(f"| {row_titles.get(row, row)} | " + " | ".join(cells) + " |")
    leak = table["leakage"]
    lines += [
        "",
        f"Leakage: {leak['val_images_with_train_patient']:,} validation and "
        f"{leak['test_images_with_train_patient']:,} test images belong to a patient with images in train.",
    ]
    return "\n".join(lines) + "\n"


def _percent(count: int, total: int) -> float:
    return 100.0 * count / total if total else 0.0


def _cell(count: int, total: int) -> str:
    return f"{count:,}/{total:,} ({_percent(count, total):.1f}%)" if total else f"{count:,}/0"


def _check_ratios(ratios: Sequence[float]) -> np.ndarray:
    fractions = np.asarray(list(ratios), dtype=np.float64)
    if fractions.shape != (3,) or np.any(fractions < 0) or fractions[0] <= 0 or abs(fractions.sum() - 1) > 1e-6:
        raise CxrdxError(
            f"split ratios {list(ratios)}: expected three non-negative fractions for train, val, test "
            "summing to 1, with train > 0 (e.g. 0.7 0.1 0.2)"
        )
    return fractions


def _series(names: np.ndarray, labels: np.ndarray) -> pd.Series:
    return pd.Series(labels, index=pd.Index(names, name="Image Index"), name="split", dtype=object)


def _random_split(n: int, fractions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    bounds = np.round(np.cumsum(fractions) * n).astype(np.int64)
    position = np.empty(n, dtype=np.int64)
    position[rng.permutation(n)] = np.arange(n)
    return np.asarray(SPLITS, dtype=object)[np.searchsorted(bounds, position, side="right")]


def _findings(index: pd.DataFrame) -> np.ndarray:
    missing = [f for f in FINDINGS if f not in index.columns]
    if missing:
        raise CxrdxError(f"the patient split needs the finding columns of the metadata; missing {', '.join(missing)}")
    return (index[list(FINDINGS)] == 1).to_numpy(dtype=np.int64)  # positives; NaN (not labelled) is not one


def _patient_split(patients: np.ndarray, labels: np.ndarray, fractions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Whole patients to train / val / test, stratified by finding.

    Iterative multi-label stratification (Sechidis, Tsoumakas & Vlahavas 2011) with patients in
    place of samples: take the finding with the fewest positive images among unassigned patients,
    give each of its patients (largest first, seeded tie order) to the split that has none of it
    yet, else to the split that most lacks it, else to the split that most lacks images. Patients
    without findings then fill each split towards its share of images.
    """
    ids, inverse, sizes = np.unique(patients, return_inverse=True, return_counts=True)
    counts = np.stack([np.bincount(inverse, weights=labels[:, j], minlength=len(ids)) for j in range(labels.shape[1])], axis=1)
    order = rng.permutation(len(ids))
    order = order[np.argsort(-sizes[order], kind="stable")]
    rank = np.empty(len(ids), dtype=np.int64)
    rank[order] = np.arange(len(ids))
    tie = rng.random((len(ids), 3))

    splits = [k for k in range(3) if fractions[k] > 0]
    want_images = (fractions * len(patients)).tolist()
    want_labels = fractions[:, None] * counts.sum(axis=0)[None, :]  # (3, findings) positive images still wanted
    have_labels = np.zeros_like(want_labels)
    choice = np.full(len(ids), -1, dtype=np.int64)
    filled = [0.0, 0.0, 0.0]

    def give(patient: int, k: int) -> None:
        choice[patient] = k
        filled[k] += sizes[patient]
        have_labels[k] += counts[patient]
        want_labels[k] -= counts[patient]

    while True:
        open_ = choice < 0
        remaining = counts[open_].sum(axis=0)
        if not remaining.any():
            break
        finding = int(np.argmin(np.where(remaining > 0, remaining, np.inf)))
        members = np.flatnonzero(open_ & (counts[:, finding] > 0))
        for patient in members[np.argsort(rank[members])].tolist():
            lacking, wanted = have_labels[:, finding] == 0, want_labels[:, finding]
            give(patient, max(splits, key=lambda k: (lacking[k], wanted[k], want_images[k] - filled[k], tie[patient, k])))

    rest = np.flatnonzero(choice < 0)
    for patient in rest[np.argsort(rank[rest])].tolist():
        give(patient, min(splits, key=lambda k: (filled[k] / want_images[k], tie[patient, k])))
    return np.asarray(SPLITS, dtype=object)[choice[inverse]]


def _official_split(index: pd.DataFrame, fractions: np.ndarray, rng: np.random.Generator, lists_dir: str | Path | None) -> np.ndarray:
    files = packaged.official_lists() if lists_dir is None else tuple(_list_file(Path(lists_dir), n) for n in OFFICIAL_LISTS)
    train_val, test = (set(_read_list(file)) for file in files)
    where = lists_dir if lists_dir is not None else "the packaged official lists"
    names = index["Image Index"]
    in_train_val, in_test = names.isin(train_val).to_numpy(), names.isin(test).to_numpy()
    for mask, problem in ((in_train_val & in_test, "in both lists"), (~(in_train_val | in_test), "in neither list")):
        if mask.any():
            raise CxrdxError(
                f"{where}: {int(mask.sum())} images of the metadata are {problem} "
                f"({', '.join(OFFICIAL_LISTS)}); first: {', '.join(names[mask][:3])}"
            )
    labels = np.where(in_test, "test", "train").astype(object)
    val_share = fractions[1] / (fractions[0] + fractions[1])
    rows = np.flatnonzero(in_train_val)
    labels[rows] = _patient_split(
        index["Patient ID"].to_numpy()[rows], _findings(index)[rows], np.array([1 - val_share, val_share, 0.0]), rng
    )
    return labels


def _list_file(folder: Path, name: str) -> Path:
    """`folder/name`, or its gzipped copy when only that exists."""
    plain = folder / name
    packed = folder / f"{name}.gz"
    return packed if packed.is_file() and not plain.is_file() else plain


def _read_list(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
        text = (gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8")
    except FileNotFoundError:
        raise CxrdxError(f"{path}: no such file (the official split lists come with ChestX-ray14)") from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise CxrdxError(f"{path}: not a readable list of image names ({exc})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_split_csv(path: Path) -> pd.Series:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise CxrdxError(f"{path}: no such file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise CxrdxError(f"{path}: not a readable split CSV ({exc})") from None
    table.columns = [str(c).strip() for c in table.columns]
    if not {"Image Index", "split"} <= set(table.columns):
        raise CxrdxError(f"{path}: expected the columns 'Image Index,split'; found {', '.join(map(repr, table.columns))}")
    split = _series(table["Image Index"].str.strip().to_numpy(), table["split"].str.strip().to_numpy())
    return _validated(split, source=path, first_line=2)


def _validated(split: pd.Series, source: str | Path | None = None, first_line: int | None = None) -> pd.Series:
    """Check values and duplicates; errors name the file and, for CSV input, the line."""
    where = f"{source}: " if source is not None else "split: "

    def at(row: int) -> str:
        return f"line {row + first_line}: " if first_line is not None else ""

    bad = ~split.isin(SPLITS).to_numpy()
    if bad.any():
        row = int(np.argmax(bad))
        raise CxrdxError(f"{where}{at(row)}split {split.iloc[row]!r} for {split.index[row]!r}; expected one of {', '.join(SPLITS)}")
    empty = split.index == ""
    if empty.any():
        raise CxrdxError(f"{where}{at(int(np.argmax(empty)))}empty Image Index")
    repeated = split.index.duplicated()
    if repeated.any():
        row = int(np.argmax(repeated))
        raise CxrdxError(f"{where}{at(row)}Image Index {split.index[row]!r} appears more than once")
    return split


def _join(index: pd.DataFrame, split: pd.Series, source: str | Path | None = None) -> pd.DataFrame:
    """The rows of `index` that the split names, with a "split" column; unknown names are an error."""
    split = _validated(split, source=source)
    names = index["Image Index"]
    unknown = ~split.index.isin(names)
    if unknown.any():
        where = f"{source}: " if source is not None else ""
        raise CxrdxError(
            f"{where}{int(unknown.sum())} images of the split are not in the metadata; first: {', '.join(split.index[unknown][:3])}"
        )
    assigned = names.map(split)
    return index.loc[assigned.notna().to_numpy()].assign(split=assigned.dropna())


def _leakage(frame: pd.DataFrame) -> dict[str, int]:
    train_patients = frame.loc[frame["split"] == "train", "Patient ID"].unique()
    shared = frame["Patient ID"].isin(train_patients).to_numpy()
    names = frame["split"].to_numpy()
    return {
        "val_images_with_train_patient": int((shared & (names == "val")).sum()),
        "test_images_with_train_patient": int((shared & (names == "test")).sum()),
    }


def _yaml_files(path: Path) -> dict[str, Path]:
    expected = ", ".join(f"NIH_multi_{s}.yaml" for s in SPLITS)
    if path.is_dir():
        stems = {(m["prefix"], m["suffix"]) for m in map(_YAML_NAME.match, sorted(p.name for p in path.iterdir())) if m}
        if len(stems) != 1:
            raise CxrdxError(f"{path}: expected one set of three YAML split lists like {expected}")
        (prefix, suffix), folder = stems.pop(), path
    else:
        match = _YAML_NAME.match(path.name)
        if not match:
            raise CxrdxError(f"{path}: a YAML split list must be named like {expected}")
        prefix, suffix, folder = match["prefix"], match["suffix"], path.parent
    files = {s: folder / f"{prefix}{s}{suffix}" for s in SPLITS}
    absent = [str(f) for f in files.values() if not f.is_file()]
    if absent:
        raise CxrdxError(f"missing YAML split list(s): {', '.join(absent)} (all three of {expected} are needed)")
    return files


def _load_yaml_list(path: Path) -> list[str]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader reads the 78k-entry lists in seconds
    try:
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CxrdxError(f"{path}: not readable YAML ({exc})") from None
    entries = document.get("data") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise CxrdxError(f"{path}: expected a top-level 'data:' list of entries with file_name")
    names = []
    for number, entry in enumerate(entries, start=1):
        name = entry.get("file_name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise CxrdxError(f"{path}: entry {number} of 'data' has no file_name")
        names.append(name.strip())
    return names
