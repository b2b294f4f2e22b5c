"""Model cards: what a model is for, what it was trained on, how good it is, for whom, and where it fails.

The sections follow Mitchell et al. 2019, "Model Cards for Model Reporting" (model details, intended
use, factors, metrics, evaluation data, training data, quantitative analyses, ethical considerations,
caveats and recommendations), plus preprocessing, the input guard and provenance. `card_json` adds a
`monai_metadata` block with the keys of a MONAI bundle's `metadata.json`.

A card is built from a checkpoint, the evaluation folders of `cxrdx evaluate` and, when the checkpoint
belongs to a run folder, its config, split and prepared cache (for the split's sizes and its measured
patient leakage). Training writes RUN/card.md and RUN/card.json (`write_run_card`); evaluating
RUN/checkpoints/best.pt adds the evaluation to them (`add_evaluation`); `cxrdx card` writes one anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrdx import __version__, rundir
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS

if TYPE_CHECKING:  # the report reads cards without loading torch
    from cxrdx.checkpoint import Checkpoint

FORMAT = "cxrdx-model-card/1"
NOT_FOR_CLINICAL_USE = "Not for clinical use"
NIH_LICENCE = 'ChestX-ray14: CC0 1.0 (NIH Clinical Center); see the README section "Data licences"'
REFERENCES = [
    "Chen, Wan & Pan 2023: the training recipe cxrdx reproduces (README)",
    "Wang et al. 2017, ChestX-ray8: hospital-scale chest X-ray database and benchmarks (CVPR)",
    "Mitchell et al. 2019, Model Cards for Model Reporting (FAT*)",
]
OUT_OF_SCOPE = [
    "diagnosis, triage, screening or any other decision about a patient's care",
    "lateral views, children, images other than chest radiographs, photographs or screenshots of films",
    "findings beyond the 14, and ruling out disease ('No Finding' is not a negative study)",
    "hospitals, scanners or populations unlike the training data without a local external validation",
]


@dataclass
class ModelDetails:
    name: str
    version: str  # epoch and the first characters of the checkpoint hash
    architecture: str
    findings: list[str]
    epochs: int
    developed_with: str
    licence: str = "Apache-2.0 (the cxrdx code); the weights follow the licence of their training data"
    references: list[str] = field(default_factory=lambda: list(REFERENCES))


@dataclass
class IntendedUse:
    primary: str
    users: str
    out_of_scope: list[str] = field(default_factory=lambda: list(OUT_OF_SCOPE))


@dataclass
class TrainingData:
    source: str
    synthetic: bool
    licence: str
    split_strategy: str
    splits: dict[str, dict[str, float]]  # train / val / test: images, patients, fraction
    leakage: dict[str, int] | None  # val / test images of a patient who is also in train; None: not measured
    leakage_note: str
    label_source: str
    label_noise: str


@dataclass
class Preprocessing:
    input_size: int
    image_size: int  # the square uint8 image the transform starts from (the cache side)
    mean: list[float]
    std: list[float]
    steps: list[str]
    temperature: list[float] | None


@dataclass
class FindingScore:
    finding: str
    auroc: float | None
    low: float | None
    high: float | None
    threshold: float | None
    ece: float | None


@dataclass
class Performance:
    """One evaluation folder of `cxrdx evaluate`."""

    name: str
    folder: str
    kind: str  # internal (the run's own split) | external (other images)
    split: str
    images: int | None
    auroc: float | None  # mean over findings, with its 95% CI
    auroc_low: float | None
    auroc_high: float | None
    macro_f1: float | None
    ece: float | None
    thresholds: str  # how the decision thresholds were chosen
    per_finding: list[FindingScore]
    subgroups: Any = None  # the evaluation's `subgroups` part, as it stored it
    notes: list[str] = field(default_factory=list)


@dataclass
class Provenance:
    checkpoint: str | None
    sha256: str | None
    trained_with_cxrdx: str
    card_written_with_cxrdx: str
    torch_version: str
    python_version: str
    imported: dict[str, Any] | None  # the checkpoint's `provenance` (imported models)
    config: dict[str, Any]


@dataclass
class ModelCard:
    model_details: ModelDetails
    intended_use: IntendedUse
    factors: list[str]
    metrics: list[str]
    evaluations: list[Performance]
    validation: dict[str, Any]  # the checkpoint's validation metrics (model selection, calibration)
    thresholds: dict[str, float]
    training_data: TrainingData
    preprocessing: Preprocessing
    guard: str
    ethical_considerations: list[str]
    caveats: list[str]
    not_for_clinical_use: list[str]  # the reasons; empty when none applies
    provenance: Provenance
    created: str


# --- building ----------------------------------------------------------------------------------------


def build_card(
    checkpoint: str | Path | Checkpoint,
    evaluations: Sequence[rundir.EvalMetrics | str | Path] = (),
    run_dir: str | Path | None = None,
) -> ModelCard:
    """The card of a checkpoint (a file, or a loaded Checkpoint: then without a file hash), with the results of
    `evaluations` (evaluation folders or their metrics) and, given `run_dir`, its split and measured leakage."""
    from cxrdx.checkpoint import Checkpoint, load_checkpoint

    path = None if isinstance(checkpoint, Checkpoint) else Path(checkpoint)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    sha = _sha256(path) if path is not None else None
    imported = _mapping_or_none(getattr(ckpt, "provenance", None))
    training = _training_data(ckpt, Path(run_dir) if run_dir is not None else None, imported)
    performances = [_performance(e, _training_caches(ckpt)) for e in evaluations]
    guard = _guard_setting(getattr(ckpt, "guard", None))
    reasons = _clinical_reasons(training, performances)
    name = str(ckpt.config.get("name") or ckpt.model_name) if isinstance(ckpt.config, dict) else ckpt.model_name
    return ModelCard(
        model_details=ModelDetails(
            name=name,
            version=f"epoch {ckpt.epoch}" + (f", sha256 {sha[:12]}" if sha else ""),
            architecture=ckpt.model_name,
            findings=list(ckpt.findings),
            epochs=int(ckpt.epoch),
            developed_with="imported into cxrdx" if imported else "trained with cxrdx",
        ),
        intended_use=IntendedUse(
            primary=(
                "Research on the automatic labelling of 14 findings on frontal (PA or AP) chest radiographs of adults: "
                "reproducing and comparing training methods, and studying where models look."
            ),
            users="Machine-learning researchers and engineers; clinicians only as research collaborators.",
        ),
        factors=_factors(performances),
        metrics=[
            "AUROC per finding with its 95% DeLong confidence interval, and the mean over findings",
            "at the decision thresholds: accuracy, macro precision, recall and F1, exact-match accuracy",
            "calibration: expected calibration error (ECE, 10 bins) per finding",
            "patient-level bootstrap intervals when `cxrdx evaluate --bootstrap N` ran",
        ],
        evaluations=performances,
        validation=_plain(dict(ckpt.val_metrics or {})),
        thresholds={f: float(t) for f, t in zip(ckpt.findings, ckpt.thresholds)},
        training_data=training,
        preprocessing=_preprocessing(ckpt),
        guard=guard,
        ethical_considerations=_ethics(training),
        caveats=_caveats(training, performances, guard),
        not_for_clinical_use=reasons,
        provenance=Provenance(
            checkpoint=str(path) if path is not None else None,
            sha256=sha,
            trained_with_cxrdx=ckpt.cxrdx_version,
            card_written_with_cxrdx=__version__,
            torch_version=_torch_version(),
            python_version=platform.python_version(),
            imported=imported,
            config=_plain(dict(ckpt.config or {})),
        ),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def _mapping_or_none(value: Any) -> dict[str, Any] | None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return _plain(dict(value)) if isinstance(value, dict) and value else None


def _plain(value: Any) -> Any:
    """JSON-ready: numpy numbers as Python numbers, NaN and infinities as None, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _training_caches(ckpt: Checkpoint) -> list[str]:
    """The prepared cache(s) the model was trained on (data.caches, else data.cache)."""
    return ckpt.training_caches()


