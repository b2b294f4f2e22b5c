"""read_image: every supported format gives the expected gray uint8 array; hostile input raises ImageReadError."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless, RLELossless, generate_uid

from cxrdx.data.imageio import read_image
from cxrdx.errors import ImageReadError

RNG = np.random.default_rng(0)


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def expected_minmax(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return np.rint((values - values.min()) * 255.0 / (values.max() - values.min())).astype(np.uint8)


# --- PNG / JPEG / in-memory sources --------------------------------------------------------------


def test_8bit_png_is_returned_unchanged(tmp_path):
    array = RNG.integers(0, 256, (37, 53), dtype=np.uint8)
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(array))
    for source in (path, str(path), path.read_bytes(), Image.open(path), array):
        out = read_image(source)
        assert out.dtype == np.uint8 and out.shape == (37, 53)
        np.testing.assert_array_equal(out, array)


def test_16bit_png_is_scaled_by_its_own_range(tmp_path):
    array = RNG.integers(1000, 5001, (40, 30)).astype(np.uint16)  # 12-bit data in a 16-bit file
    array[0, 0], array[0, 1] = 1000, 5000
    path = tmp_path / "wide.png"
    path.write_bytes(png_bytes(array))
    assert Image.open(path).mode.startswith("I")
    np.testing.assert_array_equal(read_image(path), expected_minmax(array))


def test_nih_rgba_files_give_their_gray_channel(nih_sample):
    rgba = [p for p in sorted((nih_sample / "images").glob("*.png")) if Image.open(p).mode == "RGBA"]
    assert len(rgba) == 4
    for path in rgba:
        channels = np.asarray(Image.open(path))
        out = read_image(path)
        assert out.shape == (1024, 1024) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, channels[:, :, 0])


def test_alpha_is_composited_over_black(tmp_path):
    gray = RNG.integers(0, 256, (20, 20), dtype=np.uint8)
    alpha = RNG.integers(0, 256, (20, 20), dtype=np.uint8)
    path = tmp_path / "la.png"
    Image.fromarray(np.stack([gray, alpha], axis=2), "LA").save(path)
    expected = gray.astype(np.float64) * alpha / 255.0
    assert np.abs(read_image(path).astype(np.float64) - expected).max() <= 1.0


def test_colour_and_palette_give_luma(tmp_path):
    rgb = RNG.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    assert np.abs(read_image(tmp_path / "rgb.png").astype(np.float64) - luma).max() <= 1.0
    palette = Image.fromarray(rgb, "RGB").quantize(16)
    palette.save(tmp_path / "p.png")
    expected = np.asarray(palette.convert("RGB")) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(read_image(tmp_path / "p.png").astype(np.float64) - expected).max() <= 1.0


def test_jpeg_gives_the_decoded_pixels(tmp_path):
    smooth = np.add.outer(np.arange(64), np.arange(64)).astype(np.uint8) * 2
    path = tmp_path / "x.jpg"
    Image.fromarray(smooth).save(path, quality=95)
    out = read_image(path)
    np.testing.assert_array_equal(out, np.asarray(Image.open(path)))
    assert np.abs(out.astype(int) - smooth).mean() < 2


def test_arrays_of_other_types():
    wide = RNG.integers(0, 60000, (10, 12)).astype(np.uint16)
    np.testing.assert_array_equal(read_image(wide), expected_minmax(wide))
    unit = RNG.random((10, 12))
    np.testing.assert_array_equal(read_image(unit), np.rint(unit * 255).astype(np.uint8))
    np.testing.assert_array_equal(read_image(np.eye(3, dtype=bool)), np.eye(3, dtype=np.uint8) * 255)
    np.testing.assert_array_equal(read_image(np.full((4, 4), 7.0)), np.zeros((4, 4), np.uint8))
    with pytest.raises(ImageReadError, match="my.npy.*shape"):
        read_image(np.zeros((2, 3, 4, 5)), name="my.npy")
    with pytest.raises(ImageReadError, match="NaN"):
        read_image(np.array([[np.nan, 1.0]]))


# --- DICOM ---------------------------------------------------------------------------------------


def make_dicom(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12, **attributes) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("test.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PixelData = pixels.tobytes()
    for key, value in attributes.items():
        setattr(ds, key, value)
    return ds


def dicom_bytes(ds: FileDataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


STORED = RNG.integers(100, 4000, (24, 20)).astype(np.uint16)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_without_voi_is_scaled_min_max(tmp_path, photometric):
    path = tmp_path / "plain.dcm"
    path.write_bytes(dicom_bytes(make_dicom(STORED, photometric)))
    expected = expected_minmax(STORED)
    out = read_image(path)
    np.testing.assert_array_equal(out, expected if photometric == "MONOCHROME2" else 255 - expected)


def test_dicom_signed_with_rescale():
    signed = STORED.astype(np.int16) - 2000
    ds = make_dicom(signed, bits_stored=16, RescaleSlope=2, RescaleIntercept=-1024)
    np.testing.assert_array_equal(read_image(dicom_bytes(ds)), expected_minmax(signed * 2.0 - 1024))


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_window_after_rescale(photometric):
    ds = make_dicom(STORED, photometric, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=2000, WindowWidth=3000)
    x = STORED * 2.0 - 1024  # modality values
    center, width = 2000 - 0.5, 3000 - 1  # DICOM PS3.3 C.11.2.1.2.1, linear function
    y = np.where(x <= center - width / 2, 0.0, np.where(x > center + width / 2, 1.0, (x - center) / width + 0.5))
    expected = np.rint(y * 255).astype(np.uint8)
    out = read_image(dicom_bytes(ds))
    np.testing.assert_array_equal(out, expected if photometric == "MONOCHROME2" else 255 - expected)
    assert (out == (0 if photometric == "MONOCHROME2" else 255)).any()  # the window really clips


def test_dicom_voi_lut_sequence():
    lut = np.rint(np.sqrt(np.arange(4096) / 4095.0) * 1000).astype(np.uint16) + 20  # output 20..1020
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new("LUTData", "OW", lut.astype("<u2").tobytes())
    ds = make_dicom(STORED, VOILUTSequence=pydicom.Sequence([item]), WindowCenter=100, WindowWidth=10)
    expected = np.rint((lut[STORED].astype(np.float64) - 20) * 255 / 1000).astype(np.uint8)
    np.testing.assert_array_equal(read_image(dicom_bytes(ds)), expected)  # the LUT wins over the window


def test_dicom_compressed_with_builtin_and_pillow_decoders(tmp_path):
    ds = make_dicom(STORED)
    ds.compress(RLELossless)
    np.testing.assert_array_equal(read_image(dicom_bytes(ds)), expected_minmax(STORED))

    gray = np.add.outer(np.arange(32), np.arange(32)).astype(np.uint8) * 4
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="JPEG", quality=95)
    jpeg = make_dicom(gray, bits_stored=8)
    jpeg.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    jpeg.PixelData = pydicom.encaps.encapsulate([buffer.getvalue()])
    jpeg["PixelData"].VR = "OB"
    jpeg.PixelData = jpeg.PixelData  # re-set after the VR change
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
    np.testing.assert_array_equal(read_image(dicom_bytes(jpeg)), expected_minmax(decoded))


def test_dicom_compressed_without_decoder_says_what_to_install(tmp_path):
    from pydicom.pixels import get_decoder

    ds = make_dicom(STORED)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8 not really jpeg-ls \xff\xd9"])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "ls.dcm"
    path.write_bytes(dicom_bytes(ds))
    with pytest.raises(ImageReadError, match="ls.dcm") as caught:
        read_image(path)
    if not get_decoder(JPEGLSLossless).is_available:
        assert "JPEG-LS" in str(caught.value) and "install" in str(caught.value)


def test_dicom_without_preamble_is_read_by_suffix(tmp_path):
    ds = make_dicom(STORED)
    ds.preamble = None
    del ds.file_meta  # no preamble, no file meta: old ACR-NEMA style
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=True, little_endian=True)
    path = tmp_path / "old.dcm"
    path.write_bytes(buffer.getvalue())
    np.testing.assert_array_equal(read_image(path), expected_minmax(STORED))


# --- hostile input -------------------------------------------------------------------------------


def png_with_header_size(width: int, height: int) -> bytes:
    data = bytearray(png_bytes(np.zeros((8, 8), np.uint8)))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = ihdr[4:12]
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


def hostile_files(tmp_path: Path, nih_png: bytes) -> dict[str, tuple[Path, str]]:
    files = {
        "empty.png": (b"", "empty"),
        "truncated.png": (nih_png[: len(nih_png) // 2], "truncated"),
        "notes.png": (b"this is a text file, not an image\n" * 20, "not a supported image"),
        "bomb.png": (png_with_header_size(100_000, 100_000), "decompression bomb"),
        "nopixels.dcm": (dicom_bytes(_without_pixels()), "no pixel data"),
        "bigdicom.dcm": (dicom_bytes(make_dicom(STORED, Rows=60_000, Columns=60_000)), "decompression bomb"),
        "shortdicom.dcm": (dicom_bytes(make_dicom(STORED))[:-300], "DICOM"),
        "garbage.dcm": (b"\x00\x01\x02" * 50, "DICOM"),
    }
    out = {}
    for name, (data, reason) in files.items():
        (tmp_path / name).write_bytes(data)
        out[name] = (tmp_path / name, reason)
    return out


def _without_pixels() -> FileDataset:
    ds = make_dicom(STORED)
    del ds.PixelData
    return ds


def test_hostile_input_raises_image_read_error_naming_the_file(tmp_path):
    smooth = (np.add.outer(np.arange(256), np.arange(256)) % 256).astype(np.uint8)
    for name, (path, reason) in hostile_files(tmp_path, png_bytes(smooth)).items():
        with pytest.raises(ImageReadError) as caught:
            read_image(path)
        assert name in str(caught.value) and reason in str(caught.value), str(caught.value)
        with pytest.raises(ImageReadError, match="upload.bin"):
            read_image(path.read_bytes(), name="upload.bin")
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "absent.png")
    with pytest.raises(ImageReadError, match="folder"):
        read_image(tmp_path)


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(np.zeros((100, 100), np.uint8)))
    assert read_image(path, max_pixels=10_000).shape == (100, 100)
    with pytest.raises(ImageReadError, match="big.png.*100 x 100"):
        read_image(path, max_pixels=9_999)
