from __future__ import annotations

import pandas as pd

from chexfound.cli.main import main
from chexfound.data.manifest import read_manifest


def test_cli_stop_resume_strict(corpus, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["curate", "--spec", str(corpus.spec), "--out", str(out), "--exclude", str(corpus.exclude),
            "--workers", "0", "--quiet"]
    assert main(base + ["--stop-after", "3"]) == 3
    assert "rerun" in capsys.readouterr().err
    assert main(base) == 0
    msg = capsys.readouterr()
    assert "3 reused" in msg.out and "quarantine.csv" in msg.err
    man = read_manifest(out / "manifest.csv", check_paths=True)
    assert len(man) and (out / "duplicates.csv").is_file()
    # --strict: a quarantined file makes the exit status non-zero (outputs are still written)
    assert main(base + ["--strict"]) == 1


def test_cli_user_errors_exit_2(tmp_path, capsys):
    assert main(["curate", "--spec", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    bad = tmp_path / "ex.csv"
    bad.write_text("who\n1\n")
    spec = tmp_path / "s.yaml"
    spec.write_text(f"sources:\n  - {{name: a, root: {tmp_path}, format: folder}}\n")
    assert main(["curate", "--spec", str(spec), "--out", str(tmp_path / "o"), "--exclude", str(bad)]) == 2
    assert "patient_id" in capsys.readouterr().err


def test_embedding_dedup_is_consistent_with_the_backbone(corpus, tmp_path):
    """Embedding dedup (cosine of the backbone's CLS embeddings of the cached images). A random tiny ViT has
    no semantics, so this checks the mechanics: reported cosines are the backbone's, every removed image is
    within the threshold of the kept one it names, and no two kept images are."""
    import json

    import numpy as np
    import torch

    from chexfound.data.transform import InputTransform
    from chexfound.io import read_image
    from chexfound.models.registry import create_backbone

    out = tmp_path / "o"
    thr = 0.995
    args = ["curate", "--spec", str(corpus.spec), "--out", str(out), "--workers", "0", "--quiet", "--device", "cpu",
            "--set", "dedup.phash_threshold=null", "--set", f"dedup.embedding={{backbone: tiny_vit, threshold: {thr}}}"]
    assert main(args) == 0
    dups = pd.read_csv(out / "duplicates.csv")
    man = read_manifest(out / "manifest.csv")
    emb_dups = dups[dups["method"] == "embedding"]
    assert len(emb_dups) and list(out.glob("work/embeddings-*.npz"))
    torch.manual_seed(0)
    model = create_backbone("tiny_vit").eval()
    tf = InputTransform.for_backbone(model.cfg)
    cached = dict(zip(man.df["source_path"], man.paths()))

    def embed(paths):
        x = torch.stack([tf(read_image(p).pixels) for p in paths])
        with torch.inference_mode():
            e = model.forward_features(x)["x_norm_clstoken"].numpy()
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    kept = embed(list(man.paths()))
    s = kept @ kept.T
    np.fill_diagonal(s, -1)
    assert s.max() < thr  # no two kept images are embedding duplicates
    # removed images were cached too: find their cached file through the run's records
    recs = [json.loads(line) for line in (out / "work/records.jsonl").read_text().splitlines()]
    by_key = {r["key"]: r for r in recs}
    removed = embed([out / by_key[k]["file"] for k in emb_dups["key"]])
    their_kept = embed([cached[p] for p in emb_dups["kept_path"]])
    cos = (removed * their_kept).sum(1)
    assert np.allclose(cos, emb_dups["cosine"].to_numpy(), atol=1e-4) and (cos >= thr - 1e-4).all()


def test_cli_limit_takes_the_first_images_of_every_source(corpus, tmp_path, capsys):
    from chexfound.curate.spec import load_spec

    n_sources = len(load_spec(corpus.spec).sources)
    out = tmp_path / "o"
    assert main(["curate", "--spec", str(corpus.spec), "--out", str(out), "--workers", "0", "--quiet",
                 "--limit", "1"]) == 0
    assert f"curate: {n_sources} listed" in capsys.readouterr().out
