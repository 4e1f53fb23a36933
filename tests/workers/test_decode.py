"""A corpus of good and bad image files, generated here with Pillow, each with its expected outcome."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.conftest import SAMPLE

from schemas.api import Box
from workers.decode import Decoded, decode, decode_reduced
from workers.errors import ImageRejected
from workers.imagefile import MIN_SIDE_PX

MAX_PIXELS = 4096 * 4096
W, H = 64, 48


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def photo(mode: str = "RGB", size: tuple[int, int] = (W, H)) -> Image.Image:
    """Red left half, blue right half: survives JPEG, tells left from right after rotation."""
    image = Image.new("RGB", size, (204, 0, 0))
    image.paste((0, 0, 204), (size[0] // 2, 0, size[0], size[1]))
    return image.convert(mode)


def with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(photo(), "JPEG", exif=exif)


def png_16bit_grey() -> bytes:
    values = np.full((H, W), 40000, dtype=np.uint16)
    return encode(Image.fromarray(values), "PNG")


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring width x height, then one tiny IDAT: a bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + png_chunk(b"IEND", b""))


def animated_gif() -> bytes:
    frames = [photo("P"), Image.new("RGB", (W, H), (0, 204, 0)).convert("P")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def palette_png_transparent() -> bytes:
    image = photo("P")
    image.info["transparency"] = image.getpixel((0, 0))  # the red half becomes transparent
    return encode(image, "PNG", transparency=image.getpixel((0, 0)))


def corrupt_header_jpeg() -> bytes:
    data = bytearray(encode(photo(), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = b"\x00\x00\x00\x00"  # height and width 0
    return bytes(data)


def garbled_png_data() -> bytes:
    data = bytearray(encode(photo(), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start:start + 20] = b"\xde\xad\xbe\xef" * 5  # zlib stream garbage, CRC now wrong too
    return bytes(data)


def png_damaged_exif() -> bytes:
    """A good PNG whose eXIf chunk is not TIFF data: the metadata is lost, the photo is fine."""
    data = encode(photo(), "PNG")
    at = data.index(b"IDAT") - 4
    return data[:at] + png_chunk(b"eXIf", b"X" * 16) + data[at:]


def webp_damaged_exif() -> bytes:
    return encode(photo(), "WEBP", quality=90, exif=b"Exif\x00\x00" + b"X" * 16)


def mpo() -> bytes:
    """A JPEG with an MPF index of a second, smaller image (what cameras write for a large preview):
    Pillow names it MPO; the first image is the photo."""
    return encode(photo(), "MPO", save_all=True, append_images=[photo(size=(32, 32))])


def tiff_turned() -> bytes:
    """:func:`photo` stored on its side in a TIFF, EXIF orientation 6 turning it back (red on the left)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo().transpose(Image.Transpose.ROTATE_90), "TIFF", exif=exif)


def tiff_float(values: np.ndarray) -> bytes:
    return encode(Image.fromarray(values.astype(np.float32)), "TIFF")


