"""Uploaded images held in memory: the file taken out of a request body as it arrives (raw, or the
`file` part of multipart/form-data), its type judged by content, and its pixels decoded without
letting a header value of the file reach a message."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrdx.data.imageio import is_dicom, read_image
from cxrdx.dicom_privacy import scrub_patient_values
from cxrdx.errors import CxrdxError, ImageReadError

if TYPE_CHECKING:
    from cxrdx.predict import BasePredictor

UPLOAD_NAME = "upload"  # the client's file name is never used: it may name the patient
MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}


class UploadError(CxrdxError):
    """A request body that holds no file: malformed multipart, no boundary, no `file` part."""


def sniff(data: bytes | bytearray) -> str | None:
    """ "png", "jpeg" or "dicom" from the first bytes; None for anything else."""
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
    raise ImageReadError(UPLOAD_NAME, scrub_patient_values(reason, bytes(data)))


class RawBody:
    """A request body kept as it is, written into a buffer of its declared size: growing a buffer
    chunk by chunk would copy it over and over, holding up to twice its size for a moment."""

    def __init__(self, size_hint: int = 0) -> None:
        self.data = bytearray(size_hint)
        self.length = 0

    def write(self, chunk: bytes) -> None:
        end = self.length + len(chunk)
        self.data[self.length : end] = chunk  # extends the buffer when the hint was short
        self.length = end

    def finish(self) -> bytearray:
        del self.data[self.length :]
        return self.data


class MultipartFile:
    """The `file` part (or the first part with a file name) of a multipart body, parsed in memory as
    it arrives; the bytes of other parts are dropped."""

    def __init__(self, content_type: str, size_hint: int = 0):
        from python_multipart.multipart import MultipartParser, parse_options_header

        boundary = parse_options_header(content_type)[1].get(b"boundary")
        if not boundary:
            raise UploadError("multipart upload without a boundary")
        self.file = RawBody(size_hint)
        self.found = self.keep = False
        self.headers: dict[bytes, bytes] = {}
        self.field, self.value = bytearray(), bytearray()
        callbacks: Any = dict(  # python-multipart's callback names; its TypedDict cannot describe the lambdas
            on_part_begin=self._part_begin,
            on_header_field=lambda data, start, end: self.field.extend(data[start:end]),
            on_header_value=lambda data, start, end: self.value.extend(data[start:end]),
            on_header_end=self._header_end,
            on_headers_finished=self._headers_finished,
            on_part_data=self._part_data,
        )
        self.parser = MultipartParser(boundary, callbacks)

    def write(self, chunk: bytes) -> None:
        from python_multipart.exceptions import MultipartParseError

        try:
            self.parser.write(chunk)
        except MultipartParseError:
            raise UploadError("malformed multipart/form-data body") from None

    def finish(self) -> bytearray:
        from python_multipart.exceptions import MultipartParseError

        try:
            self.parser.finalize()
        except MultipartParseError:
            raise UploadError("malformed multipart/form-data body") from None
        if not self.found:
            raise UploadError("multipart upload without a 'file' part")
        return self.file.finish()

    def _part_begin(self) -> None:
        self.headers = {}
        self.keep = False

    def _header_end(self) -> None:
        self.headers[bytes(self.field).lower()] = bytes(self.value)
        self.field, self.value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        disposition = parse_options_header(self.headers.get(b"content-disposition", b""))[1]
        self.keep = not self.found and (disposition.get(b"name") == b"file" or b"filename" in disposition)
        self.found = self.found or self.keep

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.keep:
            self.file.write(data[start:end])
