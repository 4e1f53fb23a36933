"""Errors of the computing side.

Hierarchy::

    LookalikeError
    ├── InvalidInput          the input can never succeed: 4xx for a job, dead letter for an event
    │   ├── ImageRejected     not an image, truncated, too large or too small (``code`` says which)
    │   │   ├── CropRejected  a crop box that does not lie inside the image (``crop_outside_image``)
    │   │   └── FetchError    an image URL that could not be fetched (``workers.fetch``)
    │   │       ├── FetchRefused   not http(s), or it resolves to a refused address (``url_refused``),
    │   │       │                  or redirects too often (``too_many_redirects``)
    │   │       ├── FetchFailed    DNS, connection, timeout or HTTP status (``url_unreachable``,
    │   │       │                  ``url_timeout``, ``url_status``)
    │   │       └── FetchTooLarge  more bytes than the limit (``too_large``)
    │   ├── UploadExpired     a job's upload left Redis before a worker took it (``upload_expired``)
    │   └── InvalidEvent      a catalog event that is not valid JSON or breaks the schema
    └── Transient             may succeed later: retried with backoff, the consumer pauses
"""

from __future__ import annotations


class LookalikeError(Exception):
    """Base of every error this package raises on purpose."""

    code = "error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidInput(LookalikeError):
    code = "invalid_input"


class ImageRejected(InvalidInput):
    code = "invalid_image"


class CropRejected(ImageRejected):
    code = "crop_outside_image"


class FetchError(ImageRejected):
    code = "url_unreachable"


class FetchRefused(FetchError):
    code = "url_refused"


class FetchFailed(FetchError):
    """Fetching failed; ``retryable`` when trying again may help (timeouts, connection errors, 429, 5xx)."""

    code = "url_unreachable"

    def __init__(self, message: str, code: str | None = None, retryable: bool = True) -> None:
        super().__init__(message, code)
        self.retryable = retryable


class FetchTooLarge(FetchError):
    code = "too_large"


class UploadExpired(InvalidInput):
    code = "upload_expired"


class InvalidEvent(InvalidInput):
    code = "invalid_event"


class Transient(LookalikeError):
    code = "transient"
