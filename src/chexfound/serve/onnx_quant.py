"""int8 ONNX models (`chexfound export --format onnx --quantize int8`) with ONNX Runtime's quantization tools.

Two modes, both with int8 weights per output channel on every MatMul/Gemm:
- "dynamic" (default): activation scales computed per batch at run time (`DynamicQuantizeLinear` +
  `MatMulInteger`); no calibration data, nothing that can go stale when the image population changes.
- "static": QDQ nodes with activation ranges calibrated (min/max) on real images the user names
  (`--calibrate FILES|FOLDER`); the file's metadata records which images (names and count).

The export's metadata records `precision`, `quantization` and `calibration`. `verify_onnx` checks the result
against the fp32 PyTorch model within an int8 tolerance.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

QUANT_MODES = ("dynamic", "static")
OP_TYPES = ["MatMul", "Gemm"]


class _ImageReader:
    """onnxruntime's CalibrationDataReader protocol over prepared images (one batch of `batch` at a time)."""

    def __init__(self, batches: Iterator[np.ndarray]) -> None:
        self._batches = batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._batches, None)
        return None if x is None else {"image": x}


def calibration_batches(paths: Sequence[str | PathLike[str]], prepare: Callable[[Any], Any],
                        batch: int = 4) -> Iterator[np.ndarray]:
    """Normalised float32 [b, 3, S, S] batches of the calibration images (unreadable ones raise: the user
    named them)."""
    from chexfound.io import read_image

    buf: list[np.ndarray] = []
    for p in paths:
        buf.append(np.asarray(prepare(read_image(p).pixels), dtype=np.float32))
        if len(buf) == batch:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)


def quantize_onnx(src: str | PathLike[str], dst: str | PathLike[str], mode: str = "dynamic",
                  calibration: Sequence[str | PathLike[str]] = (), prepare: Callable[[Any], Any] | None = None,
                  ) -> dict[str, Any]:
    """Write an int8 version of the fp32 ONNX model `src` to `dst`; returns what the metadata should record."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    from chexfound.errors import ConfigError

    if mode not in QUANT_MODES:
        raise ConfigError(None, f"quantization mode {mode!r}: use one of {', '.join(QUANT_MODES)}")
    large = Path(src).stat().st_size > (1 << 31) - 1 or any(Path(src).parent.glob("*.data"))
    if mode == "dynamic":
        if calibration:
            raise ConfigError(None, "--calibrate is for static quantization (--quantize-mode static)")
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=OP_TYPES, use_external_data_format=large)
        return {"precision": "int8", "quantization": "dynamic (onnxruntime, int8 weights per channel, "
                                                     "activations per batch at run time)", "calibration": None}
    if not calibration or prepare is None:
        raise ConfigError(None, "static quantization needs calibration images: --calibrate FILES|FOLDER")
    reader = _ImageReader(calibration_batches(calibration, prepare))
    quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=OP_TYPES,
                    calibrate_method=CalibrationMethod.MinMax, use_external_data_format=large)
    names = [Path(p).name for p in calibration]
    return {"precision": "int8", "quantization": "static QDQ (onnxruntime, int8 weights per channel, activation "
                                                 "ranges by min/max calibration)",
            "calibration": {"images": len(names), "files": names[:100]}}
