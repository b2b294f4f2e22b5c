"""Keeping DICOM patient values out of messages: an error about an uploaded file must not quote its patient."""

from __future__ import annotations

import io
import warnings

from cxrdx.data.imageio import is_dicom

PATIENT_GROUP = 0x0010  # the patient module: name, ID, birth date, sex...


def scrub_patient_values(message: str, data: bytes) -> str:
    """`message` with every value of the patient module (group 0010) of the DICOM file `data` replaced
    by [removed]; unchanged when `data` is not DICOM."""
    if not is_dicom(data):
        return message
    try:
        import pydicom

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        values = [str(e.value) for e in ds.iterall() if e.tag.group == PATIENT_GROUP and e.VR not in ("SQ", "OB", "UN")]
        values += [part for v in values for part in v.split("^")]  # person names: each component too
    except Exception:  # the header itself is unreadable: then no value of it can be quoted either
        return message
    for value in sorted({v for v in values if len(v) >= 2}, key=len, reverse=True):
        message = message.replace(value, "[removed]")
    return message
