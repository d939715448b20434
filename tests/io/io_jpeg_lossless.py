"""A minimal JPEG lossless (ITU T.81 process 14, first-order prediction, "SV1") encoder for tests.

No encoder for DICOM's JPEG Lossless transfer syntax (1.2.840.10008.1.2.4.70) ships with our
dependencies, so the tests encode real pixels themselves and check the decoder gives them back exactly.
One Huffman table with every category (0-16) coded in 5 bits keeps it short; compression is irrelevant.
"""

from __future__ import annotations

import struct

import numpy as np


class _Bits:
    def __init__(self) -> None:
        self.out = bytearray()
        self.acc = 0
        self.n = 0

    def put(self, value: int, nbits: int) -> None:
        for i in range(nbits - 1, -1, -1):
            self.acc = (self.acc << 1) | ((value >> i) & 1)
            self.n += 1
            if self.n == 8:
                self.out.append(self.acc)
                if self.acc == 0xFF:
                    self.out.append(0x00)  # byte stuffing inside entropy-coded data
                self.acc, self.n = 0, 0

    def flush(self) -> bytes:
        if self.n:
            self.put((1 << (8 - self.n)) - 1, 8 - self.n)  # pad with 1-bits
        return bytes(self.out)


def encode_jpeg_lossless(img: np.ndarray, precision: int = 16) -> bytes:
    """Encode a 2-D unsigned integer array (values < 2**precision) with predictor 1, point transform 0."""
    a = np.asarray(img, dtype=np.int64)
    h, w = a.shape
    mod = 1 << 16
    bits = _Bits()
    for y in range(h):
        for x in range(w):
            if x == 0 and y == 0:
                pred = 1 << (precision - 1)
            elif y == 0:
                pred = a[y, x - 1]
            elif x == 0:
                pred = a[y - 1, x]
            else:
                pred = a[y, x - 1]
            d = int(a[y, x] - pred) % mod
            if d >= 32768:
                d -= mod  # now in [-32768, 32767]
            if d == -32768:
                bits.put(16, 5)  # category 16 carries no extra bits
                continue
            ssss = abs(d).bit_length()
            bits.put(ssss, 5)
            if ssss:
                bits.put(d if d > 0 else d - 1 + (1 << ssss), ssss)
    scan = bits.flush()
    counts = [0] * 16
    counts[4] = 17  # 17 codes of length 5: symbol k <- code k
    dht = bytes([0x00]) + bytes(counts) + bytes(range(17))
    sof = struct.pack(">BHHB", precision, h, w, 1) + bytes([1, 0x11, 0])
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # Ns=1, Cs=1, Td/Ta=0, Ss=predictor 1, Se=0, Ah/Al=0
    seg = lambda marker, body: struct.pack(">BBH", 0xFF, marker, len(body) + 2) + body  # noqa: E731
    return b"\xff\xd8" + seg(0xC3, sof) + seg(0xC4, dht) + seg(0xDA, sos) + scan + b"\xff\xd9"
