"""Curation of pretraining corpora: filters, dedup, preprocessing cache."""
