"""A prediction's Group-CAM heatmap as a DICOM Secondary Capture in the source image's study.

The capture is the source radiograph (as cxrdx decodes it, at its own size) in RGB with the map of
the most probable positive finding blended over it, the colours and opacity of `cxrdx explain`'s
panels. Patient and study identity come from the source header (highdicom copies them), the
orientation too; the finding and its probability are in the Image Comments and Derivation Description.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from cxrdx.atomic import atomic_path
from cxrdx.explain.render import HEATMAP, OVERLAY_ALPHA

if TYPE_CHECKING:
    from cxrdx.predict import Prediction, Predictor

HEATMAP_SERIES_NUMBER = 9002  # after the SR series (9001): results listed after the acquired series


def overlay(image: np.ndarray, saliency: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 gray (H, W) and a map (h, w) in [0, 1] → uint8 RGB (H, W, 3): the map, stretched over the
    image as the model's square input was stretched from it, in the heatmap colours at opacity `alpha`."""
    from matplotlib import colormaps

    height, width = image.shape
    stretched = np.asarray(Image.fromarray(np.asarray(saliency, np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR))
    heat = colormaps[HEATMAP](np.clip(stretched, 0.0, 1.0))[..., :3] * 255.0
    blended = (1.0 - alpha) * image[..., None].astype(np.float64) + alpha * heat
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def build_heatmap_sc(source, image: np.ndarray, saliency: np.ndarray, finding: str, probability: float):
    """The Secondary Capture (a highdicom dataset) of `saliency` over `image` for the pydicom `source` header,
    which must have a two-valued Patient Orientation (the capture keeps it)."""
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    note = f"cxrdx Group-CAM heatmap of {finding.replace('_', ' ')}, probability {probability:.3f}"
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=overlay(image, saliency),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=generate_uid(),
        series_number=HEATMAP_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="cxrdx",
        patient_orientation=(str(source.PatientOrientation[0]), str(source.PatientOrientation[1])),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        series_description="cxrdx Group-CAM heatmaps",
    )
    sc.ImageComments = sc.DerivationDescription = note
    sc.BurnedInAnnotation = "NO"  # the finding's name is in the header, not drawn into the pixels
    for keyword in ("BodyPartExamined", "Laterality"):  # the body part tells a validator whether a side is needed
        if source.get(keyword):
            setattr(sc, keyword, source.get(keyword))
    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    return sc


@dataclass(frozen=True)
class HeatmapFiles:
    written: list[Path]
    skipped: list[tuple[str, str]]  # (image name, why it has no heatmap)


def write_heatmaps(predictor: Predictor, sources: Sequence[str | Path], predictions: Sequence[Prediction], out: str | Path) -> HeatmapFiles:
    """For each accepted DICOM prediction with a positive finding: the Group-CAM map of its most probable
    positive finding as `<source SOP Instance UID>.heatmap.dcm` in folder `out` (atomic writes)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from cxrdx.data.imageio import DICOM_SUFFIXES, read_image
    from cxrdx.explain.registry import explain

    written, skipped = [], []
    for source, prediction in zip(sources, predictions, strict=True):
        if prediction.error or not prediction.accepted or not prediction.positives:
            continue
        try:
            header = pydicom.dcmread(source, stop_before_pixels=True, force=Path(source).suffix.lower() in DICOM_SUFFIXES)
        except InvalidDicomError:
            continue  # not a DICOM file: no study to attach the heatmap to
        orientation = header.get("PatientOrientation")
        if orientation is None or len(orientation) != 2:
            skipped.append((prediction.name, "the source has no Patient Orientation (two values) to give its heatmap"))
            continue
        finding = max(prediction.positives, key=prediction.probabilities.__getitem__)
        image = read_image(source, name=prediction.name)
        tensor = predictor.to_tensor(predictor.load(image)[None]).to(predictor.device)
        saliency = explain(predictor.model, tensor, predictor.findings.index(finding))
        sc = build_heatmap_sc(header, image, saliency, finding, prediction.probabilities[finding])
        path = Path(out) / f"{header.SOPInstanceUID}.heatmap.dcm"
        with atomic_path(path) as tmp:
            sc.save_as(tmp)
        written.append(path)
    return HeatmapFiles(written, skipped)
