"""Compressed DICOM as a PACS sends it: real X-rays written as 12- and 16-bit DX files, compressed by
independent encoders (dcmtk, OpenJPEG), decode to exactly the original pixels (lossless syntaxes) or
close to them (lossy ones); pydicom's own compressed test files decode too."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import CORPUS, ENCODINGS, Encoding, dx_dataset, encode, make_checkpoint, tools_for
from PIL import Image
from pydicom.errors import InvalidDicomError

from cxrdx.data.imageio import read_image
from cxrdx.errors import ImageReadError
from cxrdx.predict import Predictor

SIDE = 256  # real X-rays resized: every detail of the 1024-px original is kept in kind, tests stay fast


def xray_pixels(path: Path, bits: int, seed: int) -> np.ndarray:
    """A real X-ray at SIDE px spread over `bits` bits: the 8-bit image times 2^(bits-8) plus noise in the
    low bits, so every bit plane carries data for the codecs."""
    with Image.open(path) as image:
        gray = np.asarray(image.convert("L").resize((SIDE, SIDE), Image.BILINEAR), dtype=np.uint16)
    low = np.random.default_rng(seed).integers(0, 2 ** (bits - 8), gray.shape, dtype=np.uint16)
    return gray * 2 ** (bits - 8) + low


# Lossy tolerances on cxrdx's uint8 preprocessing (0..255): (max, mean) absolute difference. Measured on
# the two test images: near-lossless 1 / 0.07, JPEG Extended 1 / 0.10, JPEG 2000 10:1 7 / 1.12.
LOSSY_TOLERANCE = {"JPEG-LS near-lossless (NEAR 2)": (1, 0.2), "JPEG Extended q95": (2, 0.2), "JPEG 2000 lossy 10:1": (10, 1.5)}


@pytest.fixture(scope="module")
def originals(nih_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real X-rays as uncompressed DX files: 12-bit MONOCHROME2 and 16-bit MONOCHROME1 (as CR sends)."""
    out = tmp_path_factory.mktemp("dx")
    images = sorted((nih_sample / "images").glob("*.png"))[:2]
    files = []
    for i, (image, bits, photometric) in enumerate(zip(images, (12, 16), ("MONOCHROME2", "MONOCHROME1"), strict=True)):
        pixels = xray_pixels(image, bits, seed=i)
        if photometric == "MONOCHROME1":
            pixels = (2**bits - 1) - pixels
        path = out / f"{bits}bit.dcm"
        dx_dataset(pixels, bits, photometric).save_as(path, enforce_file_format=True)
        files.append(path)
    return files


@pytest.fixture(scope="module")
def encoded(originals: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Encoding, Path, Path]]:
    """(encoding, original, compressed file) for every encoding whose tool is installed."""
    out = tmp_path_factory.mktemp("encoded")
    missing = sorted({tools_for(e) for e in ENCODINGS if shutil.which(tools_for(e)) is None})
    if missing:
        pytest.skip(f"DICOM encoders not installed: {', '.join(missing)} (Debian: dcmtk, libopenjp2-tools; `make dicomtools`)")
    cases = []
    for original in originals:
        bits = pydicom.dcmread(original, stop_before_pixels=True).BitsStored
        for k, encoding in enumerate(ENCODINGS):
            if encoding.name.startswith("JPEG Extended") and bits > 12:
                continue  # JPEG Extended holds at most 12 bits
            cases.append((encoding, original, encode(original, out / f"{original.stem}_{k}.dcm", encoding)))
    return cases


def test_encoders_wrote_the_transfer_syntax(encoded: list[tuple[Encoding, Path, Path]]) -> None:
    for encoding, _, path in encoded:
        assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == encoding.syntax, encoding.name