def _cache_meta_and_index(caches: list[str]) -> tuple[dict[str, Any], Any]:
    """The training cache's meta.json (several caches: theirs together) and index, or ({}, None) when not here."""
    if not caches or not all(Path(c).is_dir() for c in caches):
        return {}, None
    from cxrdx.data.cache import open_caches

    try:
        opened = open_caches(caches)
    except CxrdxError:
        return {}, None
    return dict(opened.meta), opened.index


def _training_data(ckpt: Checkpoint, run_dir: Path | None, imported: dict[str, Any] | None) -> TrainingData:
    if imported is not None:
        source = ", ".join(f"{k}: {v}" for k, v in imported.items() if isinstance(v, (str, int, float)))
        return TrainingData(
            source=f"as published upstream ({source})",
            synthetic=False,
            licence="see the upstream model's terms and its training data's licences",
            split_strategy="the upstream publisher's",
            splits={},
            leakage=None,
            leakage_note="not measured: the training images are not part of the import",
            label_source="the upstream training datasets' labels (mostly text-mined from radiology reports)",
            label_noise="text-mined labels disagree with the images for a part of the studies; see the upstream model's documentation",
        )
    caches = _training_caches(ckpt)
    meta, index = _cache_meta_and_index(caches)
    marker = ckpt.config.get("data_source") if isinstance(ckpt.config, dict) else None
    marker = marker if isinstance(marker, dict) else meta.get("data_source")
    synthetic = bool(isinstance(marker, dict) and marker.get("synthetic"))
    dataset = meta.get("dataset") if isinstance(meta.get("dataset"), str) else None
    if synthetic and isinstance(marker, dict):
        source = f"{marker.get('name', 'synthetic images')}: synthetic radiographs ({marker.get('images', '?')} images, seed {marker.get('seed', '?')})"
        licence = "generated by cxrdx: no third-party images"
        labels, noise = "planted by the generator with each image", "none: the labels are exact by construction"
    elif dataset not in (None, "nih"):
        source, licence = f"dataset {dataset!r} (prepared cache {', '.join(caches)})", 'see the dataset\'s terms (README "Data licences")'
        labels, noise = (
            "the dataset's own labels, mapped to the 14 findings",
            "see the dataset's documentation; report-mined labels are noisy",
        )
    else:
        source = f"ChestX-ray14 layout (NIH Clinical Center), prepared cache {', '.join(caches) or 'unknown'}"
        licence = NIH_LICENCE
        labels = "text-mined from the radiology reports by NLP (Wang et al. 2017), not read from the images"
        noise = (
            "the NLP labels were reported about 90% accurate on the authors' samples, and later visual audits found many "
            "labels that disagree with the images; AUROC against them bounds, not measures, agreement with radiologists"
        )
    strategy, splits, leakage, note = _split_facts(ckpt, run_dir, index)
    return TrainingData(source, synthetic, licence, strategy, splits, leakage, note, labels, noise)


