"""What several test modules share: tiny checkpoints and images, DICOM test files and their encoders,
and the foreign (not chest X-ray) images the input guard must refuse."""

from __future__ import annotations

import datetime
import io
import struct
import subprocess
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sr.codedict import codes
from pydicom.uid import (
    JPEG2000,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from cxrdx.checkpoint import Checkpoint, save_checkpoint
from cxrdx.config import TrainConfig, load_config
from cxrdx.findings import FINDINGS
from cxrdx.models import create_model
from cxrdx.predict import Predictor

SIZE = 64  # cache and input size of the test checkpoints: random weights, tiny and fast


def make_checkpoint(path: Path, model_name: str = "test_resnet", size: int = SIZE, **fields) -> Path:
    """A checkpoint with random weights (fixed seed): enough for parity and robustness tests."""
    torch.manual_seed(0)
    kwargs = fields.pop("model_kwargs", {})
    model = create_model(model_name, num_findings=len(FINDINGS), **kwargs)
    ckpt = Checkpoint(
        model_name=model_name,
        state_dict=model.state_dict(),
        input_size=size,
        mean=[0.5],
        std=[0.25],
        cache_size=size,
        model_kwargs=kwargs,
        **fields,
    )
    return save_checkpoint(path, ckpt)


def run_checkpoint(run: Path, cache: Path) -> Path:
    """RUN/checkpoints/best.pt of an untrained tiny model that names `cache` (64 px) as its training cache."""
    torch.manual_seed(0)
    model = create_model("test_resnet", pretrained="none", num_findings=len(FINDINGS))
    ckpt = Checkpoint(
        model_name="test_resnet",
        state_dict=model.state_dict(),
        input_size=32,
        mean=[0.5],
        std=[0.25],
        cache_size=64,
        config={"data": {"cache": str(cache), "workers": 0}},
    )
    return save_checkpoint(run / "checkpoints" / "best.pt", ckpt)


def dicom_bytes(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    window: tuple[float, float] | None = None,
    voi_lut: np.ndarray | None = None,
    pixel_data: bool = True,
    patient: tuple[str, str] | None = None,
) -> bytes:
    """A DICOM Part 10 file (explicit VR little endian) holding `pixels` (uint8 or uint16)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if patient:
        ds.PatientName, ds.PatientID = patient
        ds.PatientBirthDate = "19610203"
    bits = pixels.dtype.itemsize * 8
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits_stored or bits, (bits_stored or bits) - 1
    ds.PixelRepresentation = 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut is not None:
        item = pydicom.Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, 16]
        item.add_new(0x00283006, "US", [int(v) for v in voi_lut])  # LUT Data
        ds.VOILUTSequence = [item]
    if pixel_data:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def chest_like(size: int = 96, seed: int = 0) -> np.ndarray:
    """uint8 image spanning 0..255: a smooth gradient with two bright blobs and some noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = 0.5 * x + 0.3 * y + np.exp(-((x - 0.3) ** 2 + (y - 0.5) ** 2) / 0.02) + 0.6 * np.exp(-((x - 0.7) ** 2 + (y - 0.4) ** 2) / 0.01)
    img = img + rng.normal(0, 0.03, img.shape)
    img = (img - img.min()) / (img.max() - img.min())
    return np.rint(img * 255).astype(np.uint8)


def tiny_config(cache: Path, out: Path, *overrides: str) -> TrainConfig:
    """test_resnet (batch norm, dropout 0.5) at 32 px with the full augmentation, 2 epochs of 5 steps."""
    return load_config(
        None,
        [
            f"data.cache={cache}",
            f"out={out}",
            "data.input_size=32",
            "data.workers=0",
            "model.name=test_resnet",
            "optim.global_batch=32",
            "optim.epochs=2",
            "optim.lr=1e-3",
            "ema.decay=0.9",
            "loss.name=ours",
            *overrides,
        ],
    )


CORPUS = Path(pydicom.__file__).parent / "data" / "test_files"  # read directly: get_testdata_files() downloads


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


PACKAGED_SUFFIXES = (".png", ".jpg", ".gif")


WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "report", "findings", "normal", "chest", "radiograph"]


def packaged_images() -> dict[str, np.ndarray]:
    """skimage's own data files (photographs, micrographs, a page of text...), first frame, grey."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    out = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in PACKAGED_SUFFIXES:
            with Image.open(path) as image:
                out[f"skimage {path.stem}"] = np.asarray(image.convert("L"))
    return out


def text_image(size: int, seed: int) -> np.ndarray:
    """Lines of random words, dark on light or light on dark."""
    rng = np.random.default_rng(seed)
    dark = bool(seed % 2)
    image = Image.new("L", (size, size), 20 if dark else 235)
    draw = ImageDraw.Draw(image)
    for y in range(2, size - 8, 12):
        draw.text((2, y), " ".join(rng.choice(WORDS, 4)), fill=230 if dark else 25)
    return np.asarray(image)


def generated_images(size: int, per_kind: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Text pages, blank images (grey levels from black to white) and noise (uniform, Gaussian, salt and pepper)."""
    rng = np.random.default_rng(seed)
    out = {f"text {i}": text_image(size, seed + i) for i in range(per_kind)}
    for level in np.linspace(0, 255, per_kind).round().astype(np.uint8):
        out[f"blank {level}"] = np.full((size, size), level, np.uint8)
    for i in range(per_kind):
        kind = ("uniform", "gaussian", "salt-and-pepper")[i % 3]
        if kind == "uniform":
            noise = rng.integers(0, 256, (size, size))
        elif kind == "gaussian":
            noise = rng.normal(128, 20 + 10 * i, (size, size))
        else:
            noise = rng.choice([0, 255], (size, size), p=[0.5, 0.5])
        out[f"noise {kind} {i}"] = np.clip(noise, 0, 255).astype(np.uint8)
    return out


def foreign_images(size: int, per_kind: int = 8) -> dict[str, np.ndarray]:
    """Every image above, by name."""
    return {**packaged_images(), **generated_images(size, per_kind)}


def png_bytes(img: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    image = Image.fromarray(img)
    (image.convert(mode) if mode else image).save(out, format="PNG")
    return out.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def blocked_predictor(path: Path) -> tuple[Predictor, threading.Event, threading.Event]:
    """A predictor, and two events: its decoding waits for the first (release) and sets the second (entered)."""
    blocked = Predictor.from_checkpoint(make_checkpoint(path), device="cpu")
    release, entered = threading.Event(), threading.Event()
    load = blocked.load

    def slow_load(source, name=None):
        entered.set()
        release.wait(30)
        return load(source, name)

    blocked.load = slow_load
    return blocked, release, entered
