"""Where `chexfound predict --dicom-out DIR` puts its DICOM objects, and when an input is done.

    DIR/<stem>-<hash of the input's absolute path>/
        heatmap-<finding>.dcm   Secondary Captures (dicom_heatmap), for the findings predict draws
        sr.dcm                  the Comprehensive SR (dicom_sr), written last: its presence means done
    DIR/skipped.csv             DICOM inputs no SR can reference (missing UIDs), and why

One folder per input file, so two files that share a SOP Instance UID (it happens) never overwrite each
other. UIDs are derived from the input's path and UIDs and the model, so a rerun writes the same instances
again rather than duplicates. Every file is written atomically (chexfound.runio): a reader, or a PACS
watching the folder, never sees half an object.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydicom.uid import generate_uid

from chexfound.adapt.attribution import KIND_DESCRIPTIONS
from chexfound.runio import SKIPPED_FILE, atomic_write_bytes, skipped_rows, write_skipped
from chexfound.serve.algorithm_id import AlgorithmIdentity
from chexfound.serve.dicom_heatmap import build_heatmap_sc
from chexfound.serve.dicom_source import MissingUIDs, NotDicom, SourceReference, read_header, source_reference
from chexfound.serve.dicom_sr import build_sr, device_uid
from chexfound.serve.prediction import Prediction
from chexfound.serve.results import heatmap_folder, safe_name

log = logging.getLogger(__name__)
SR_FILE = "sr.dcm"


def dataset_bytes(ds: Any) -> bytes:
    """A highdicom/pydicom dataset as a DICOM file (preamble, file meta) in memory."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # highdicom's advice on names copied from the source
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=[p for p in parts])


@dataclass
class DicomOutputs:
    """The --dicom-out folder of one run: which inputs get objects, writing them, and the skips."""

    root: Path
    identity: AlgorithmIdentity
    sources: dict[str, SourceReference] = field(default_factory=dict)  # abspath -> clean reference
    not_dicom: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def folder(self, path: str | Path) -> Path:
        return self.root / heatmap_folder(path)

    def done(self, path: str | Path) -> bool:
        return (self.folder(path) / SR_FILE).is_file()

    def prepare(self, paths: Sequence[str | Path]) -> list[str]:
        """Read each input's header once: which need objects written (returned), which are not DICOM (no
        study to attach to: said once per file), which lack the UIDs an SR needs (a named skip)."""
        pending = []
        for p in paths:
            key = os.path.abspath(p)
            try:
                ref = source_reference(read_header(p), p)
            except NotDicom as e:
                self.not_dicom.append((str(p), str(e).removeprefix(f"{p}: ")))
                continue
            except MissingUIDs as e:
                self.skipped.append((str(p), str(e).removeprefix(f"{p}: ")))
                continue
            except OSError as e:  # unreadable: predict lists it among its own skips
                log.debug("%s: no DICOM header (%s)", p, e)
                continue
            self.sources[key] = ref
            if not self.done(p):
                pending.append(key)
        return pending

    def study_uid(self, path: str | Path) -> str | None:
        ref = self.sources.get(os.path.abspath(path))
        return None if ref is None else str(ref.dataset.StudyInstanceUID)

    def wants(self, path: str | Path) -> bool:
        return os.path.abspath(path) in self.sources and not self.done(path)

    def write(self, pred: Prediction, which: Sequence[int], overlays: dict[int, np.ndarray]) -> Path:
        """The heatmap Secondary Captures (`overlays`: finding index -> RGB overlay) and then the SR of one
        prediction. Returns the SR's path."""
        key = os.path.abspath(str(pred.path))
        ref = self.sources[key]
        folder = self.folder(key)
        device = device_uid(self.identity)
        study = str(ref.dataset.StudyInstanceUID)
        kind = self.identity.heatmap_kind or ""
        heat_series = _uid(study, device, "heatmaps")
        assert pred.probabilities is not None
        for n, i in enumerate(which, start=1):
            if i not in overlays:
                continue
            finding = pred.findings[i]
            sc = build_heatmap_sc(ref, overlays[i], finding, float(pred.probabilities[i]), self.identity,
                                  KIND_DESCRIPTIONS.get(kind, kind), instance_number=n,
                                  series_instance_uid=heat_series,
                                  sop_instance_uid=_uid(key, ref.sop_instance_uid, device, "heatmap", finding))
            atomic_write_bytes(folder / f"heatmap-{safe_name(finding)}.dcm", dataset_bytes(sc))
        sr = build_sr(ref, pred.findings_list(), self.identity, series_instance_uid=_uid(study, device, "sr"),
                      sop_instance_uid=_uid(key, ref.sop_instance_uid, device, "sr"))
        return atomic_write_bytes(folder / SR_FILE, dataset_bytes(sr))

    def write_skips(self) -> Path | None:
        """DIR/skipped.csv listing the DICOM inputs without SR (removed when there are none)."""
        return write_skipped(self.root / SKIPPED_FILE, skipped_rows("dicom-out", self.skipped))
