"""Reading chest X-rays: PNG (8/16-bit), JPEG and DICOM into one `CXRImage`."""

from chexfound.io.image import CXRImage
from chexfound.io.read import read_image

__all__ = ["CXRImage", "read_image"]