def _split_facts(ckpt: Checkpoint, run_dir: Path | None, index: Any) -> tuple[str, dict[str, dict[str, float]], dict[str, int] | None, str]:
    """(split strategy, sizes per split, leakage, a note on how leakage was measured)."""
    data = ckpt.config.get("data", {}) if isinstance(ckpt.config, dict) else {}
    seed = ckpt.config.get("seed") if isinstance(ckpt.config, dict) else None
    strategy = f"split file {data['split_file']}" if data.get("split_file") else f"patient-wise 70/10/20 split (seed {seed})"
    split_file = rundir.split_path(run_dir) if run_dir is not None else None
    if split_file is None or not split_file.is_file():
        return strategy, {}, None, "not measured: no run folder with its split.csv"
    if index is None:
        return strategy, {}, None, f"not measured: the prepared cache {data.get('cache')} is not here"
    from cxrdx.data.splits import leakage_report, read_split, split_summary

    try:
        split = read_split(split_file)
        return strategy, split_summary(index, split), leakage_report(index, split), f"measured on {split_file} and the cache's Patient IDs"
    except CxrdxError as exc:
        return strategy, {}, None, f"not measured: {exc}"


def _preprocessing(ckpt: Checkpoint) -> Preprocessing:
    size = int(ckpt.cache_size or ckpt.input_size)
    steps = [
        "decode to 8-bit greyscale (PNG, JPEG; DICOM with its VOI LUT or window)",
        f"resize to {size} x {size} px (the prepared cache's side; Lanczos)",
        f"resize to the network input {ckpt.input_size} x {ckpt.input_size} px",
        "scale to [0, 1] and normalise with the training images' mean and standard deviation",
    ]
    if ckpt.temperature is not None:
        steps.append("divide each finding's logit by its temperature (fitted by `cxrdx calibrate`)")
    return Preprocessing(
        int(ckpt.input_size),
        size,
        [float(m) for m in ckpt.mean],
        [float(s) for s in ckpt.std],
        steps,
        None if ckpt.temperature is None else [float(t) for t in ckpt.temperature],
    )