def webp_truncated() -> bytes:
    data = encode(photo(size=(256, 256)), "WEBP", quality=90)
    return data[:len(data) * 9 // 10]


def avif_broken() -> bytes:
    """An AVIF whose primary item does not exist: Pillow's AVIF plugin raises RuntimeError opening it."""
    data = bytearray(encode(photo(), "AVIF"))
    at = data.index(b"pitm")
    data[at + 8:at + 10] = b"\x00\x63"
    return bytes(data)


def dds_broken() -> bytes:
    """A DDS with no pixel-format flags: Pillow's DDS plugin raises NotImplementedError opening it."""
    data = bytearray(encode(photo(), "DDS"))
    struct.pack_into("<I", data, 80, 0)
    return bytes(data)


def bmp_bad_bit_depth() -> bytes:
    data = bytearray(encode(photo(), "BMP"))
    data[28:30] = struct.pack("<H", 7)  # bits per pixel: 7 does not exist
    return bytes(data)


GOOD = {
    # name: (bytes, expected (height, width), pixel (y, x) -> expected RGB, or None)
    "jpeg": (encode(photo(), "JPEG"), (H, W), ((10, 5), (204, 0, 0))),
    "jpeg_progressive": (encode(photo(), "JPEG", progressive=True), (H, W), ((10, 5), (204, 0, 0))),
    "jpeg_grey": (encode(photo("L"), "JPEG"), (H, W), None),
    "jpeg_cmyk": (encode(photo("CMYK"), "JPEG"), (H, W), ((10, 5), (204, 0, 0))),
    "jpeg_exif_rotate_90": (with_orientation(6), (W, H), ((5, 10), (204, 0, 0))),  # left half is now on top
    "jpeg_exif_rotate_180": (with_orientation(3), (H, W), ((10, 5), (0, 0, 204))),
    "jpeg_exif_mirror": (with_orientation(2), (H, W), ((10, 5), (0, 0, 204))),
    "jpeg_trailing_garbage": (encode(photo(), "JPEG") + b"\0garbage after EOI", (H, W), ((10, 5), (204, 0, 0))),
    "png_rgb": (encode(photo(), "PNG"), (H, W), ((10, 5), (204, 0, 0))),
    "png_rgba_transparent_is_white": (encode(Image.new("RGBA", (W, H), (0, 0, 0, 0)), "PNG"), (H, W),
                                      ((10, 5), (255, 255, 255))),
    "png_rgba_half_alpha": (encode(Image.new("RGBA", (W, H), (0, 0, 0, 128)), "PNG"), (H, W),
                            ((10, 5), (127, 127, 127))),
    "png_grey": (encode(photo("L"), "PNG"), (H, W), None),
    "png_grey_alpha": (encode(photo("LA"), "PNG"), (H, W), None),
    "png_palette": (encode(photo("P"), "PNG"), (H, W), ((10, 5), (204, 0, 0))),
    "png_palette_transparent": (palette_png_transparent(), (H, W), ((10, 5), (255, 255, 255))),
    "png_1bit": (encode(photo("1"), "PNG"), (H, W), None),
    "png_16bit_grey": (png_16bit_grey(), (H, W), ((10, 5), (156, 156, 156))),
    "webp_lossy": (encode(photo(), "WEBP", quality=90), (H, W), ((10, 5), (204, 0, 0))),
    "webp_lossless_alpha": (encode(Image.new("RGBA", (W, H), (0, 0, 0, 0)), "WEBP", lossless=True), (H, W),
                            ((10, 5), (255, 255, 255))),
    "gif": (encode(photo("P"), "GIF"), (H, W), ((10, 5), (204, 0, 0))),
    "gif_animated_first_frame": (animated_gif(), (H, W), ((10, 5), (204, 0, 0))),
    "bmp": (encode(photo(), "BMP"), (H, W), ((10, 5), (204, 0, 0))),
    "tiff": (encode(photo(), "TIFF"), (H, W), ((10, 5), (204, 0, 0))),
    "tiff_lzw": (encode(photo(), "TIFF", compression="tiff_lzw"), (H, W), ((10, 5), (204, 0, 0))),
    "tiff_cmyk": (encode(photo("CMYK"), "TIFF"), (H, W), ((10, 5), (204, 0, 0))),
    "smallest_accepted": (encode(photo(size=(MIN_SIDE_PX, MIN_SIDE_PX)), "PNG"), (MIN_SIDE_PX, MIN_SIDE_PX), None),
    "jpeg_mpo_with_preview": (mpo(), (H, W), ((10, 5), (204, 0, 0))),
    "png_damaged_exif": (png_damaged_exif(), (H, W), ((10, 5), (204, 0, 0))),
    "webp_damaged_exif": (webp_damaged_exif(), (H, W), ((10, 5), (204, 0, 0))),
    "png_grey_colour_key_is_white": (encode(Image.new("L", (W, H), 0), "PNG", transparency=0), (H, W),
                                     ((10, 5), (255, 255, 255))),
    "png_rgb_colour_key_is_white": (encode(photo(), "PNG", transparency=(204, 0, 0)), (H, W),
                                    ((10, 5), (255, 255, 255))),
    "png_16bit_grey_colour_key_is_white": (encode(Image.fromarray(np.zeros((H, W), np.uint16)), "PNG", transparency=0),
                                           (H, W), ((10, 5), (255, 255, 255))),
    "tiff_exif_rotate_90": (tiff_turned(), (H, W), ((10, 5), (204, 0, 0))),
    "tiff_float_white": (tiff_float(np.ones((H, W))), (H, W), ((10, 5), (255, 255, 255))),
    "tiff_float_mid_grey": (tiff_float(np.full((H, W), 0.5)), (H, W), ((10, 5), (128, 128, 128))),
    # The extension is not ours to see: content decides, so a PNG "named" .jpg is a PNG.
    "png_bytes_named_jpg": (encode(photo(), "PNG"), (H, W), ((10, 5), (204, 0, 0))),
}

BAD = {
    # name: (bytes, code, words the message must contain)
    "zero_bytes": (b"", "empty", "0 bytes"),
    "text": (b"hello, this is text", "not_an_image", "not an image"),
    "html": (b"<!doctype html><html><body>404</body></html>", "not_an_image", "not an image"),
    "random_bytes": (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not_an_image",
                     "not an image"),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"/>', "unsupported_format", "SVG"),
    "svg_with_xml_prolog": (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "unsupported_format",
                            "SVG"),
    "svg_after_a_comment": (b'<!-- drawn by hand -->\n<svg xmlns="http://www.w3.org/2000/svg"/>', "unsupported_format",
                            "SVG"),
    "svg_with_doctype": (b'<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "x.dtd">\n<svg/>', "unsupported_format",
                         "SVG"),
    "html_with_inline_svg": (b"<!doctype html><html><body><svg/></body></html>", "not_an_image", "not an image"),
    "pdf": (b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF", "unsupported_format", "PDF"),
    # Formats Lookalike does not read, broken so that their Pillow plugins raise what no other plugin does.
    "avif_broken": (avif_broken(), "not_an_image", "not an image"),
    "dds_broken": (dds_broken(), "not_an_image", "not an image"),
    "webp_truncated": (webp_truncated(), "truncated", "truncated"),
    "ico": (encode(photo(size=(64, 64)), "ICO"), "unsupported_format", "ICO"),
    "jpeg_truncated_in_data": (encode(photo(size=(256, 256)), "JPEG")[:-400], "truncated", "truncated"),
    "jpeg_header_only": (encode(photo(), "JPEG")[:200], "truncated", "truncated"),
    "png_truncated": (encode(photo(), "PNG")[:-30], "truncated", "truncated"),
    "jpeg_corrupt_header": (corrupt_header_jpeg(), "corrupt", "corrupt"),
    "png_corrupt_data": (garbled_png_data(), "corrupt", "corrupt"),
    "png_bomb_header": (png_header_only(100_000, 100_000), "too_many_pixels", "10000000000 pixels"),
    "png_bomb_within_pillow_limit": (png_header_only(10_000, 10_000), "too_many_pixels", "10000x10000"),
    "bmp_bad_bit_depth": (bmp_bad_bit_depth(), "corrupt", "corrupt"),
    "too_small_width": (encode(photo(size=(20, 64)), "PNG"), "too_small", "20x64"),
    "too_small_both": (encode(photo(size=(16, 16)), "JPEG"), "too_small", "16x16"),
    "one_pixel_gif": (encode(photo("P", size=(1, 1)), "GIF"), "too_small", "1x1"),
}


@pytest.mark.parametrize("name", GOOD)
def test_good_files_decode_to_rgb(name):
    data, shape, probe = GOOD[name]
    pixels = decode(data, MAX_PIXELS)
    assert pixels.dtype == np.uint8 and pixels.shape == (*shape, 3)
    if probe is not None:
        (y, x), rgb = probe
        assert np.abs(pixels[y, x].astype(int) - rgb).max() <= 12, pixels[y, x]


def test_jpegs_decode_to_exactly_pillows_pixels():
    """Plain JPEGs go through torchvision's libjpeg-turbo: the corpus's JPEGs in every EXIF
    orientation, grey and progressive ones, and 64 catalog photos give Pillow's own pixels."""
    files = [data for name, (data, _, _) in GOOD.items() if data.startswith(b"\xff\xd8")]
    files += [with_orientation(o) for o in range(1, 9)]
    files += [p.read_bytes() for p in sorted((SAMPLE / "images").glob("*.jpg"))[:64]]
    assert len(files) > 70
    for data in files:
        expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        assert np.array_equal(decode(data, MAX_PIXELS), expected)


@pytest.mark.parametrize("name", BAD)
def test_bad_files_are_refused_with_a_reason(name):
    data, code, words = BAD[name]
    with pytest.raises(ImageRejected) as caught:
        decode(data, MAX_PIXELS)
    assert caught.value.code == code, caught.value.message
    assert words in caught.value.message


def test_the_corpus_has_at_least_30_kinds():
    assert len(GOOD) + len(BAD) >= 30


def test_pixel_and_byte_limits_name_the_values():
    data = encode(Image.new("RGB", (300, 200)), "PNG")
    with pytest.raises(ImageRejected, match="300x200 px, more than the 10000-pixel limit") as caught:
        decode(data, 10_000)
    assert caught.value.code == "too_many_pixels"
    with pytest.raises(ImageRejected, match=f"{len(data)} bytes, more than the 100-byte limit") as caught:
        decode(data, MAX_PIXELS, max_bytes=100)
    assert caught.value.code == "too_large"


def test_pixel_limit_counts_pixels_after_rotation_the_same():
    with pytest.raises(ImageRejected) as caught:
        decode(with_orientation(6), W * H - 1)
    assert caught.value.code == "too_many_pixels"


def big_photo(size: tuple[int, int], **params) -> bytes:
    """A catalog photo scaled up to a phone photo's size, with a little noise (a sensor's), as JPEG."""
    image = Image.open(SAMPLE / "queries" / "10128.jpg").convert("RGB").resize(size, Image.BICUBIC)
    noise = np.random.default_rng(0).normal(0, 3, (size[1], size[0], 3))
    return encode(Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8)), "JPEG", quality=90,
                  **params)


