"""Still images: upright reading by EXIF orientation, metadata kept, byte-for-byte copies."""

from __future__ import annotations

import io
import os
import stat

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps, JpegImagePlugin
from PIL.PngImagePlugin import PngInfo
from skimage.data import astronaut

from gpen_video.errors import InputError, OutputError
from gpen_video.io.images import copy_unchanged, read_image, stored, upright, write_image
from tests.clips import pattern, psnr

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description about="gpen"/></rdf:RDF></x:xmpmeta>'


def _exif(orientation: int, make: str = "PhoneCo") -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = make
    return exif


def _pattern(h: int = 24, w: int = 36, seed: int = 0) -> np.ndarray:
    """Asymmetric content: any flip or turn changes it."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillow_exif_transpose(tmp_path, orientation):
    stored_pixels = _pattern()
    path = tmp_path / "in.png"
    Image.fromarray(stored_pixels).save(path, exif=_exif(orientation))
    image = read_image(path)
    reference = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert np.array_equal(image.rgb, reference)
    assert image.orientation == orientation
    assert np.array_equal(stored(upright(stored_pixels, orientation), orientation), stored_pixels)


def _astronaut_face_upright(rgb: np.ndarray) -> bool:
    """The detector finds the astronaut's face with eyes above the nose above the mouth."""
    from gpen_video.faces.detect import create_detector

    (det,) = create_detector("retinaface-mobile", detect_size=640).detect([rgb])
    if not len(det):
        return False
    lm = det.landmarks[int(np.argmax(det.scores))]  # [5, 2] eyes, nose, mouth corners
    return bool(max(lm[0, 1], lm[1, 1]) < lm[2, 1] < min(lm[3, 1], lm[4, 1]) and lm[0, 0] < lm[1, 0])


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_phone_photo_is_restored_upright_and_shown_the_same_way_round(tmp_path, orientation):
    face = astronaut()  # upright, as the phone's screen showed it
    src = tmp_path / "IMG_0001.jpg"
    exif = _exif(orientation)
    Image.fromarray(stored(face, orientation)).save(
        src, quality=90, subsampling=2, exif=exif, icc_profile=SRGB, dpi=(72, 72), xmp=XMP)
    assert not _astronaut_face_upright(stored(face, orientation))  # as stored: sideways

    image = read_image(src)
    assert psnr(image.rgb, face) > 30
    assert _astronaut_face_upright(image.rgb)

    restored = image.rgb.copy()
    restored[:64, :96] = (250, 20, 20)  # a change at the displayed top-left corner
    dst = tmp_path / "IMG_0001.restored.jpg"
    write_image(dst, restored, image)

    with Image.open(src) as a, Image.open(dst) as b:
        assert b.size == a.size  # stored the same way round, under the same EXIF
        assert b.info["exif"] == a.info["exif"] and b.getexif()[0x0112] == orientation
        assert b.info["icc_profile"] == SRGB and b.info["dpi"] == a.info["dpi"]
        assert b.info["xmp"] == a.info["xmp"]
        assert b.quantization == a.quantization
        assert JpegImagePlugin.get_sampling(b) == JpegImagePlugin.get_sampling(a) == 2
        shown = np.asarray(ImageOps.exif_transpose(b))
    assert psnr(shown, restored) > 30
    assert np.abs(shown[8:56, 8:88].astype(int) - (250, 20, 20)).mean() < 12
    assert _mode(dst) == 0o644


def test_png_keeps_alpha_text_icc_and_exif_exactly(tmp_path):
    rgba = np.dstack([_pattern(), np.linspace(0, 255, 24 * 36).reshape(24, 36).astype(np.uint8)])
    src = tmp_path / "logo.png"
    text = PngInfo()
    text.add_text("Comment", "scanned 1998")
    text.add_itxt("Title", "Fête de famille")
    Image.fromarray(rgba, "RGBA").save(src, pnginfo=text, icc_profile=SRGB, exif=_exif(8), dpi=(300, 300))
    image = read_image(src)
    assert image.alpha is not None and image.alpha.shape == image.rgb.shape[:2] == (36, 24)
    restored = image.rgb.copy()
    restored[:4] = 0
    dst = tmp_path / "logo.restored.png"
    write_image(dst, restored, image)
    with Image.open(dst) as out, Image.open(src) as original:
        assert out.mode == "RGBA"
        stored_out = np.asarray(out)
        assert np.array_equal(stored_out[..., 3], rgba[..., 3])  # alpha, stored orientation
        assert np.array_equal(upright(stored_out[..., :3], 8), restored)
        assert out.text["Comment"] == "scanned 1998" and out.text["Title"] == "Fête de famille"
        assert out.info["icc_profile"] == SRGB and out.getexif()[0x0112] == 8
        assert out.info["exif"] == original.info["exif"]
        assert tuple(round(v) for v in out.info["dpi"]) == (300, 300)


