"""Still images: read upright RGB (+ alpha), write back the same way round with the metadata.

``read_image`` turns a photo upright by its EXIF orientation (phone photos are usually stored
sideways), so faces are detected and restored upright, and returns an ``ImageFile`` that
remembers what writing it back needs. ``write_image`` takes the (restored) upright RGB with
that record: pixels go back to their stored orientation under the untouched EXIF block, so
the image displays as before, with its ICC profile, XMP, resolution, PNG text, alpha and,
where the format allows, its encoding (JPEG quantisation tables and chroma subsampling,
lossless WebP, TIFF compression). ``copy_unchanged`` copies an image byte for byte, for
images where nothing was restored.

Pillow reads and writes 8-bit images. 16-bit PNG and TIFF go through OpenCV, since Pillow
reads 48- and 64-bit RGB(A) as 8-bit: a 16-bit PNG keeps its EXIF and ICC profile, a 16-bit
TIFF keeps its pixels (written upright) but no metadata, as OpenCV writes none to TIFF.

Example::

    image = read_image(Path("IMG_0042.jpg"))
    write_image(Path("IMG_0042.restored.jpg"), restore(image.rgb), image)
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import cv2
import numpy as np
from PIL import Image, ImageCms, JpegImagePlugin, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from gpen_video.errors import InputError, OutputError
from gpen_video.formats import IMAGE_SUFFIXES, is_image  # noqa: F401 - is_image: part of this module's API
from gpen_video.io.files import check_input_file, copy_atomic, write_atomic
from gpen_video.records import check_shape

log = logging.getLogger(__name__)


ORIENTATION = 0x0112
_EXIF_HEADER = b"Exif\x00\x00"
_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP",
            ".tif": "TIFF", ".tiff": "TIFF"}
_EXIF_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
"""Formats whose EXIF block is copied verbatim. TIFF keeps its descriptive tags instead, and
TIFF readers (Pillow, OpenCV, libtiff) apply its orientation themselves."""
_TIFF_KEEP = frozenset({269, 270, 271, 272, 305, 306, 315, 316, 700, 33432})
"""Descriptive TIFF tags carried over: document name, description, make, model, software,
date, artist, host, XMP, copyright. The layout tags are the writer's."""
_PNG_XMP = "XML:com.adobe.xmp"


@dataclass(frozen=True)
class ImageFile:
    """A still image as read, and what writing it back the same way needs.

    Attributes:
        path: the file read.
        rgb: (H, W, 3) uint8 or uint16 RGB, upright (EXIF orientation applied).
        alpha: (H, W) alpha of the same dtype, upright, or None.
        format: Pillow's name of the file format: JPEG, PNG, WEBP, TIFF or BMP.
        gray: the stored image has one colour channel (written back as gray).
        orientation: EXIF orientation (1-8) of the stored pixels still to be undone on writing
            (1 for TIFF, whose readers apply it).
        exif: the EXIF block as Pillow reads it (``Exif\\0\\0`` header first), or None.
        icc_profile: the embedded ICC colour profile, or None.
        xmp: the XMP packet, or None.
        dpi: (x, y) resolution in dots per inch, or None.
        encoding: Pillow save options that reproduce the source's encoding when written to
            the same format (JPEG ``qtables``/``subsampling``/``progressive``, WebP
            ``lossless``, TIFF ``compression``/``tiffinfo``, PNG ``text`` chunks).
    """

    path: Path
    rgb: np.ndarray
    alpha: np.ndarray | None
    format: str
    gray: bool = False
    orientation: int = 1
    exif: bytes | None = None
    icc_profile: bytes | None = None
    xmp: bytes | None = None
    dpi: tuple[float, float] | None = None
    encoding: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if self.rgb.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"rgb must be uint8 or uint16, got {self.rgb.dtype}")
        check_shape("ImageFile.rgb", self.rgb, (None, None, 3))
        if self.alpha is not None:
            check_shape("ImageFile.alpha", self.alpha, self.rgb.shape[:2])
        if not 1 <= self.orientation <= 8:
            raise ValueError(f"orientation must be 1..8, got {self.orientation}")


