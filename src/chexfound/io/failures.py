"""Why an image could not be read: one `ReadFailure` kind per cause, carried by `ImageReadError`.

A user (or the page, or a quarantine list) needs to know which of these it is, because each has a
different remedy: re-export the study (truncated), try another decoder or source (undecodable), check
that the right file was sent (not an image), raise a limit (too large).
"""

from __future__ import annotations

import re
from enum import Enum
from os import PathLike

from chexfound.errors import CXRReadError


class ReadFailure(str, Enum):
    """Why a file could not be read, as a stable machine-readable kind (`ImageReadError.kind`)."""
    EMPTY = "empty"  # zero bytes
    NOT_AN_IMAGE = "not_an_image"  # neither DICOM nor a raster format we recognise
    CORRUPT_HEADER = "corrupt_header"  # a recognised format whose header cannot be parsed
    TRUNCATED = "truncated"  # the file ends before its pixel data do
    UNDECODABLE = "undecodable"  # the pixel data are all there, but the codec (or its framing) rejects them
    NO_PIXEL_DATA = "no_pixel_data"  # a readable DICOM object that carries no image
    TOO_LARGE = "too_large"  # declared dimensions over a pixel limit (refused before allocating)
    TOO_SMALL = "too_small"  # shorter side below the minimum (one model patch by default)
    UNSUPPORTED = "unsupported"  # colour, multi-frame, float pixel data, no decoder for the transfer syntax
    INVALID = "invalid"  # header values that contradict the data (zero rows, shape mismatch, NaN pixels)
    UNREADABLE_FILE = "unreadable_file"  # missing, a directory, or an OS error on read


class ImageReadError(CXRReadError):
    """A CXRReadError that also says which kind of failure it is (`kind`, a `ReadFailure`)."""

    def __init__(self, path: str | PathLike[str] | None, kind: ReadFailure, reason: str) -> None:
        self.kind = kind
        super().__init__(path, clean_message(reason))

    def __reduce__(self) -> tuple[type, tuple[str | None, ReadFailure, str]]:
        return (type(self), (self.path, self.kind, self.reason))


# Pillow and pydicom put the repr of our in-memory buffer in their messages ("cannot identify image file
# <_io.BytesIO object at 0x7f...>"): an address means nothing to a reader, the file name is already there.
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def clean_message(text: str) -> str:
    """A third-party message fit to show: object reprs dropped, whitespace collapsed, bounded length."""
    text = _OBJECT_REPR.sub("the data", text)
    text = " ".join(text.split())
    return text if len(text) <= 400 else text[:397] + "..."
