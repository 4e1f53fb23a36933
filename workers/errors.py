"""Errors of the computing side.

Hierarchy::

    LookalikeError
    ├── InvalidInput          the input can never succeed: 4xx for a job, dead letter for an event
    │   ├── ImageRejected     not an image, truncated, too large or too small (``code`` says which)
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


class InvalidEvent(InvalidInput):
    code = "invalid_event"


class Transient(LookalikeError):
    code = "transient"
