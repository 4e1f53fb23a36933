"""The gateway's early image check gives a 4xx for every bad file of the decode corpus it can see."""

import pytest

from gateway.errors import ApiError
from gateway.uploads import check_image
from tests.workers.test_decode import BAD, GOOD, encode, photo, png_header_only

MAX_PIXELS = 4096 * 4096


@pytest.mark.parametrize("name", GOOD)
def test_good_files_pass(name):
    data, (height, width), _ = GOOD[name]
    seen = check_image(data, 10 * 1024 * 1024, MAX_PIXELS)
    assert seen.format in ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")
    assert {seen.width, seen.height} == {width, height}  # before EXIF rotation


@pytest.mark.parametrize("name", BAD)
def test_bad_files_are_4xx_with_the_workers_code_or_left_to_the_worker(name):
    """The worker's own header checks: truncated or corrupt pixel data is the worker's to find (also 4xx)."""
    data, code, _ = BAD[name]
    try:
        check_image(data, 10 * 1024 * 1024, MAX_PIXELS)
    except ApiError as exc:
        assert 400 <= exc.status < 500 and exc.message and exc.code == code
    else:
        assert code in ("truncated", "corrupt")


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
    assert check_image(encode(photo(), "PNG"), 10 * 1024 * 1024, MAX_PIXELS).format == "PNG"