def _performance(evaluation: rundir.EvalMetrics | str | Path, training_caches: list[str]) -> Performance:
    folder = "" if isinstance(evaluation, rundir.EvalMetrics) else str(evaluation)
    if not isinstance(evaluation, rundir.EvalMetrics):
        if not (Path(evaluation) / rundir.METRICS).is_file():
            raise CxrdxError(f"{evaluation}: not an evaluation folder (no {rundir.METRICS}); run `cxrdx evaluate --out {evaluation}`")
        evaluation = rundir.read_eval_metrics(evaluation)
    settings, overall = evaluation.settings, evaluation.overall
    split = str(settings.get("split", "unknown"))
    auroc, f1 = (overall[k] if isinstance(overall.get(k), dict) else {} for k in ("auroc", "macro_f1"))
    per = evaluation.per_finding
    scores = [
        FindingScore(f, *(_number((per.get(f) or {}).get(k)) for k in ("auroc", "auroc_low", "auroc_high", "threshold", "ece")))
        for f in FINDINGS
        if f in per
    ]
    return Performance(
        name=str(settings.get("name") or Path(folder).name or "evaluation"),
        folder=folder,
        kind=_kind(settings, training_caches),
        split=split,
        images=int(overall["images"]) if isinstance(overall.get("images"), int) else None,
        auroc=_number(auroc.get("mean")),
        auroc_low=_number(auroc.get("low")),
        auroc_high=_number(auroc.get("high")),
        macro_f1=_number(f1.get("mean")),
        ece=_number(overall.get("ece")),
        thresholds=str(settings.get("thresholds", "unknown")),
        per_finding=scores,
        subgroups=_plain(evaluation.extra.get("subgroups")),
        notes=list(evaluation.notes),
    )


def _kind(settings: dict[str, Any], training_caches: list[str]) -> str:
    """internal: the run's own split, or every image of its training data; external: all images of other data.
    An evaluation that names no data counts as internal: only a known other source is external validation."""
    if settings.get("external") is True:
        return "external"
    data = next((settings[k] for k in ("data", "data_dir", "cache") if settings.get(k)), None)
    if settings.get("split") != "all" or data is None:
        return "internal"
    same = Path(str(data)).resolve() in {Path(c).resolve() for c in training_caches}
    return "internal" if same else "external"


def _guard_setting(guard: Any) -> str:
    from cxrdx.ood import OodGuard  # here: reading a card must not load torch

    if isinstance(guard, OodGuard):
        return guard.describe()
    if guard is None or guard is False or guard == {}:
        return "off: the model scores any image it is given, chest radiograph or not"
    if dataclasses.is_dataclass(guard) and not isinstance(guard, type):
        guard = dataclasses.asdict(guard)
    if isinstance(guard, dict):
        return "on: " + ", ".join(f"{k} {v}" for k, v in guard.items() if isinstance(v, (str, int, float, bool)))
    return f"on: {guard}"


def _factors(performances: list[Performance]) -> list[str]:
    evaluated = [p.name for p in performances if p.subgroups]
    factors = ["patient sex, age band and view position (PA / AP); dataset, hospital and scanner"]
    factors.append(
        f"subgroup results: in {', '.join(evaluated)}"
        if evaluated
        else "subgroup results: not evaluated (evaluate images with sex, age and view columns for the subgroup tables)"
    )
    return factors


