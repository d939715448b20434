"""Curation of pretraining corpora: pool public CXR datasets, filter, deduplicate, cache (`chexfound curate`).

    chexfound curate --spec corpus.yaml --out DIR [--exclude patients.csv] [--workers 2]

- `spec`: the YAML corpus spec (every key in docs/examples/corpus.yaml: sources with formats manifest |
  folder | a reader of chexfound.data.readers; filters; dedup; cache; report) -> `CorpusSpec`, `load_spec`.
- `sources`: every image of every source as one item table (patients namespaced "<namespace>:<id>").
- `filters`: view / modality / size / age / blank rules and the patient exclusion list, counted per rule.
- `hashing`: exact digest of decoded pixels; 256-bit DCT pHash on a rank-equalised area thumbnail.
- `index`: exact all-pairs-within-radius Hamming search by multi-index hashing (sub-quadratic).
- `dedup`: exact groups, near-duplicate edges (pHash, optional backbone embeddings), greedy resolution.
- `image_cache`: decode once, hash, resize (shorter side N), 8/16-bit PNG files or tar shards; resumable
  records (not to be confused with adapt's feature cache).
- `keep`: which copy of a duplicate group is kept (lossless, more pixels, more grey levels, source, path).
- `views`: the view codes and presets the filters and the spec share.
- `report`: manifest.csv, duplicates.csv, quarantine.csv, filtered.csv, report.md/html with figures.
- `pipeline.run_curation`: all of the above in order.
"""
