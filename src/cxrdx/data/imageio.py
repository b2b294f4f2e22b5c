"""PNG / JPEG / TIFF / BMP / DICOM -> one 2-D uint8 gray array: the one place where images are decoded.

Conventions (applied the same way to every source):
- 8-bit gray is returned unchanged.
- Images with more than 8 bits (16-bit PNG/TIFF, DICOM without a VOI transform) are scaled min-max
  to 0..255. Files rarely say how many of their 16 bits carry signal (X-ray exports commonly hold
  10-14 bits), so dividing by 257 would squeeze a 12-bit image into 16 grey levels; min-max keeps
  all of the image's contrast, which is what the model sees.
- Colour is reduced to luma (ITU-R 601, exact for gray-in-RGB files); alpha is composited over
  black, the background of an X-ray, so fully opaque files (all of ChestX-ray14's RGBA files) give
  exactly their gray channel.
- DICOM: modality LUT / rescale slope+intercept, then the VOI LUT or window centre/width, scaled
  from the VOI output range to 0..255; MONOCHROME1 is inverted so that bone is bright.
- Image size is checked from the header before any pixel is decoded (decompression bombs).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

from cxrdx.errors import ImageReadError

MAX_PIXELS = 50_000_000  # a 7000 x 7000 image; the largest radiographs are about 4300 x 3500
# Decoded pixels as the decoder stores them: 4300 x 3500 16-bit gray is 30 MB, 7000 x 7000 RGBA 196 MB.
MAX_DECODED_BYTES = 128 * 2**20
PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")

Source = str | os.PathLike | bytes | bytearray | memoryview | np.ndarray | Image.Image


def read_image(
    source: Source, name: str | None = None, max_pixels: int = MAX_PIXELS, max_decoded_bytes: int = MAX_DECODED_BYTES
) -> np.ndarray:
    """Decode a file path, encoded bytes, an array or a PIL image into a 2-D uint8 gray array.

    `name` labels the source in errors (for example an uploaded file's name). Every failure raises
    ImageReadError naming the source and the reason. Files whose header announces more than
    `max_pixels` pixels or more than `max_decoded_bytes` bytes of decoded samples are refused
    before any pixel is decoded.
    """
    if isinstance(source, np.ndarray):
        return _from_array(source, name or "<array>", max_pixels)
    if isinstance(source, Image.Image):
        label = name or "<PIL image>"
        _check_size(source.width, source.height, label, max_pixels)
        _check_decoded_pil(source, label, max_decoded_bytes)
        try:
            source.load()
        except Exception as exc:
            raise ImageReadError(label, f"corrupt or truncated image data ({exc})") from None
        return _decode_pil(source, label)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(source), name or "<bytes>", max_pixels, max_decoded_bytes)
    if isinstance(source, (str, Path)):
        label = name or str(source)
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise ImageReadError(label, "file not found") from None
        except IsADirectoryError:
            raise ImageReadError(label, "is a folder, not an image file") from None
        except OSError as exc:
            raise ImageReadError(label, f"cannot read the file ({exc.strerror or exc})") from None
        return _decode_bytes(data, label, max_pixels, max_decoded_bytes, suffix=Path(source).suffix.lower())
    raise ImageReadError(name or repr(type(source)), f"unsupported source type {type(source).__name__}")


def is_dicom(data: bytes | bytearray) -> bool:
    """True for DICOM Part 10 bytes (the 'DICM' marker after the 128-byte preamble)."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def _decode_bytes(data: bytes, label: str, max_pixels: int, max_decoded_bytes: int, suffix: str = "") -> np.ndarray:
    if not data:
        raise ImageReadError(label, "empty file (0 bytes)")
    if is_dicom(data):
        return _decode_dicom(data, label, max_pixels, max_decoded_bytes, force=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except UnidentifiedImageError:
        if suffix in DICOM_SUFFIXES:  # DICOM written without the Part 10 preamble
            return _decode_dicom(data, label, max_pixels, max_decoded_bytes, force=True)
        raise ImageReadError(label, f"not a supported image ({', '.join(PIL_FORMATS)} or DICOM)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(label, f"image too large, refused as a decompression bomb ({exc})") from None
    except Exception as exc:  # PIL raises many types for damaged headers
        raise ImageReadError(label, f"corrupt image header ({exc})") from None
    with image:
        _check_size(image.width, image.height, label, max_pixels)
        _check_decoded_pil(image, label, max_decoded_bytes)
        try:
            image.load()
            if image.format == "JPEG":
                image = ImageOps.exif_transpose(image)
            return _decode_pil(image, label)
        except MemoryError:
            raise ImageReadError(label, f"not enough memory to decode the {image.width:,} x {image.height:,} pixel image") from None
        except ImageReadError:
            raise
        except Exception as exc:
            raise ImageReadError(label, f"corrupt or truncated {image.format} data ({exc})") from None


def _check_size(width: int, height: int, label: str, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageReadError(label, f"image has no pixels ({width} x {height})")
    if width * height > max_pixels:
        raise ImageReadError(label, f"image of {width} x {height} pixels exceeds the limit of {max_pixels:,} (decompression bomb guard)")


def _check_decoded_bytes(nbytes: int, what: str, label: str, max_decoded_bytes: int) -> None:
    if nbytes > max_decoded_bytes:
        raise ImageReadError(
            label, f"image of {what} decodes to {nbytes:,} bytes, over the limit of {max_decoded_bytes:,} (decoded-size guard)"
        )


def _check_decoded_pil(image: Image.Image, label: str, max_decoded_bytes: int) -> None:
    """The bytes Pillow will allocate for `image`, from its header (mode and size), before loading it."""
    mode = ImageMode.getmode(image.mode)
    nbytes = image.width * image.height * len(mode.bands) * np.dtype(mode.typestr).itemsize
    _check_decoded_bytes(nbytes, f"{image.width} x {image.height} {image.mode} pixels", label, max_decoded_bytes)


def _decode_pil(image: Image.Image, label: str) -> np.ndarray:
    mode = image.mode
    if mode == "L":
        return np.array(image, dtype=np.uint8)
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _from_array(np.asarray(image), label, max_pixels=image.width * image.height)
    if mode == "P":
        mode = "RGBA" if "transparency" in image.info else "RGB"
        image = image.convert(mode)
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.array(Image.alpha_composite(black, rgba).convert("L"), dtype=np.uint8)
    try:
        return np.array(image.convert("L"), dtype=np.uint8)
    except Exception as exc:
        raise ImageReadError(label, f"cannot convert {mode} pixels to gray ({exc})") from None


def _from_array(array: np.ndarray, label: str, max_pixels: int) -> np.ndarray:
    """2-D gray or (H, W, 3|4) colour arrays; uint8 kept, wider types scaled min-max (floats in [0, 1] by 255)."""
    if array.ndim == 3 and array.shape[2] in (3, 4) and array.dtype == np.uint8:
        mode = "RGB" if array.shape[2] == 3 else "RGBA"
        return _decode_pil(Image.fromarray(array, mode), label)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2:
        raise ImageReadError(label, f"expected a 2-D gray image, got an array of shape {array.shape}")
    _check_size(array.shape[1], array.shape[0], label, max_pixels)
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ImageReadError(label, f"unsupported pixel type {array.dtype}")
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise ImageReadError(label, "pixel values include NaN or infinity")
    if np.issubdtype(array.dtype, np.floating) and values.min() >= 0.0 and values.max() <= 1.0:
        return to_uint8(values, 0.0, 1.0)
    return to_uint8(values, float(values.min()), float(values.max()))


def to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto 0..255 (clipped, rounded); a constant image gives zeros."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.asarray(values, dtype=np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# --- DICOM ---------------------------------------------------------------------------------------


def _decode_dicom(data: bytes, label: str, max_pixels: int, max_decoded_bytes: int, force: bool) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=force)
    except InvalidDicomError as exc:
        raise ImageReadError(label, f"not a valid DICOM file ({exc})") from None
    except Exception as exc:
        raise ImageReadError(label, f"corrupt or truncated DICOM header ({exc})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(label, "DICOM file has no pixel data (not an image object)")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 16) or 16)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ImageReadError(label, f"DICOM header lacks a valid image size ({exc})") from None
    _check_size(columns, rows * frames, label, max_pixels)
    nbytes = rows * columns * frames * samples * -(-bits // 8)
    _check_decoded_bytes(nbytes, f"{frames} x {rows} x {columns} x {samples} samples of {bits} bits", label, max_decoded_bytes)
    if frames != 1:
        raise ImageReadError(label, f"multi-frame DICOM ({frames} frames); expected one radiograph per file")
    pixels = _dicom_pixels(ds, label)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            pixels = apply_color_lut(pixels, ds)
        except Exception as exc:
            raise ImageReadError(label, f"invalid DICOM palette ({exc})") from None
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return _from_array(pixels if pixels.ndim == 2 else _to_uint8_colour(pixels), label, max_pixels)
    gray = _dicom_gray(pixels, ds, label)
    return 255 - gray if photometric == "MONOCHROME1" else gray


def _dicom_pixels(ds, label: str) -> np.ndarray:
    from pydicom.pixels import get_decoder
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:  # files without meta information: take the encoding the reader found
        implicit, little = ds.original_encoding
        syntax = {(True, True): ImplicitVRLittleEndian, (False, False): ExplicitVRBigEndian}.get((implicit, little), ExplicitVRLittleEndian)
        ds.file_meta.TransferSyntaxUID = syntax
    if syntax.is_compressed:
        decoder = get_decoder(syntax)
        if not decoder.is_available:
            needs = "; ".join(decoder.missing_dependencies)
            raise ImageReadError(
                label,
                f"compressed DICOM ({syntax.name}) needs a decoder that is not installed; install one of: {needs}",
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(ds.pixel_array)
    except Exception as exc:
        raise ImageReadError(label, f"cannot decode DICOM pixel data ({type(exc).__name__}: {exc})") from None


def _dicom_gray(pixels: np.ndarray, ds, label: str) -> np.ndarray:
    """Modality LUT, then VOI LUT or windowing, scaled from the VOI output range to 0..255."""
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    try:
        values = apply_modality_lut(pixels, ds)
        if ds.get("VOILUTSequence"):
            item = ds.VOILUTSequence[0]
            entries, first = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
            lut = apply_voi(np.arange(first, first + entries), ds)  # the LUT itself gives its output range
            return to_uint8(apply_voi(np.rint(values).astype(np.int64), ds), float(lut.min()), float(lut.max()))
        if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            with np.errstate(over="ignore"):
                low, high = apply_windowing(np.array([-np.inf, np.inf]), ds)
            return to_uint8(apply_windowing(values, ds), float(low), float(high))
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(label, f"invalid DICOM VOI / rescale attributes ({exc})") from None
    values = np.asarray(values, dtype=np.float64)
    return to_uint8(values, float(values.min()), float(values.max()))


def _to_uint8_colour(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    return to_uint8(pixels, float(pixels.min()), float(pixels.max()))
