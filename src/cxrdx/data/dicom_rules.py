"""Header rules: is a DICOM object a single-frame chest radiograph the model may read?

The model was trained on frontal chest radiographs only. A CT slice, an MR image, a segmentation mask
or a structured report decodes (or not) to some pixels, and the model would return 14 chest-finding
probabilities for them all; these rules refuse such objects from the header alone, naming the reason.
Lateral views are accepted but flagged (the model saw none in training).

A Verdict is the answer of every check an image passes before prediction; a content check may later
add its own field (e.g. an out-of-distribution score) beside `accepted`, `reason` and `flags`.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

RADIOGRAPH_MODALITIES = ("CR", "DX", "DR")  # DR: not a DICOM defined term, but some vendors write it
CHEST_BODY_PARTS = ("CHEST", "THORAX")
LATERAL_VIEWS = ("LL", "RL", "LATERAL", "LAT")
LATERAL_WORDS = ("LAT", "LATERAL")  # whole words in free-text descriptions ("BILATERAL" is not one)
DESCRIPTION_KEYWORDS = ("SeriesDescription", "ProtocolName", "StudyDescription")
NON_DIAGNOSTIC_SOP_PREFIXES = ("RT ",)  # radiotherapy objects, even RT Image, are not diagnostic radiographs


@dataclass(frozen=True)
class Verdict:
    """Whether an image may be predicted (`accepted`), why not (`reason`), and warnings that do not refuse it."""

    accepted: bool
    reason: str | None = None
    flags: list[str] = field(default_factory=list)


def check_header(ds) -> Verdict:
    """Apply the rules to a pydicom Dataset (pixel data not needed): the first failed rule refuses."""
    reason = _sop_class_problem(ds) or _modality_problem(ds) or _body_part_problem(ds) or _frames_problem(ds)
    return Verdict(accepted=reason is None, reason=reason, flags=_lateral_flags(ds))


def dicom_verdict(source: object) -> Verdict | None:
    """The Verdict for a DICOM file path or DICOM bytes; None for anything else (PNG, JPEG, arrays) and for
    headers too damaged to read (the decoder then reports the damage)."""
    import pydicom

    from cxrdx.data.imageio import DICOM_SUFFIXES, is_dicom

    if isinstance(source, (bytes, bytearray, memoryview)):
        data, force = bytes(source[:132]), False
        stream: io.BytesIO | Path = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            with open(path, "rb") as handle:
                data = handle.read(132)
        except OSError:
            return None
        force = path.suffix.lower() in DICOM_SUFFIXES
        stream = path
    else:
        return None
    if not (is_dicom(data) or force):
        return None
    try:
        ds = pydicom.dcmread(stream, stop_before_pixels=True, force=force)
    except Exception:  # pydicom raises many types for damaged headers; the decoder names the damage
        return None
    return check_header(ds)


def _sop_class_problem(ds) -> str | None:
    from pydicom.uid import UID

    uid = ds.get("SOPClassUID") or ds.get("file_meta", {}).get("MediaStorageSOPClassUID")
    if not uid:
        return None  # judged by its modality
    name = UID(str(uid)).name
    if name == str(uid):
        return None  # a private or unknown SOP class: judged by its modality
    if "Image Storage" not in name or name.startswith(NON_DIAGNOSTIC_SOP_PREFIXES):
        return f"SOP class {name} is not a radiograph image"
    if "For Processing" in name:
        return f"SOP class {name} holds raw detector data, not an image for presentation"
    return None


def _modality_problem(ds) -> str | None:
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if not modality:
        return f"modality is absent; expected a radiograph ({', '.join(RADIOGRAPH_MODALITIES[:2])})"
    if modality not in RADIOGRAPH_MODALITIES:
        return f"modality {modality} is not a radiograph ({', '.join(RADIOGRAPH_MODALITIES[:2])})"
    return None


def _body_part_problem(ds) -> str | None:
    part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    words = _words(part)
    if not words or words[0] in CHEST_BODY_PARTS:  # absent, CHEST, THORAX, or vendor forms like CHEST_PA
        return None
    return f"body part {part} is not the chest"


def _frames_problem(ds) -> str | None:
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return f"invalid number of frames {ds.get('NumberOfFrames')!r}"
    return None if frames == 1 else f"multi-frame object ({frames} frames); expected one radiograph"


def _lateral_flags(ds) -> list[str]:
    flags = []
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view in LATERAL_VIEWS:
        flags.append(f"lateral view (ViewPosition {view}); the model was trained on frontal views")
    for keyword in DESCRIPTION_KEYWORDS:
        text = str(ds.get(keyword, "") or "")
        if any(word in LATERAL_WORDS for word in _words(text.upper())):
            flags.append(f"lateral view suggested by {keyword} {text.strip()!r}")
    return flags


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[^A-Z0-9]+", text) if w]