def test_a_large_jpeg_is_decoded_reduced_but_not_below_the_long_side_asked():
    data = big_photo((1500, 2000))
    whole = decode(data, MAX_PIXELS)
    for min_long_side, shape in ((448, (500, 375)), (500, (500, 375)), (501, (1000, 750)), (1000, (1000, 750))):
        reduced = decode_reduced(data, MAX_PIXELS, min_long_side)
        assert reduced.pixels.shape == (*shape, 3) and (reduced.width, reduced.height) == (1500, 2000), min_long_side
        # The same photo as the whole decoding, resized: libjpeg's scaled inverse DCT low-passes it as it goes.
        resized = np.asarray(Image.fromarray(whole).resize(shape[::-1], Image.BOX))
        assert np.abs(resized.astype(int) - reduced.pixels).mean() < 2.0
    assert decode_reduced(data, MAX_PIXELS, 1001).pixels.shape == whole.shape  # under twice 1001: whole
    assert decode_reduced(data, MAX_PIXELS, 100).pixels.shape == (125, 94, 3)  # 1/8 (250x188), then halved

    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side, turned by EXIF: 2000x1500 as shown
    turned = decode_reduced(big_photo((1500, 2000), exif=exif), MAX_PIXELS, 448)
    assert turned.pixels.shape == (375, 500, 3) and (turned.width, turned.height) == (2000, 1500)