def enlarged(image: ImageFile, rgb: np.ndarray) -> ImageFile:
    """``image`` with ``rgb``, a whole number of times its size (an upscaled copy), in place of
    its pixels: the alpha is enlarged alike (Lanczos) and the resolution multiplied, so the
    picture prints at the same size; the metadata is kept.

    >>> small = ImageFile(Path("a.png"), np.zeros((2, 3, 3), np.uint8), None, "PNG", dpi=(72.0, 72.0))
    >>> enlarged(small, np.zeros((4, 6, 3), np.uint8)).dpi
    (144.0, 144.0)
    """
    scale = rgb.shape[0] // image.rgb.shape[0]
    check_shape("rgb", rgb, (image.rgb.shape[0] * scale, image.rgb.shape[1] * scale, 3))
    alpha = image.alpha
    if alpha is not None:
        alpha = cv2.resize(alpha, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LANCZOS4)
    dpi = None if image.dpi is None else (image.dpi[0] * scale, image.dpi[1] * scale)
    return replace(image, rgb=rgb, alpha=alpha, dpi=dpi)


# --------------------------------------------------------------------------- orientation


def upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Stored pixels (H, W[, C]) -> as displayed under EXIF ``orientation`` (1-8)."""
    return np.ascontiguousarray({
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, k=-1),
        7: lambda a: np.rot90(a, k=2).swapaxes(0, 1),
        8: lambda a: np.rot90(a, k=1),
    }[orientation](pixels))


def stored(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Inverse of ``upright``: displayed pixels -> as stored under EXIF ``orientation``."""
    return upright(pixels, {6: 8, 8: 6}.get(orientation, orientation))


# --------------------------------------------------------------------------- reading


def _sixteen_bit(im: Image.Image) -> bool:
    """Whether samples have more than 8 bits. Pillow reads 48/64-bit RGB(A) PNG and TIFF as
    8-bit RGB(A), so the decoder's raw mode (``RGB;16B``...) tells the depth."""
    if im.mode.startswith("I"):
        return True
    return any(";16" in str(tile.args) for tile in im.tile)


def _xmp(im: Image.Image) -> bytes | None:
    value = im.info.get("xmp") or im.info.get(_PNG_XMP)
    if value is None and im.format == "TIFF":
        value = im.tag_v2.get(700)
    if isinstance(value, str):
        value = value.encode("utf-8")
    return bytes(value) if value else None


def _webp_lossless(path: Path) -> bool:
    """A WebP whose image is VP8L (lossless) rather than VP8: its RIFF chunks say."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    pos = 12
    while pos + 8 <= len(head):
        fourcc, size = head[pos:pos + 4], int.from_bytes(head[pos + 4:pos + 8], "little")
        if fourcc in (b"VP8L", b"VP8 "):
            return fourcc == b"VP8L"
        pos += 8 + size + (size & 1)
    return False


def _encoding(im: Image.Image, path: Path) -> dict[str, object]:
    if im.format == "JPEG":
        if im.mode not in ("RGB", "L"):  # CMYK tables do not fit the RGB written back
            return {}
        options: dict[str, object] = {"qtables": im.quantization}
        sampling = JpegImagePlugin.get_sampling(im)
        if sampling != -1:
            options["subsampling"] = sampling
        if "progressive" in im.info or "progression" in im.info:
            options["progressive"] = True
        return options
    if im.format == "PNG":
        text = getattr(im, "text", {}) or {}
        items = tuple((k, v) for k, v in text.items() if k != _PNG_XMP)
        return {"text": items} if items else {}
    if im.format == "WEBP":
        return {"lossless": True} if _webp_lossless(path) else {"quality": 95}
    if im.format == "TIFF":
        compression = im.info.get("compression")
        tags = {k: v for k, v in im.tag_v2.items() if k in _TIFF_KEEP and k != 700}
        options = {"tiffinfo": tags}
        if compression and compression != "raw":
            options["compression"] = compression
        return options
    return {}


def _pixels_8bit(im: Image.Image, path: Path) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(RGB, alpha, gray) from Pillow's decode of an 8-bit image."""
    mode = im.mode
    if mode in ("1", "L", "LA", "La"):
        gray = np.asarray(im.convert("LA" if mode in ("LA", "La") else "L"))
        luma, alpha = (gray[..., 0], gray[..., 1]) if gray.ndim == 3 else (gray, None)
        return np.repeat(luma[..., None], 3, axis=2), alpha, True
    has_alpha = mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in im.info)
    array = np.asarray(im.convert("RGBA" if has_alpha else "RGB"))
    if has_alpha:
        return np.ascontiguousarray(array[..., :3]), np.ascontiguousarray(array[..., 3]), False
    return array, None, False