def _clinical_reasons(training: TrainingData, performances: list[Performance]) -> list[str]:
    reasons = []
    if training.synthetic:
        reasons.append("trained on synthetic phantoms, not on radiographs of patients")
    if not any(p.kind == "external" for p in performances):
        reasons.append("no external validation (no evaluation on images from another hospital or dataset)")
    return reasons


def _ethics(training: TrainingData) -> list[str]:
    items = [
        "no prospective or reader study: nothing here shows that the model helps patients or radiologists",
        (
            "models trained on one hospital's archive learn its population, scanners and shortcuts (chest drains for "
            "pneumothorax, text markers); their errors are not evenly spread over patient groups"
        ),
        "uploads to `cxrdx serve` are processed in memory and not stored; DICOM patient fields never reach a response or the log",
    ]
    if not training.synthetic:
        items.insert(0, "the training images are de-identified public data; their labels come from reports, not from the images")
    return items


def _caveats(training: TrainingData, performances: list[Performance], guard: str) -> list[str]:
    items = []
    if training.synthetic:
        items.append("trained and evaluated on synthetic phantoms: its numbers say nothing about real radiographs")
    if training.leakage and any(training.leakage.values()):
        items.append(f"patient leakage between train and val/test: {training.leakage}; the internal scores are optimistic")
    if not performances:
        items.append("no evaluation yet: run `cxrdx evaluate` and rebuild the card")
    elif not any(p.kind == "external" for p in performances):
        items.append("only internal evaluation (the run's own split): expect lower scores on other hospitals' images")
    if guard.startswith("off"):
        items.append("no input guard: a photograph or a non-chest image still gets 14 probabilities")
    for p in performances:
        items += [f"{p.name}: {n}" for n in p.notes]
    items.append("choose the decision thresholds for the intended operating point (`cxrdx calibrate`) before any use")
    return items


# --- the run folder's card -----------------------------------------------------------------------------


def run_evaluations(run_dir: str | Path) -> list[Path]:
    """The evaluation folders a run's card covers: those its card.json lists that still exist, RUN/eval and RUN/eval-NAME."""
    run_dir = Path(run_dir)
    stored = rundir.read_card(run_dir) or {}
    listed = [Path(str(e.get("folder"))) for e in stored.get("evaluations") or [] if isinstance(e, dict) and e.get("folder")]
    listed += [run_dir / rundir.EVAL, *(folder for _, folder in rundir.external_evals(run_dir))]
    unique: dict[Path, Path] = {}
    for folder in listed:
        if (folder / rundir.METRICS).is_file():
            unique.setdefault(folder.resolve(), folder)
    return list(unique.values())


def write_run_card(run_dir: str | Path, evaluations: Sequence[str | Path] | None = None) -> tuple[Path, Path] | None:
    """Write RUN/card.md and RUN/card.json for RUN/checkpoints/best.pt (None without one). `evaluations`
    default to `run_evaluations(run_dir)`."""
    best = rundir.best_checkpoint(run_dir)
    if not best.is_file():
        return None
    card = build_card(best, run_evaluations(run_dir) if evaluations is None else evaluations, run_dir)
    return write_card(card, run_dir)


def add_evaluation(checkpoint: str | Path, folder: str | Path) -> tuple[Path, Path] | None:
    """After `cxrdx evaluate`: when `checkpoint` is a run's best.pt, rewrite the run's card with `folder` added."""
    checkpoint = Path(checkpoint)
    run_dir = rundir.run_dir_of(checkpoint)
    if checkpoint.name != rundir.BEST or not rundir.config_path(run_dir).is_file():
        return None
    folders = run_evaluations(run_dir)
    if Path(folder).resolve() not in {f.resolve() for f in folders}:
        folders.append(Path(folder))
    return write_run_card(run_dir, folders)


def read_run_card(path: str | Path) -> ModelCard | None:
    """The card in a run folder (or a card file), or None when there is none or it is not a card of this format."""
    values = rundir.read_card(path)
    if values is None or values.get("format") != FORMAT:
        return None
    try:
        return _from_dict(ModelCard, values)
    except (TypeError, ValueError, KeyError):
        return None


