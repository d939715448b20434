"""The reports `chexfound predict` writes beside its CSV/JSON: `--dicom-out` (SR + heatmap Secondary Captures,
`dicom_out`) and `--fhir-out` (FHIR Bundles, `fhir`): which inputs still need them, writing them as each batch
is predicted, and saying what was left out (non-DICOM inputs once per file, DICOMs without UIDs by name)."""

from __future__ import annotations

import logging
import sys
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

from chexfound.serve.algorithm_id import AlgorithmIdentity
from chexfound.serve.dicom_out import DicomOutputs
from chexfound.serve.prediction import Prediction

log = logging.getLogger(__name__)


class ReportOutputs:
    def __init__(self, dicom: DicomOutputs | None, fhir_dir: Path | None, identity: AlgorithmIdentity | None) -> None:
        self.dicom, self.fhir_dir, self.identity = dicom, fhir_dir, identity
        self.written = {"sr": 0, "fhir": 0}

    @classmethod
    def open(cls, predictor: Any, dicom_out: str | PathLike[str] | None,
             fhir_out: str | PathLike[str] | None) -> "ReportOutputs":
        if not (dicom_out or fhir_out):
            return cls(None, None, None)
        identity = AlgorithmIdentity.of(predictor)
        if fhir_out:
            from chexfound.serve.fhir import check_available

            check_available()  # before any work: the fhir extra may be missing
        dicom = DicomOutputs(Path(dicom_out), identity) if dicom_out else None
        return cls(dicom, Path(fhir_out) if fhir_out else None, identity)

    def prepare(self, paths: Sequence[str | Path]) -> None:
        """Read the DICOM headers once; say which inputs get no SR and why."""
        if self.dicom is None:
            return
        self.dicom.prepare(paths)
        for p, why in self.dicom.not_dicom:  # once per file and run
            print(f"no DICOM SR for {p}: {why} (no study to attach it to)", file=sys.stderr)
        for p, why in self.dicom.skipped:
            log.warning("no DICOM SR for %s: %s", p, why)

    def wants(self, path: str | Path) -> bool:
        """Whether `path` still needs a report (so predict runs it again even when its row is done)."""
        if self.dicom is not None and self.dicom.wants(path):
            return True
        if self.fhir_dir is not None:
            from chexfound.serve.fhir import report_path

            return not report_path(self.fhir_dir, path).is_file()
        return False

    def write(self, pred: Prediction, which: Sequence[int]) -> None:
        """The reports of one successful prediction; `which`: the findings that get heatmaps."""
        if self.dicom is not None and self.dicom.wants(str(pred.path)):
            from chexfound.serve.overlay import overlay

            overlays = {} if pred.attention is None or pred.view is None else {
                i: overlay(pred.view, pred.attention[i]) for i in which}
            self.dicom.write(pred, which, overlays)
            self.written["sr"] += 1
        if self.fhir_dir is not None and self.identity is not None:
            from chexfound.serve.fhir import report_path, write_report

            if not report_path(self.fhir_dir, str(pred.path)).is_file():
                write_report(self.fhir_dir, pred, self.identity, self._study_uid(str(pred.path)))
                self.written["fhir"] += 1

    def _study_uid(self, path: str) -> str | None:
        if self.dicom is not None:
            return self.dicom.study_uid(path)
        from chexfound.serve.dicom_source import read_header

        try:
            uid = read_header(path).get("StudyInstanceUID")
        except Exception:  # not DICOM, unreadable header: the report simply names no study
            return None
        return str(uid) if uid else None

    def finish(self) -> None:
        """Write the skip list; one summary line per report kind."""
        if self.dicom is not None:
            listed = self.dicom.write_skips()
            print(f"{self.dicom.root}: {self.written['sr']} DICOM SRs written ({len(self.dicom.sources)} DICOM "
                  f"inputs), {len(self.dicom.not_dicom)} inputs not DICOM, {len(self.dicom.skipped)} DICOMs "
                  f"skipped" + (f" (listed in {listed})" if listed else ""), file=sys.stderr)
        if self.fhir_dir is not None:
            print(f"{self.fhir_dir}: {self.written['fhir']} FHIR reports written", file=sys.stderr)