def _pixels_16bit(path: Path) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(RGB, alpha, gray) from OpenCV's decode of a 16-bit PNG or TIFF, stored orientation
    for PNG (TIFF decoders apply the orientation themselves)."""
    image = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InputError(f"input {path} is not a readable image; check that the file is complete")
    if image.dtype not in (np.uint8, np.uint16):
        raise InputError(f"input {path} has {image.dtype} samples; only 8- and 16-bit images are supported")
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2), None, True
    if image.shape[2] == 2:
        return np.repeat(image[..., :1], 3, axis=2), np.ascontiguousarray(image[..., 1]), True
    if image.shape[2] == 4:
        return (np.ascontiguousarray(image[..., 2::-1]), np.ascontiguousarray(image[..., 3]), False)
    return np.ascontiguousarray(image[..., ::-1]), None, False


def read_image(path: str | Path) -> ImageFile:
    """Read a still image upright, with what ``write_image`` needs to write it back.

    Raises:
        InputError: missing, not a regular file, not a readable image, or not 8/16-bit.
    """
    path = Path(path)
    check_input_file(path)
    try:
        with Image.open(path) as im:
            exif = im.getexif()
            orientation = int(exif.get(ORIENTATION, 1) or 1)
            orientation = orientation if 1 <= orientation <= 8 else 1
            if _sixteen_bit(im):
                if im.format not in ("PNG", "TIFF"):
                    raise InputError(f"input {path} has more than 8 bits per sample in a format gpen-video "
                                     "cannot write back; convert it to 16-bit PNG or TIFF")
                rgb, alpha, gray = _pixels_16bit(path)
            else:
                im.load()  # a TIFF comes back upright here, and without its orientation tag
                rgb, alpha, gray = _pixels_8bit(im, path)
            if im.format == "TIFF":
                orientation = 1
            raw_exif = im.info.get("exif") if im.format in _EXIF_FORMATS else None
            dpi = im.info.get("dpi")
            record = ImageFile(
                path=path,
                rgb=upright(rgb, orientation),
                alpha=upright(alpha, orientation) if alpha is not None else None,
                format=im.format or _FORMATS.get(path.suffix.lower(), "PNG"),
                gray=gray,
                orientation=orientation,
                exif=bytes(raw_exif) if raw_exif else None,
                icc_profile=im.info.get("icc_profile") or None,
                xmp=_xmp(im),
                dpi=(float(dpi[0]), float(dpi[1])) if dpi else None,
                encoding=MappingProxyType(_encoding(im, path)),
            )
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"input {path} is not a readable image ({exc}); check that the file is complete") from None
    return record


# --------------------------------------------------------------------------- writing


def _icc_space(profile: bytes) -> str | None:
    try:
        return ImageCms.ImageCmsProfile(io.BytesIO(profile)).profile.xcolor_space.strip()
    except (OSError, ImageCms.PyCMSError, TypeError, ValueError):
        return None


def _format_for(path: Path) -> str:
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise OutputError(f"cannot write an image as {path.suffix or 'no extension'} ({path}); use "
                          f"one of {', '.join(sorted(IMAGE_SUFFIXES))}")
    return fmt


def _to_8bit(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    return np.round(pixels.astype(np.float32) / 257.0).astype(np.uint8)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, as Pillow converts RGB to L: gray pixels (R = G = B) stay exact."""
    peak = 65535 if rgb.dtype == np.uint16 else 255
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # [HW]
    return np.clip(np.round(luma), 0, peak).astype(rgb.dtype)


def _encode_16bit(fmt: str, pixels: np.ndarray, alpha: np.ndarray | None, gray: bool,
                  exif: bytes | None, icc: bytes | None) -> bytes:
    if gray:
        array = _luma(pixels) if alpha is None else np.dstack([_luma(pixels), alpha])
    else:
        bgr = pixels[..., ::-1]
        array = bgr if alpha is None else np.dstack([bgr, alpha])
    array = np.ascontiguousarray(array)
    kinds, blocks = [], []
    if fmt == "PNG":
        if exif:
            kinds.append(cv2.IMAGE_METADATA_EXIF)
            blocks.append(np.frombuffer(exif.removeprefix(_EXIF_HEADER), np.uint8))
        if icc:
            kinds.append(cv2.IMAGE_METADATA_ICCP)
            blocks.append(np.frombuffer(icc, np.uint8))
    ext = ".png" if fmt == "PNG" else ".tiff"
    if kinds and not hasattr(cv2, "imencodeWithMetadata"):  # OpenCV before 4.12
        log.info("this OpenCV writes no metadata; the 16-bit PNG is written without EXIF and ICC")
        kinds = []
    if kinds:
        ok, data = cv2.imencodeWithMetadata(ext, array, kinds, blocks)
    else:
        ok, data = cv2.imencode(ext, array)
    if not ok:
        raise OutputError(f"OpenCV could not encode a 16-bit {fmt} image")
    return data.tobytes()


