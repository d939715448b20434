"""chexfound: an open implementation of CheXFound, the chest X-ray foundation model.

Pipeline: io -> data -> models -> ssl -> adapt -> evaluate -> serve, with the CLI on top.
"""

__version__ = "0.1.0"

__all__ = ["Predictor", "__version__"]


def __getattr__(name: str) -> object:  # PEP 562
    # `chexfound.Predictor` (the serve stage's one-call API) is imported lazily so that `import chexfound`
    # stays light (no torch import) for the CLI and tools that only need the version.
    if name == "Predictor":
        from chexfound.serve.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'chexfound' has no attribute {name!r}")
