"""chexfound: an open implementation of CheXFound, the chest X-ray foundation model.

Pipeline: io -> data -> models -> ssl -> adapt -> evaluate -> serve, with the CLI on top.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