def _pillow_image(pixels: np.ndarray, alpha: np.ndarray | None, gray: bool, fmt: str) -> Image.Image:
    pixels = _to_8bit(pixels)
    if fmt == "JPEG" and alpha is not None:
        log.info("JPEG has no alpha channel; the transparency is left out")
        alpha = None
    alpha = _to_8bit(alpha) if alpha is not None else None
    if gray:
        luma = _luma(pixels)
        return Image.fromarray(luma if alpha is None else np.dstack([luma, alpha]), "L" if alpha is None else "LA")
    if alpha is not None:
        return Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def write_image(path: str | Path, rgb: np.ndarray, image: ImageFile | None = None, *,
                overwrite: bool = False) -> None:
    """Write upright RGB ``rgb`` to ``path`` (format by extension) as ``image`` was stored.

    Args:
        path: the output file; written atomically with the user's normal permissions.
        rgb: (H, W, 3) uint8 or uint16 RGB, upright: ``image.rgb`` or a restored copy.
        image: the ``read_image`` record of the source: its alpha, orientation, metadata and
            encoding are carried over. None writes ``rgb`` plainly.
        overwrite: replace an existing ``path``.

    Raises:
        OutputError: unknown extension, unusable folder, full disk, or ``path`` exists
            without ``overwrite``.
    """
    path = Path(path)
    fmt = _format_for(path)
    if image is None:
        image = ImageFile(path=path, rgb=rgb, alpha=None, format=fmt)
    check_shape("rgb", rgb, image.rgb.shape)
    carries_exif = image.exif is not None and fmt in _EXIF_FORMATS
    orientation = image.orientation if carries_exif else 1
    pixels = stored(rgb, orientation)
    alpha = stored(image.alpha, orientation) if image.alpha is not None else None
    icc = image.icc_profile
    if icc is not None and _icc_space(icc) != ("GRAY" if image.gray else "RGB"):
        log.info("%s: the source's ICC profile does not describe %s pixels; it is left out",
                 path, "gray" if image.gray else "RGB")
        icc = None
    if pixels.dtype == np.uint16 and fmt in ("PNG", "TIFF"):
        if fmt == "TIFF" and (image.exif or icc or image.xmp):
            log.info("%s: 16-bit TIFF is written without metadata (OpenCV writes none)", path)
        data = _encode_16bit(fmt, pixels, alpha, image.gray, image.exif if carries_exif else None, icc)
    else:
        data = _encode_pillow(fmt, pixels, alpha, image, icc, carries_exif)
    write_atomic(path, data, overwrite=overwrite)


def _encode_pillow(fmt: str, pixels: np.ndarray, alpha: np.ndarray | None, image: ImageFile,
                   icc: bytes | None, carries_exif: bool) -> bytes:
    pil = _pillow_image(pixels, alpha, image.gray, fmt)
    options: dict[str, object] = {}
    if fmt == image.format:
        options.update(image.encoding)
        if fmt == "JPEG" and pil.mode != ("L" if image.gray else "RGB"):
            options.pop("qtables", None)
    if fmt == "JPEG" and "qtables" not in options:
        options["quality"] = 95
    if fmt == "WEBP" and "lossless" not in options:
        options.setdefault("quality", 95)
    if carries_exif:
        options["exif"] = image.exif
    if icc is not None and fmt != "BMP":
        options["icc_profile"] = icc
    if image.dpi is not None and fmt in ("JPEG", "PNG", "TIFF"):
        options["dpi"] = image.dpi
    if fmt == "PNG":
        pnginfo = PngInfo()
        for key, value in options.pop("text", ()):
            pnginfo.add_text(key, value)
        if image.xmp is not None:
            pnginfo.add_itxt(_PNG_XMP, image.xmp.decode("utf-8", "replace"))
        options["pnginfo"] = pnginfo
    if image.xmp is not None:
        if fmt in ("JPEG", "WEBP"):
            options["xmp"] = image.xmp
        elif fmt == "TIFF":
            options["tiffinfo"] = {**dict(options.get("tiffinfo", {})), 700: image.xmp}
    buffer = io.BytesIO()
    try:
        pil.save(buffer, fmt, **options)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutputError(f"cannot encode the image as {fmt} ({exc}); pick another image extension") from None
    return buffer.getvalue()


def copy_unchanged(src: str | Path, dst: str | Path, *, overwrite: bool = False) -> None:
    """Copy ``src`` to ``dst`` byte for byte (for an image where nothing was restored).

    Atomic like every write; ``dst`` gets the user's normal permissions.

    Raises:
        OutputError: unusable folder, full disk, or ``dst`` exists without ``overwrite``.
    """
    copy_atomic(src, dst, overwrite=overwrite)