def _from_dict(cls: type, values: dict[str, Any]) -> Any:
    """A card dataclass from its `dataclasses.asdict` form (nested dataclasses and lists of them)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        hint, value = hints[f.name], values[f.name]
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list and typing.get_args(hint) else None
        if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = _from_dict(hint, value)
        elif isinstance(item, type) and dataclasses.is_dataclass(item) and isinstance(value, list):
            value = [_from_dict(item, v) for v in value]
        kwargs[f.name] = value
    return cls(**kwargs)


# --- output ----------------------------------------------------------------------------------------------


@dataclass
class CardTable:
    caption: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class CardSection:
    """One section of the rendered card: facts (label, text), then tables."""

    id: str
    title: str
    facts: list[tuple[str, str]] = field(default_factory=list)
    tables: list[CardTable] = field(default_factory=list)


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(mean: float | None, low: float | None, high: float | None) -> str:
    if mean is None or low is None or high is None:
        return _f(mean)
    return f"{_f(mean)} ({_f(low)}–{_f(high)})"


def _bullets(label: str, items: Sequence[str]) -> list[tuple[str, str]]:
    return [(label if i == 0 else "", text) for i, text in enumerate(items)]


def card_sections(card: ModelCard) -> list[CardSection]:
    """The card as titled sections of facts and tables, shared by the Markdown and the report's HTML."""
    d, u, t, p, v = card.model_details, card.intended_use, card.training_data, card.preprocessing, card.provenance
    splits = CardTable(
        "Split sizes",
        ["split", "images", "patients"],
        [[name, str(int(s["images"])), str(int(s["patients"]))] for name, s in t.splits.items()],
    )
    leakage = "not measured" if t.leakage is None else ", ".join(f"{k.replace('_', ' ')}: {n}" for k, n in t.leakage.items())
    overview = CardTable(
        "Mean AUROC over findings with its 95% CI",
        ["evaluation", "kind", "split", "images", "mean AUROC (95% CI)", "macro F1", "ECE", "thresholds"],
        [
            [
                e.name,
                e.kind,
                e.split,
                "n/a" if e.images is None else f"{e.images:,}",
                _ci(e.auroc, e.auroc_low, e.auroc_high),
                _f(e.macro_f1),
                _f(e.ece),
                e.thresholds,
            ]
            for e in card.evaluations
        ],
    )
    per_finding = [
        CardTable(
            f"{e.name}: per finding",
            ["finding", "AUROC (95% CI)", "threshold", "ECE"],
            [[s.finding, _ci(s.auroc, s.low, s.high), _f(s.threshold, 2), _f(s.ece)] for s in e.per_finding],
        )
        for e in card.evaluations
    ]
    subgroups = [(f"subgroups ({e.name})", _subgroup_text(e.subgroups)) for e in card.evaluations if e.subgroups]
    validation = [(k.replace("_", " "), _f(_number(card.validation[k]), 4)) for k in ("loss", "mean_auroc") if k in card.validation]
    calibration = card.validation.get("calibration")
    if isinstance(calibration, dict):
        validation.append(("calibration", f"thresholds and temperature fitted on the {calibration.get('split', '?')} split"))
    thresholds = CardTable(
        "Decision thresholds stored in the checkpoint", ["finding", "threshold"], [[f, _f(x, 3)] for f, x in card.thresholds.items()]
    )
    banner = f"{NOT_FOR_CLINICAL_USE}: " + "; ".join(card.not_for_clinical_use) if card.not_for_clinical_use else ""
    return [
        CardSection(
            "model-details",
            "Model details",
            [
                ("Name", d.name),
                ("Version", d.version),
                ("Architecture", d.architecture),
                ("Origin", d.developed_with),
                ("Outputs", f"{len(d.findings)} probabilities: {', '.join(d.findings)}"),
                ("Licence", d.licence),
                *_bullets("References", d.references),
            ],
        ),
        CardSection(
            "intended-use",
            "Intended use",
            [
                *([("Warning", banner)] if banner else []),
                ("Primary use", u.primary),
                ("Users", u.users),
                *_bullets("Out of scope", u.out_of_scope),
            ],
        ),
        CardSection("factors", "Factors", _bullets("Factors", card.factors)),
        CardSection("metrics", "Metrics", _bullets("Metrics", card.metrics)),
        CardSection(
            "evaluation-data",
            "Evaluation data",
            [
                (
                    e.name,
                    f"{e.kind}, split {e.split}, {'?' if e.images is None else f'{e.images:,}'} images"
                    + (f", {e.folder}" if e.folder else ""),
                )
                for e in card.evaluations
            ]
            or [("Evaluations", "none yet: run `cxrdx evaluate --checkpoint RUN/checkpoints/best.pt --out RUN/eval`")],
        ),
        CardSection(
            "training-data",
            "Training data",
            [
                ("Source", t.source),
                ("Licence", t.licence),
                ("Split", t.split_strategy),
                ("Patient leakage", f"{leakage} ({t.leakage_note})"),
                ("Labels", t.label_source),
                ("Label noise", t.label_noise),
            ],
            [splits] if splits.rows else [],
        ),
        CardSection(
            "preprocessing",
            "Preprocessing",
            [
                *_bullets("Steps", p.steps),
                ("Normalisation", f"mean {', '.join(f'{m:.4f}' for m in p.mean)}; std {', '.join(f'{s:.4f}' for s in p.std)}"),
                ("Input guard", card.guard),
            ],
        ),
        CardSection(
            "quantitative-analyses",
            "Quantitative analyses",
            [*validation, *subgroups] if card.evaluations else [*validation, ("Test results", "none yet")],
            [overview, *per_finding, thresholds] if card.evaluations else [thresholds],
        ),
        CardSection("ethical-considerations", "Ethical considerations", _bullets("Considerations", card.ethical_considerations)),
        CardSection("caveats", "Caveats and recommendations", _bullets("Caveats", card.caveats)),
        CardSection(
            "provenance",
            "Provenance",
            [
                ("Checkpoint", v.checkpoint or "not from a file"),
                ("SHA-256", v.sha256 or "n/a"),
                ("Trained with", f"cxrdx {v.trained_with_cxrdx}"),
                (
                    "Card written with",
                    f"cxrdx {v.card_written_with_cxrdx}, torch {v.torch_version}, Python {v.python_version}, {card.created}",
                ),
                *([("Imported from", ", ".join(f"{k}: {x}" for k, x in v.imported.items()))] if v.imported else []),
                ("Config", _config_line(v.config)),
            ],
        ),
    ]