def test_nothing_restored_is_copied_byte_for_byte(tmp_path):
    src = tmp_path / "in.jpg"
    Image.fromarray(_pattern()).save(src, quality=70, exif=_exif(6), icc_profile=SRGB)
    os.chmod(src, 0o600)
    dst = tmp_path / "in.restored.jpg"
    copy_unchanged(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert _mode(dst) == 0o644  # the user's normal mode, not mkstemp's 0600 nor the source's
    dst.write_bytes(b"earlier output")
    with pytest.raises(OutputError, match="already exists"):
        copy_unchanged(src, dst)
    assert dst.read_bytes() == b"earlier output"
    copy_unchanged(src, dst, overwrite=True)
    assert dst.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jpg", "in.restored.jpg"]


def test_sixteen_bit_png_keeps_depth_exif_and_icc(tmp_path):
    stored16 = np.random.default_rng(1).integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    exif = _exif(6).tobytes()
    ok, data = cv2.imencodeWithMetadata(
        ".png", np.ascontiguousarray(stored16[..., ::-1]), [cv2.IMAGE_METADATA_EXIF, cv2.IMAGE_METADATA_ICCP],
        [np.frombuffer(exif[6:], np.uint8), np.frombuffer(SRGB, np.uint8)])
    src = tmp_path / "scan16.png"
    src.write_bytes(data.tobytes())
    image = read_image(src)
    assert image.rgb.dtype == np.uint16 and image.orientation == 6
    assert np.array_equal(image.rgb, upright(stored16, 6))
    dst = tmp_path / "scan16.restored.png"
    write_image(dst, image.rgb, image)
    back = cv2.imdecode(np.fromfile(str(dst), np.uint8), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and np.array_equal(back[..., ::-1], stored16)
    with Image.open(dst) as out:
        assert out.getexif()[0x0112] == 6 and out.getexif()[0x010F] == "PhoneCo"
        assert out.info["icc_profile"] == SRGB


def test_sixteen_bit_tiff_keeps_depth(tmp_path):
    """16-bit TIFF: pixels exact (metadata is not written: OpenCV has no TIFF metadata)."""
    stored16 = np.random.default_rng(2).integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    src = tmp_path / "scan16.tif"
    assert cv2.imwrite(str(src), stored16[..., ::-1])
    image = read_image(src)
    assert image.rgb.dtype == np.uint16 and np.array_equal(image.rgb, stored16)
    dst = tmp_path / "scan16.restored.tif"
    write_image(dst, image.rgb, image)
    back = cv2.imread(str(dst), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and np.array_equal(back[..., ::-1], stored16)


def _gray_jpeg(path):
    Image.fromarray(pattern(0, 48, 32)[..., 0], "L").save(path, quality=80)


def _palette_png(path):
    im = Image.fromarray(_pattern()).quantize(16)
    im.info["transparency"] = 0
    im.save(path, transparency=0)


def _cmyk_jpeg(path):
    Image.fromarray(pattern(0, 48, 32)).convert("CMYK").save(path, quality=90)


def _lossless_webp(path):
    Image.fromarray(_pattern()).save(path, lossless=True, exif=_exif(3))


def _gray_tiff(path):
    Image.fromarray(_pattern()[..., 1], "L").save(path, compression="tiff_lzw", description="negative 12")


@pytest.mark.parametrize(
    "make, name, mode, exact",
    [
        (_gray_jpeg, "g.jpg", "L", False),
        (_palette_png, "p.png", "RGBA", True),
        (_cmyk_jpeg, "c.jpg", "RGB", False),
        (_lossless_webp, "w.webp", "RGB", True),
        (_gray_tiff, "t.tif", "L", True),
    ],
)
def test_other_layouts_round_trip(tmp_path, make, name, mode, exact):
    src = tmp_path / name
    make(src)
    image = read_image(src)
    dst = tmp_path / f"out{src.suffix}"
    write_image(dst, image.rgb, image)
    again = read_image(dst)
    with Image.open(dst) as out, Image.open(src) as original:
        assert out.mode == mode
        if original.format == "TIFF":
            assert out.info["compression"] == "tiff_lzw" and out.tag_v2[270] == "negative 12"
        if original.format == "WEBP":
            assert out.info["exif"] == original.info["exif"]
        if original.mode == "CMYK":
            assert "icc_profile" not in out.info or not out.info["icc_profile"]
    assert np.array_equal(again.rgb, image.rgb) if exact else psnr(again.rgb, image.rgb) > 35
    if image.alpha is not None:
        assert np.array_equal(again.alpha, image.alpha)


@pytest.mark.parametrize("case", ["truncated", "text", "fifo", "missing"])
def test_unreadable_images_are_input_errors(tmp_path, case):
    path = tmp_path / "photo.jpg"
    if case == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(astronaut()).save(buffer, "JPEG")
        path.write_bytes(buffer.getvalue()[:5000])
    elif case == "text":
        path.write_text("not an image\n" * 10)
    elif case == "fifo":
        os.mkfifo(path)
    with pytest.raises(InputError) as err:
        read_image(path)
    assert str(path) in str(err.value)
    assert {"fifo": "pipe", "missing": "does not exist"}.get(case, "not a readable image") in str(err.value)
