"""Evaluation: metrics with patient-level CIs, protocols, reports."""