def test_lossless_syntaxes_give_exactly_the_original(encoded: list[tuple[Encoding, Path, Path]]) -> None:
    checked = set()
    for encoding, original, path in encoded:
        if not encoding.lossless:
            continue
        stored = pydicom.dcmread(original).pixel_array
        assert np.array_equal(pydicom.dcmread(path).pixel_array, stored), f"{encoding.name} {original.name}"
        assert np.array_equal(read_image(path), read_image(original)), f"{encoding.name} {original.name}"
        checked.add((encoding.name, original.stem))
    assert len(checked) == 2 * sum(e.lossless for e in ENCODINGS)  # both bit depths, every lossless syntax


def test_lossy_syntaxes_stay_close(encoded: list[tuple[Encoding, Path, Path]]) -> None:
    for encoding, original, path in encoded:
        if encoding.lossless:
            continue
        if encoding.name.startswith("JPEG-LS near"):  # NEAR bounds every stored value's error
            diff = pydicom.dcmread(path).pixel_array.astype(int) - pydicom.dcmread(original).pixel_array
            assert np.abs(diff).max() <= 2, original.name
        diff = np.abs(read_image(path).astype(int) - read_image(original))
        most, mean = LOSSY_TOLERANCE[encoding.name]
        assert diff.max() <= most and diff.mean() <= mean, f"{encoding.name} {original.name}: {diff.max()} / {diff.mean():.3f}"


def test_lossless_files_give_the_same_probabilities(encoded: list[tuple[Encoding, Path, Path]], tmp_path: Path) -> None:
    predictor = Predictor.from_checkpoint(make_checkpoint(tmp_path / "best.pt"), device="cpu")
    lossless = [(original, path) for encoding, original, path in encoded if encoding.lossless]
    reference = predictor.predict_proba([original for original, _ in lossless])
    assert np.abs(predictor.predict_proba([path for _, path in lossless]) - reference).max() <= 1e-5


# --- pydicom's test corpus ------------------------------------------------------------------------

# Deliberately damaged streams (pydicom's own tests name them so): refused with the decoder's reason.
CORRUPT = {"JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm"}
# Compressed copies of an uncompressed file in the corpus.
LOSSLESS_PAIRS = {
    "MR_small_RLE.dcm": "MR_small.dcm",
    "MR_small_jp2klossless.dcm": "MR_small.dcm",
    "MR_small_jpeg_ls_lossless.dcm": "MR_small.dcm",
    "rtdose_rle_1frame.dcm": "rtdose_1frame.dcm",
}


def corpus_compressed() -> list[Path]:
    """Every single-frame file of pydicom's corpus with compressed or deflated pixel data."""
    found = []
    for path in sorted(CORPUS.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            continue  # no Part 10 header
        syntax = ds.file_meta.get("TransferSyntaxUID")
        compressed = syntax is not None and (syntax.is_compressed or syntax.is_deflated)
        if compressed and "Rows" in ds and int(ds.get("NumberOfFrames", 1) or 1) == 1:
            found.append(path)
    return found


def test_pydicom_corpus_compressed_files_decode() -> None:
    files = corpus_compressed()
    syntaxes = {pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID.name for p in files}
    assert len(files) >= 25 and len(syntaxes) >= 9, syntaxes  # baseline, extended, lossless SV1, LS x2, J2K x2, RLE, deflate
    for path in files:
        if path.name in CORRUPT:
            with pytest.raises(ImageReadError, match="cannot decode DICOM pixel data"):
                read_image(path)
        else:
            image = read_image(path)
            assert image.dtype == np.uint8 and image.ndim == 2 and image.std() > 0, path.name


def test_pydicom_corpus_lossless_files_equal_their_uncompressed_copy() -> None:
    for compressed, plain in LOSSLESS_PAIRS.items():
        a, b = pydicom.dcmread(CORPUS / compressed), pydicom.dcmread(CORPUS / plain)
        assert np.array_equal(a.pixel_array, b.pixel_array), compressed
        assert np.array_equal(read_image(CORPUS / compressed), read_image(CORPUS / plain)), compressed
