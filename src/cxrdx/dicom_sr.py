"""A prediction as a DICOM Comprehensive Structured Report, for a PACS to store beside the radiograph.

The SR belongs to the source image's study: patient and study identity are copied from the source
header (by highdicom, from the evidence), nothing is made up. It references the source instance
(Current Requested Procedure Evidence: study, series and SOP instance; and an IMAGE item) and holds,
per finding, the probability, the decision threshold and whether the finding is called present, then
the list of positive findings and the model's name and cxrdx version. It is marked unverified: a
machine's reading, not a report signed by a radiologist.

Content tree (concept names; DCM and SCT codes from DICOM Part 16, findings in cxrdx's own scheme):
    Diagnostic Imaging Report (LN 18748-4)
      Algorithm Name (DCM 111001), Algorithm Version (DCM 111003)   TEXT
      Source image (DCM 121324)                                     IMAGE
      Findings (DCM 121070)                                         CONTAINER
        <finding> (99CXRDX)                                         CONTAINER, one per finding
          Probability (DCM 122157), Decision threshold (99CXRDX)    NUM, no units
          Finding (DCM 121071) = Present / Absent (SCT)             CODE
      Conclusions (DCM 121076)                                      CONTAINER
        Finding (DCM 121071) = <finding>                            CODE, one per positive finding
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cxrdx.atomic import atomic_path
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS
from cxrdx.predict import ModelInfo, Prediction

SCHEME = "99CXRDX"  # a private coding scheme ("99" prefix, DICOM PS3.16 8.2) for cxrdx's own concepts
SR_SERIES_NUMBER = 9001  # high, so that PACS viewers list the results after the acquired series
DISCLAIMER = "Machine prediction of a research model (cxrdx); not a diagnosis, not verified by a physician."


def finding_code(finding: str):
    """The coded concept of a ChestX-ray14 finding: CXR14-01 .. CXR14-14 in the dataset's label order."""
    from highdicom.sr import CodedConcept

    if finding not in FINDINGS:
        raise CxrdxError(f"finding {finding!r} has no code in the DICOM SR (known: {', '.join(FINDINGS)})")
    return CodedConcept(f"CXR14-{FINDINGS.index(finding) + 1:02d}", SCHEME, finding.replace("_", " "))


def build_sr(source, prediction: Prediction, info: ModelInfo):
    """The Comprehensive SR (a highdicom dataset) of one accepted prediction for the pydicom `source` header."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    if prediction.error or not prediction.accepted or not prediction.probabilities:
        raise CxrdxError(f"{prediction.name}: no accepted prediction to report in a DICOM SR")
    rel = hd.sr.RelationshipTypeValues.CONTAINS
    no_units = hd.sr.CodedConcept("1", "UCUM", "no units")
    threshold = hd.sr.CodedConcept("THRESHOLD", SCHEME, "Decision threshold")
    per_finding = []
    for finding, probability in prediction.probabilities.items():
        present = finding in prediction.positives
        item = hd.sr.ContainerContentItem(name=finding_code(finding), relationship_type=rel)
        item.ContentSequence = hd.sr.ContentSequence(
            [
                hd.sr.NumContentItem(codes.DCM.Probability, probability, no_units, relationship_type=rel),
                hd.sr.NumContentItem(threshold, prediction.thresholds[finding], no_units, relationship_type=rel),
                hd.sr.CodeContentItem(codes.DCM.Finding, codes.SCT.Present if present else codes.SCT.Absent, relationship_type=rel),
            ]
        )
        per_finding.append(item)
    findings = hd.sr.ContainerContentItem(name=codes.DCM.Findings, relationship_type=rel)
    findings.ContentSequence = hd.sr.ContentSequence(per_finding)
    conclusions = hd.sr.ContainerContentItem(name=codes.DCM.Conclusions, relationship_type=rel)
    conclusions.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.CodeContentItem(codes.DCM.Finding, finding_code(f), relationship_type=rel) for f in prediction.positives]
    )
    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport)
    root.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(codes.DCM.AlgorithmName, f"cxrdx {info.model_name}", relationship_type=rel),
            hd.sr.TextContentItem(codes.DCM.AlgorithmVersion, info.cxrdx_version, relationship_type=rel),
            hd.sr.ImageContentItem(codes.DCM.SourceImage, source.SOPClassUID, source.SOPInstanceUID, relationship_type=rel),
            findings,
            conclusions,
            hd.sr.TextContentItem(hd.sr.CodedConcept("DISCLAIMER", SCHEME, "Disclaimer"), DISCLAIMER, relationship_type=rel),
        ]
    )
    if prediction.ood_score is not None:  # the input guard's content check, when the model has one
        ood = hd.sr.CodedConcept("OODSCORE", SCHEME, "Out-of-distribution score")
        root.ContentSequence.append(hd.sr.NumContentItem(ood, prediction.ood_score, no_units, relationship_type=rel))
    return hd.sr.ComprehensiveSR(
        evidence=[source],
        content=root,
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="cxrdx",
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description="cxrdx chest X-ray findings",
    )


def write_srs(sources: Sequence[str | Path], predictions: Sequence[Prediction], info: ModelInfo, out: str | Path) -> list[Path]:
    """Write one SR per accepted DICOM prediction into folder `out` as `<source SOP Instance UID>.sr.dcm`
    (atomic writes); other inputs (PNG, JPEG, refused or unreadable files) are passed over."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from cxrdx.data.imageio import DICOM_SUFFIXES

    if len(sources) != len(predictions):
        raise CxrdxError(f"{len(sources)} source files for {len(predictions)} predictions")
    written = []
    for source, prediction in zip(sources, predictions, strict=True):
        if prediction.error or not prediction.accepted or not prediction.probabilities:
            continue
        try:
            header = pydicom.dcmread(source, stop_before_pixels=True, force=Path(source).suffix.lower() in DICOM_SUFFIXES)
        except InvalidDicomError:
            continue  # not a DICOM file: there is no study to attach a report to
        try:
            sr = build_sr(header, prediction, info)
        except (AttributeError, ValueError, TypeError) as exc:
            raise CxrdxError(f"{prediction.name}: cannot build a DICOM SR from its header ({exc})") from None
        path = Path(out) / f"{header.SOPInstanceUID}.sr.dcm"
        with atomic_path(path) as tmp:
            sr.save_as(tmp)
        written.append(path)
    return written
