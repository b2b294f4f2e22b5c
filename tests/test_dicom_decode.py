"""Compressed DICOM as a PACS sends it: real X-rays written as 12- and 16-bit DX files, compressed by
independent encoders (dcmtk, OpenJPEG), decode to exactly the original pixels (lossless syntaxes) or
close to them (lossy ones); pydicom's own compressed test files decode too."""

from __future__ import annotations

import datetime
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.uid import (
    JPEG2000,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from test_predict import make_checkpoint

from cxrdx.data.imageio import read_image
from cxrdx.errors import ImageReadError
from cxrdx.predict import Predictor

CORPUS = Path(pydicom.__file__).parent / "data" / "test_files"  # read directly: get_testdata_files() downloads
SIDE = 256  # real X-rays resized: every detail of the 1024-px original is kept in kind, tests stay fast


def dx_dataset(pixels: np.ndarray, bits_stored: int, photometric: str = "MONOCHROME2", **header: object) -> Dataset:
    """A Digital X-Ray (For Presentation) chest PA dataset, explicit VR little endian, holding uint16 `pixels`.
    `header` overrides or adds attributes (e.g. Modality="CT", BodyPartExamined="HEAD")."""
    now = datetime.datetime(2026, 12, 4, 9, 30, 0)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Chest", "CXRDX-0001", "19610203", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "A0001", "S0001", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "DX", 1, 1, "cxrdx tests"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined, ds.ViewPosition, ds.ImageLaterality = "CHEST", "PA", "U"
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = codes.SCT.Chest.value, "SCT", "Chest"
    ds.AnatomicRegionSequence = [region]
    view = Dataset()
    view.CodeValue, view.CodingSchemeDesignator, view.CodeMeaning = codes.SCT.PosteroAnterior.value, "SCT", "postero-anterior"
    ds.ViewCodeSequence, ds.AcquisitionContextSequence = [view], []
    ds.PatientOrientation, ds.PositionerType = ["P", "F"], ""
    ds.ImagerPixelSpacing = [0.7, 0.7]
    ds.DetectorType, ds.BurnedInAnnotation, ds.LossyImageCompression = "SCINTILLATOR", "NO", "00"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", 1 if photometric == "MONOCHROME2" else -1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth = (2**bits_stored) / 2, 2**bits_stored
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    for keyword, value in header.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def xray_pixels(path: Path, bits: int, seed: int) -> np.ndarray:
    """A real X-ray at SIDE px spread over `bits` bits: the 8-bit image times 2^(bits-8) plus noise in the
    low bits, so every bit plane carries data for the codecs."""
    with Image.open(path) as image:
        gray = np.asarray(image.convert("L").resize((SIDE, SIDE), Image.BILINEAR), dtype=np.uint16)
    low = np.random.default_rng(seed).integers(0, 2 ** (bits - 8), gray.shape, dtype=np.uint16)
    return gray * 2 ** (bits - 8) + low


@dataclass(frozen=True)
class Encoding:
    """One way a PACS may send a file: the transfer syntax, how it is made, and whether it is lossless."""

    name: str
    syntax: str
    lossless: bool
    command: tuple[str, ...] = ()  # a dcmtk tool and its options (input and output paths appended)
    j2k: tuple[str, ...] | None = None  # opj_compress options: the codestream is wrapped into DICOM here


ENCODINGS = [
    Encoding("JPEG Lossless SV1", "1.2.840.10008.1.2.4.70", True, ("dcmcjpeg", "+e1")),
    *(Encoding(f"JPEG Lossless predictor {sv}", "1.2.840.10008.1.2.4.57", True, ("dcmcjpeg", "+el", "+sv", str(sv))) for sv in range(2, 8)),
    Encoding("JPEG-LS lossless", "1.2.840.10008.1.2.4.80", True, ("dcmcjpls", "+el")),
    Encoding("RLE", "1.2.840.10008.1.2.5", True, ("dcmcrle",)),
    Encoding("Deflated", "1.2.840.10008.1.2.1.99", True, ("dcmconv", "+td")),
    Encoding("JPEG 2000 lossless", JPEG2000Lossless, True, j2k=()),
    Encoding("JPEG-LS near-lossless (NEAR 2)", "1.2.840.10008.1.2.4.81", False, ("dcmcjpls", "+en", "+md", "2")),
    Encoding("JPEG Extended q95", "1.2.840.10008.1.2.4.51", False, ("dcmcjpeg", "+ee", "+q", "95")),
    Encoding("JPEG 2000 lossy 10:1", JPEG2000, False, j2k=("-I", "-r", "10")),
]
# Lossy tolerances on cxrdx's uint8 preprocessing (0..255): (max, mean) absolute difference. Measured on
# the two test images: near-lossless 1 / 0.07, JPEG Extended 1 / 0.10, JPEG 2000 10:1 7 / 1.12.
LOSSY_TOLERANCE = {"JPEG-LS near-lossless (NEAR 2)": (1, 0.2), "JPEG Extended q95": (2, 0.2), "JPEG 2000 lossy 10:1": (10, 1.5)}


def encode(source: Path, out: Path, encoding: Encoding) -> Path:
    """Compress the DICOM file `source` into `out` with the encoding's independent encoder."""
    if encoding.j2k is None:
        subprocess.run([*encoding.command, str(source), str(out)], check=True, capture_output=True)
        return out
    ds = pydicom.dcmread(source)
    pgm, j2k = out.with_suffix(".pgm"), out.with_suffix(".j2k")
    header = f"P5\n{ds.Columns} {ds.Rows}\n{2**ds.BitsStored - 1}\n".encode()  # OpenJPEG wants one field a line
    pgm.write_bytes(header + ds.pixel_array.astype(">u2").tobytes())  # PGM wider than 8 bits is big-endian
    subprocess.run(["opj_compress", "-i", str(pgm), "-o", str(j2k), *encoding.j2k], check=True, capture_output=True)
    ds.PixelData = encapsulate([j2k.read_bytes()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = encoding.syntax
    if not encoding.lossless:
        ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_15444_1"
        ds.LossyImageCompressionRatio = f"{ds.Rows * ds.Columns * 2 / j2k.stat().st_size:.2f}"  # DS: 16 characters
    ds.save_as(out, enforce_file_format=True)
    return out


def tools_for(encoding: Encoding) -> str:
    return "opj_compress" if encoding.j2k is not None else encoding.command[0]


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