def _subgroup_text(subgroups: Any) -> str:
    if isinstance(subgroups, dict) and isinstance(subgroups.get("largest_gaps"), list):  # as `cxrdx evaluate` stores it
        gaps = [g for g in subgroups["largest_gaps"] if isinstance(g, dict)]
        significant = sorted((g for g in gaps if isinstance(g.get("p"), (int, float)) and g["p"] < 0.05), key=lambda g: g["p"])
        shown = "; ".join(
            f"{g.get('finding')} by {g.get('attribute')}: {g.get('high_group')} vs {g.get('low_group')} "
            f"{g.get('gap', float('nan')):+.3f} (p {g['p']:.3g})"
            for g in significant[:5]
        )
        return (
            f"{len(gaps)} finding/attribute gaps tested (unadjusted), {len(significant)} with p < 0.05"
            + (f": {shown}" if shown else "")
            + " (tables in the evaluation folder: subgroups.*, subgroup_gaps.*)"
        )
    if isinstance(subgroups, dict):
        return "; ".join(f"{k}: {_subgroup_text(x)}" for k, x in subgroups.items())
    if isinstance(subgroups, list):
        return f"{len(subgroups)} rows (see the evaluation folder)"
    return str(subgroups)


def _config_line(config: dict[str, Any]) -> str:
    keys = [
        ("model", "name"),
        ("model", "pretrained"),
        ("loss", "name"),
        ("optim", "epochs"),
        ("optim", "lr"),
        ("optim", "global_batch"),
        ("data", "input_size"),
        ("ema", "enabled"),
        ("selection", "monitor"),
    ]
    parts = [f"{a}.{b}={config[a][b]}" for a, b in keys if isinstance(config.get(a), dict) and b in config[a]]
    return ", ".join(parts) + " (the whole config is in card.json)" if parts else "not recorded"