def test_a_region_keeps_its_own_long_side_when_reduced():
    data = big_photo((1500, 2000))  # whole, it would be decoded at 1/4 (375x500)
    for region, shape in ((Box(x=0, y=0, w=600, h=800), (2000, 1500)), (Box(x=100, y=900, w=1000, h=1000), (1000, 750)),
                          (Box(x=0, y=0, w=1500, h=2000), (500, 375))):
        reduced = decode_reduced(data, MAX_PIXELS, 448, region=region)
        assert reduced.pixels.shape == (*shape, 3) and (reduced.width, reduced.height) == (1500, 2000), region
        inner = reduced.from_upload(region)
        assert max(inner.w, inner.h) >= 448 and reduced.to_upload(inner) == region


def test_other_formats_are_reduced_after_decoding_and_small_ones_are_decoded_as_decode_does():
    whole = photo(size=(1500, 2000))
    whole.paste((0, 204, 0), (0, 0, 752, 999))  # green: one edge on the grid of 4x4 blocks, one inside a block
    png = decode_reduced(encode(whole, "PNG"), MAX_PIXELS, 448)  # 2000 // 448: the mean of each 4x4 block
    assert png.pixels.shape == (500, 375, 3) and (png.width, png.height) == (1500, 2000)
    assert np.array_equal(png.pixels, np.asarray(whole.resize((375, 500), Image.BOX)))
    assert decode_reduced(encode(whole, "PNG"), MAX_PIXELS, 1001).pixels.shape == (2000, 1500, 3)  # under twice
    # A screenshot's size, not a multiple of the factor (5): the last row of blocks is short, boxes map back whole.
    screenshot = decode_reduced(encode(photo(size=(1170, 2532)), "PNG"), MAX_PIXELS, 448)
    assert screenshot.pixels.shape == (507, 234, 3)
    assert screenshot.to_upload(Box(x=0, y=0, w=234, h=507)) == Box(x=0, y=0, w=1170, h=2532)
    assert screenshot.from_upload(Box(x=585, y=0, w=585, h=2532)) == Box(x=117, y=0, w=117, h=507)
    small = (SAMPLE / "queries" / "10128.jpg").read_bytes()  # 224 px: under twice 448
    reduced = decode_reduced(small, MAX_PIXELS, 448)
    assert np.array_equal(reduced.pixels, decode(small, MAX_PIXELS)) and (reduced.width, reduced.height) == (224, 224)


