"""The gateway's early image check gives a 4xx for every bad file of the decode corpus it can see."""

import pytest

from gateway.errors import ApiError
from gateway.uploads import check_image
from tests.workers.test_decode import BAD, GOOD, encode, photo, png_header_only

MAX_PIXELS = 4096 * 4096


@pytest.mark.parametrize("name", GOOD)
def test_good_files_pass(name):
    data, (height, width), _ = GOOD[name]
    fmt, w, h = check_image(data, 10 * 1024 * 1024, MAX_PIXELS)
    assert fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
    assert {w, h} == {width, height}  # before EXIF rotation


@pytest.mark.parametrize("name", BAD)
def test_bad_files_are_4xx_or_left_to_the_worker(name):
    """Header-only checks: truncated, corrupt pixel data and too-small images are the worker's (also 4xx)."""
    data = BAD[name][0]
    try:
        check_image(data, 10 * 1024 * 1024, MAX_PIXELS)
    except ApiError as exc:
        assert 400 <= exc.status < 500 and exc.message
    else:
        assert BAD[name][1] in ("truncated", "corrupt", "too_small")


@pytest.mark.parametrize("data, status, code", [
    (b"%PDF-1.4\n%%EOF", 415, "unsupported_format"),
    (b'<svg xmlns="http://www.w3.org/2000/svg"/>', 415, "unsupported_format"),
    (png_header_only(100_000, 100_000), 422, "too_many_pixels"),  # Pillow's own bomb error, once a 500
    (png_header_only(5000, 5000), 422, "too_many_pixels"),
])
def test_documents_and_bombs(data, status, code):
    with pytest.raises(ApiError) as caught:
        check_image(data, 10 * 1024 * 1024, MAX_PIXELS)
    assert (caught.value.status, caught.value.code) == (status, code)


def test_png_named_jpg_is_accepted_as_png():
    assert check_image(encode(photo(), "PNG"), 10 * 1024 * 1024, MAX_PIXELS)[0] == "PNG"