def card_markdown(card: ModelCard) -> str:
    """The card as Markdown."""
    lines = [f"# Model card: {card.model_details.name}", ""]
    if card.not_for_clinical_use:
        lines += [f"> **{NOT_FOR_CLINICAL_USE.upper()}**: {'; '.join(card.not_for_clinical_use)}.", ""]
    for section in card_sections(card):
        lines += [f"## {section.title}", ""]
        for label, text in section.facts:
            lines.append(f"- **{label}**: {text}" if label else f"  - {text}")
        for table in section.tables:
            lines += ["", f"*{table.caption}*", "", "| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
            lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table.rows]
        lines.append("")
    return "\n".join(lines)


def card_json(card: ModelCard) -> dict[str, Any]:
    """The card as JSON-ready values, with `format` and a MONAI-bundle `monai_metadata` block."""
    return {"format": FORMAT, **_plain(dataclasses.asdict(card)), "monai_metadata": monai_metadata(card)}


def monai_metadata(card: ModelCard) -> dict[str, Any]:
    """The keys of a MONAI bundle's metadata.json (configs/metadata.json) filled from the card."""
    d, p = card.model_details, card.preprocessing
    warning = f" {NOT_FOR_CLINICAL_USE}: {'; '.join(card.not_for_clinical_use)}." if card.not_for_clinical_use else ""
    return {
        "name": d.name,
        "version": d.version,
        "description": f"{d.architecture} scoring {len(d.findings)} findings on a frontal chest radiograph ({d.developed_with}).",
        "authors": "cxrdx contributors",
        "copyright": "the cxrdx contributors",
        "license": "Apache-2.0",
        "data_license": card.training_data.licence,
        "intended_use": card.intended_use.primary + warning,
        "data_source": card.training_data.source,
        "data_type": "PNG, JPEG or DICOM, decoded to 8-bit greyscale",
        "image_classes": f"one channel: a greyscale chest radiograph resized to {p.input_size} x {p.input_size} px",
        "label_classes": f"{len(d.findings)} binary findings (1 = present): {', '.join(d.findings)}",
        "pred_classes": f"{len(d.findings)} probabilities in [0, 1], one per finding in the order of label_classes",
        "references": d.references,
        "task": "multi-label classification of chest X-ray findings",
        "pytorch_version": card.provenance.torch_version,
        "numpy_version": np.__version__,
        "optional_packages_version": {"cxrdx": card.provenance.card_written_with_cxrdx},
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "XR",
                    "num_channels": 1,
                    "spatial_shape": [p.input_size, p.input_size],
                    "dtype": "float32",
                    "value_range": [round((0 - p.mean[0]) / p.std[0], 4), round((1 - p.mean[0]) / p.std[0], 4)],  # after normalisation
                    "is_patch_data": False,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": len(d.findings),
                    "spatial_shape": [len(d.findings)],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_onehot": False,
                    "channel_def": {str(i): f for i, f in enumerate(d.findings)},
                }
            },
        },
    }


def write_card(card: ModelCard, out: str | Path) -> tuple[Path, Path]:
    """Write OUT.md and OUT.json (OUT/card.md and OUT/card.json for a folder) atomically."""
    return rundir.write_card(out, card_markdown(card), card_json(card))


def served_card(predictor: Any) -> dict[str, Any] | None:
    """The card JSON of a served model: from its checkpoint (a PyTorch predictor), None for an ONNX file."""
    from cxrdx.checkpoint import Checkpoint

    checkpoint = getattr(predictor, "checkpoint", None)
    return card_json(build_card(checkpoint)) if isinstance(checkpoint, Checkpoint) else None


__all__ = [
    "FORMAT",
    "NOT_FOR_CLINICAL_USE",
    "CardSection",
    "CardTable",
    "ModelCard",
    "add_evaluation",
    "build_card",
    "card_json",
    "card_markdown",
    "card_sections",
    "monai_metadata",
    "read_run_card",
    "run_evaluations",
    "served_card",
    "write_card",
    "write_run_card",
]
