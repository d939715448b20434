"""Reading chest X-rays: PNG (8/16-bit), JPEG and DICOM into one `CXRImage`."""

from chexfound.io.failures import ImageReadError, ReadFailure
from chexfound.io.image import MAX_PIXELS, MIN_SIZE, CXRImage, check_min_size
from chexfound.io.read import declared_size, read_image, read_image_bytes

__all__ = ["CXRImage", "ImageReadError", "MAX_PIXELS", "MIN_SIZE", "ReadFailure", "check_min_size", "declared_size",
           "read_image", "read_image_bytes"]
