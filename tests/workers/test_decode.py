import io

import numpy as np
import pytest
from PIL import Image

from workers.decode import decode
from workers.errors import ImageRejected

MAX_PIXELS = 4096 * 4096


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def test_jpeg_decodes_to_rgb_uint8():
    pixels = decode(encode(Image.new("RGB", (64, 48), (200, 10, 10)), "JPEG"), MAX_PIXELS)
    assert pixels.shape == (48, 64, 3) and pixels.dtype == np.uint8
    assert abs(int(pixels[0, 0, 0]) - 200) < 5


def test_transparent_png_is_composited_over_white():
    pixels = decode(encode(Image.new("RGBA", (40, 40), (0, 0, 0, 0)), "PNG"), MAX_PIXELS)
    assert (pixels == 255).all()


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    assert decode(encode(image, "JPEG", exif=exif), MAX_PIXELS).shape == (80, 40, 3)


@pytest.mark.parametrize("data, code", [
    (b"", "empty"),
    (b"hello, this is text", "not_an_image"),
    (b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"/>', "not_an_image"),
    (encode(Image.new("RGB", (64, 64), "red"), "JPEG")[:200], "corrupt"),
    (encode(Image.new("RGB", (20, 64)), "PNG"), "too_small"),
    (encode(Image.new("RGB", (64, 64)), "ICO"), "unsupported_format"),
])
def test_bad_files_are_refused_with_a_reason(data, code):
    with pytest.raises(ImageRejected) as caught:
        decode(data, MAX_PIXELS)
    assert caught.value.code == code
    assert caught.value.message


def test_pixel_and_byte_limits_name_the_values():
    data = encode(Image.new("RGB", (300, 200)), "PNG")
    with pytest.raises(ImageRejected, match="300x200 px, more than the 10000-pixel limit"):
        decode(data, 10_000)
    with pytest.raises(ImageRejected, match=f"{len(data)} bytes, more than the 100-byte limit"):
        decode(data, MAX_PIXELS, max_bytes=100)
