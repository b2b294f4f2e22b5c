"""Uploaded images held in memory: their type judged by content, and their pixels decoded without
letting a header value of the file reach a message."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from cxrdx.data.imageio import is_dicom, read_image
from cxrdx.dicom_privacy import scrub_patient_values
from cxrdx.errors import ImageReadError

if TYPE_CHECKING:
    from cxrdx.predict import BasePredictor

UPLOAD_NAME = "upload"  # the client's file name is never used: it may name the patient
MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}


def sniff(data: bytes) -> str | None:
    """"png", "jpeg" or "dicom" from the first bytes; None for anything else."""
    for kind, magic in MAGIC.items():
        if data.startswith(magic):
            return kind
    return "dicom" if is_dicom(data) else None


def decode_upload(predictor: BasePredictor, data: bytes | bytearray, max_decoded_bytes: int) -> np.ndarray:
    """uint8 (S, S) pixels at the predictor's cache size. Any failure (hostile input may break any
    decoder layer) is an `ImageReadError` whose reason has the DICOM patient values scrubbed;
    decoder warnings, which may quote header values, are silenced."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = read_image(data, name=UPLOAD_NAME, max_decoded_bytes=max_decoded_bytes)
            return predictor.load(pixels, name=UPLOAD_NAME)
    except Exception as exc:
        reason = getattr(exc, "reason", None) or f"{exc.__class__.__name__}: {exc}"
    # Raised outside the handler: the decoder's traceback (its frames hold copies of the upload) is dropped now.
    raise ImageReadError(UPLOAD_NAME, scrub_patient_values(reason, data))