@pytest.mark.parametrize("name", GOOD)
def test_good_files_decode_reduced_to_rgb_of_their_own_size(name):
    data, shape, probe = GOOD[name]  # 64x48 and the like: reduced to half with a long side of 32 allowed
    reduced = decode_reduced(data, MAX_PIXELS, 32)
    assert (reduced.height, reduced.width) == shape and reduced.pixels.dtype == np.uint8
    half = max(shape) >= 64
    assert reduced.pixels.shape[:2] == (tuple(side // 2 for side in shape) if half else shape)
    if probe is not None:  # the same colours: alpha, palettes and 16 bits resolved before the pixels are averaged
        (y, x), rgb = probe
        assert np.abs(reduced.pixels[y // 2, x // 2].astype(int) - rgb).max() <= 12, reduced.pixels[y // 2, x // 2]


@pytest.mark.parametrize("name", BAD)
def test_bad_files_are_refused_by_decode_reduced_with_the_same_reason(name):
    data, code, words = BAD[name]
    with pytest.raises(ImageRejected) as caught:
        decode_reduced(data, MAX_PIXELS, 32)  # a long side of 32 allowed: the JPEGs take the reduced path
    assert caught.value.code == code and words in caught.value.message, caught.value.message


def test_a_large_truncated_jpeg_is_refused_on_the_reduced_path():
    data = big_photo((1500, 2000))
    with pytest.raises(ImageRejected) as caught:
        decode_reduced(data[:len(data) // 2], MAX_PIXELS, 448)
    assert caught.value.code == "truncated"


def test_a_box_in_reduced_pixels_maps_to_the_uploads_pixels():
    reduced = Decoded(np.zeros((500, 375, 3), np.uint8), width=1500, height=2000)
    assert reduced.to_upload(Box(x=10, y=20, w=100, h=200)) == Box(x=40, y=80, w=400, h=800)
    assert reduced.to_upload(Box(x=0, y=0, w=375, h=500)) == Box(x=0, y=0, w=1500, h=2000)
    odd = Decoded(np.zeros((250, 188, 3), np.uint8), width=1500, height=2000)  # 1/8, sides rounded up
    assert odd.to_upload(Box(x=0, y=0, w=188, h=250)) == Box(x=0, y=0, w=1500, h=2000)  # clipped to the upload
    assert odd.to_upload(Box(x=1, y=1, w=1, h=1)) == Box(x=7, y=8, w=9, h=8)  # outward to whole pixels (x 7.98-15.96)
    assert reduced.from_upload(Box(x=40, y=80, w=400, h=800)) == Box(x=10, y=20, w=100, h=200)
    assert reduced.from_upload(Box(x=1, y=1, w=1, h=1)) == Box(x=0, y=0, w=1, h=1)  # outward: x 0.25-0.5
    assert odd.from_upload(Box(x=0, y=0, w=1500, h=2000)) == Box(x=0, y=0, w=188, h=250)
