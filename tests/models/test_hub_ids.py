"""`hf://OWNER/NAME[@REVISION][/FILE]` ids wherever weights are taken, resolved offline from a cache folder in the
hub's own layout (HF_HOME, HF_HUB_OFFLINE=1): API, Predictor and CLI, with the revision and SHA-256 recorded."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ckpt_layouts import tiny, to_chexfound_hub
from hub_cache import put_in_hub_cache
from chexfound.adapt import LinearHead, load_head, save_head
from chexfound.cli.main import main
from chexfound.data.findings import NIH14
from chexfound.errors import CheckpointError, ConfigError
from chexfound.models import create_backbone
from chexfound.models.format import read_meta
from chexfound.models.pooled_file import read_features
from chexfound.models.hub import SHORT_NAMES, parse_hub_id, resolve_weights
from chexfound.serve import Predictor
from chexfound.serve.bundle import load_pair, save_bundle

REPO = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD = "fedcba9876543210fedcba9876543210fedcba98"


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def st_bytes(sd: dict[str, torch.Tensor], tmp: Path) -> bytes:
    save_file(sd, str(tmp))
    return tmp.read_bytes()


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """An offline hub cache holding `tester/tiny-chexfound` (Hub layout + config.json + a head trained on it) at
    two commits: `main` -> COMMIT, `v0` -> OLD (other weights)."""
    home = tmp_path / "hf-home"
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    original = tiny("tiny_vit", seed=5).state_dict()
    weights = st_bytes(to_chexfound_hub(original), tmp_path / "w.safetensors")
    config = json.dumps({"num_heads": 2, "unknown": "kept out"}).encode()
    local = tmp_path / "local"
    local.mkdir()
    (local / "model.safetensors").write_bytes(weights)
    (local / "config.json").write_bytes(config)
    bb = create_backbone(local)
    head = LinearHead(NIH14, n_blocks=2, embed_dim=64, avgpool=True)
    torch.nn.init.normal_(head.linear.weight, std=0.2)
    save_head(head, tmp_path / "head.safetensors", backbone_sha256=bb.info.weights_sha256)
    head_bytes = (tmp_path / "head.safetensors").read_bytes()
    put_in_hub_cache(home, "tester/tiny-chexfound", {"model.safetensors": weights, "config.json": config,
                                                     "heads/nih14-linear.safetensors": head_bytes}, COMMIT)
    old = st_bytes(to_chexfound_hub(tiny("tiny_vit", seed=6).state_dict()), tmp_path / "old.safetensors")
    put_in_hub_cache(home, "tester/tiny-chexfound", {"model.safetensors": old, "config.json": config}, OLD, "v0")
    return {"home": home, "local": local, "sha": sha256(weights), "old_sha": sha256(old), "backbone": bb,
            "head_sha": sha256(head_bytes)}


# -- ids ---------------------------------------------------------------------------------------------------------
def test_ids_parse_and_the_short_name() -> None:
    h = parse_hub_id("hf://DIAL-RPI/CheXFound")
    assert (h.repo_id, h.revision, h.file) == ("DIAL-RPI/CheXFound", None, None)
    h = parse_hub_id(f"hf://o/n.x@{COMMIT}/sub/dir/model.safetensors")
    assert (h.repo_id, h.revision, h.file) == ("o/n.x", COMMIT, "sub/dir/model.safetensors")
    assert str(h) == f"hf://o/n.x@{COMMIT}/sub/dir/model.safetensors"
    assert SHORT_NAMES["chexfound-vitl16"] == "hf://DIAL-RPI/CheXFound"
    assert parse_hub_id("chexfound-vitl16") == parse_hub_id("hf://DIAL-RPI/CheXFound")


@pytest.mark.parametrize("bad, why", [
    ("hf://../n", "owner '..'"), ("hf://o/..", "name '..'"), ("hf://o/a..b", "not a Hub name"),
    ("hf://o/n/../x", r"'\.\.' component"), ("hf://o/n/a/./b", "component"), ("hf://o//n", "empty name"),
    ("hf:///o/n", "empty owner"), ("hf://o/n//etc/passwd", "absolute file part"), ("hf://o/n/", "trailing slash"),
    ("hf://o", "no repository name"), ("hf://o/n@", "revision ''"), ("hf://o/n@..", "revision '..'"),
    ("hf://o/n/C:/x", "absolute file part"), ("hf://o/n/a\\b", "backslash"), ("hf://o/n--x", "not a Hub name"),
    (str(Path("hf://o/n")), "pathlib.Path collapses"),
])
def test_bad_ids_are_refused_before_any_lookup(bad: str, why: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # any lookup would fail differently
    with pytest.raises(ConfigError, match=why):
        create_backbone(bad)


def test_without_huggingface_hub_the_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ConfigError, match=r"hf://DIAL-RPI/CheXFound: .*pip install 'chexfound\[hub\]'"):
        create_backbone("chexfound-vitl16")
    assert resolve_weights("tiny_vit").local == "tiny_vit"  # names and paths never need the hub


# -- offline resolution from the cache -----------------------------------------------------------------------------
def test_api_resolves_offline_with_provenance(hub: dict) -> None:
    m = create_backbone("hf://tester/tiny-chexfound")
    snap = hub["home"] / "hub" / "models--tester--tiny-chexfound" / "snapshots" / COMMIT
    assert m.info.source == str(snap / "model.safetensors") and m.info.format == "chexfound_hub"
    assert m.info.origin["hub"] == {"id": "hf://tester/tiny-chexfound", "repo_id": "tester/tiny-chexfound",
                                    "revision": "main", "commit": COMMIT, "file": "model.safetensors",
                                    "sha256": hub["sha"]}
    assert "config.json" in m.info.config_source  # the sidecar beside it in the snapshot was read
    assert m.info.weights_sha256 == hub["backbone"].info.weights_sha256
    assert "hf://tester/tiny-chexfound" in m.info.provenance() and COMMIT[:12] in m.info.provenance()
    # A revision (tag) and an explicit file resolve to that commit's bytes.
    old = create_backbone("hf://tester/tiny-chexfound@v0/model.safetensors")
    assert old.info.origin["hub"]["commit"] == OLD and old.info.origin["hub"]["sha256"] == hub["old_sha"]
    assert old.info.weights_sha256 != m.info.weights_sha256
    pinned = create_backbone(f"hf://tester/tiny-chexfound@{COMMIT}")
    assert pinned.info.weights_sha256 == m.info.weights_sha256 and pinned.info.origin["hub"]["revision"] == COMMIT


def test_predictor_and_head_from_ids(hub: dict) -> None:
    head = load_head("hf://tester/tiny-chexfound/heads/nih14-linear.safetensors")
    assert head.info.meta["hub"]["sha256"] == hub["head_sha"] and head.info.meta["hub"]["commit"] == COMMIT
    with pytest.raises(ConfigError, match="name the file"):
        load_head("hf://tester/tiny-chexfound")
    p = Predictor("hf://tester/tiny-chexfound", "hf://tester/tiny-chexfound/heads/nih14-linear.safetensors",
                  device="cpu")
    info = p.info()
    assert info["backbone"]["hub"]["commit"] == COMMIT and info["backbone"]["path"] == "model.safetensors"
    assert info["head"]["file_sha256"] == hub["head_sha"] and info["head"]["hub"]["file"] == \
        "heads/nih14-linear.safetensors"
    x = torch.randn(1, 3, 64, 64)
    ref = Predictor(hub["local"], hub["local"].parent / "head.safetensors", device="cpu")
    np.testing.assert_array_equal(p.predict_tensor(x)[0], ref.predict_tensor(x)[0])
    # A bundle (`export --format safetensors`, what `--model` reads) published on the Hub.
    bundle = hub["local"].parent / "bundle.safetensors"
    save_bundle(load_pair(hub["local"], hub["local"].parent / "head.safetensors"), bundle)
    put_in_hub_cache(hub["home"], "tester/bundle", {"classifier.safetensors": bundle})
    b = Predictor.from_bundle("hf://tester/bundle/classifier.safetensors", device="cpu")
    assert b.info()["backbone"]["hub"]["file"] == "classifier.safetensors"
    np.testing.assert_allclose(b.predict_tensor(x)[0], ref.predict_tensor(x)[0], atol=1e-6)
    # A named architecture with weights from an id (checkpoint=).
    named = create_backbone("tiny_vit", checkpoint="hf://tester/tiny-chexfound")
    assert named.info.origin["hub"]["commit"] == COMMIT and named.info.weights_sha256 == info["backbone"][
        "weights_sha256"]


def test_not_cached_offline_is_our_error_naming_the_id(hub: dict) -> None:
    with pytest.raises(CheckpointError) as e:
        create_backbone("hf://tester/not-downloaded@v2")
    msg = str(e.value)
    assert msg.startswith("hf://tester/not-downloaded@v2: not in the Hugging Face Hub cache")
    assert "HF_HUB_OFFLINE" in msg and "hf download tester/not-downloaded --revision v2" in msg
    with pytest.raises(CheckpointError, match="tiny-chexfound/nope.safetensors: not in the Hugging Face Hub cache"):
        create_backbone("hf://tester/tiny-chexfound/nope.safetensors")


def test_hub_torch_files_are_read_weights_only(hub: dict, tmp_path: Path) -> None:
    """A `.bin` in the Hub layout loads like the safetensors; a `.pth` with pickled objects is refused."""
    buf = io.BytesIO()
    torch.save(to_chexfound_hub(tiny("tiny_vit", seed=5).state_dict()), buf)
    evil = io.BytesIO()
    torch.save({"teacher": {"x": torch.zeros(1)}, "args": argparse.Namespace(cmd="rm -rf /")}, evil)
    put_in_hub_cache(hub["home"], "tester/torch-files", {"pytorch_model.bin": buf.getvalue(),
                                                         "config.json": b'{"num_heads": 2}',
                                                         "evil/teacher_checkpoint.pth": evil.getvalue()})
    m = create_backbone("hf://tester/torch-files")  # no model.safetensors: pytorch_model.bin, as in a folder
    assert m.info.origin["hub"]["file"] == "pytorch_model.bin"
    assert m.info.weights_sha256 == hub["backbone"].info.weights_sha256
    with pytest.raises(CheckpointError, match="pickled Python objects.*weights_only"):
        create_backbone("hf://tester/torch-files/evil/teacher_checkpoint.pth")


# -- the CLI -------------------------------------------------------------------------------------------------------
def test_cli_predict_and_convert_from_ids(hub: dict, tmp_path: Path, data_root: Path) -> None:
    image = sorted((data_root / "nih14-fullres" / "images").glob("*.png"))[0]
    out = tmp_path / "preds.json"
    assert main(["predict", "--backbone", "hf://tester/tiny-chexfound", "--head",
                 "hf://tester/tiny-chexfound/heads/nih14-linear.safetensors", "--quiet", "--out", str(out),
                 str(image)]) == 0
    got = Predictor(hub["local"], hub["local"].parent / "head.safetensors", device="cpu").predict([image])[0]
    written = json.loads(out.read_text())
    assert written["model"]["backbone"]["hub"]["commit"] == COMMIT  # provenance in what predict writes
    probs = {f["name"]: f["probability"] for f in written["predictions"][0]["findings"]}
    np.testing.assert_allclose([probs[f] for f in NIH14], got.probabilities, atol=1e-6)
    feats = tmp_path / "feats.safetensors"
    assert main(["embed", "--backbone", "hf://tester/tiny-chexfound", "--out",
                 str(feats), "--quiet", str(image)]) == 0
    meta = read_features(feats)["meta"]
    assert json.dumps(meta).count(COMMIT) >= 1 and hub["sha"] in json.dumps(meta)  # the hub file, in its record
    conv = tmp_path / "converted.safetensors"
    assert main(["convert", "hf://tester/tiny-chexfound", "--out", str(conv), "--quiet"]) == 0
    assert read_meta(conv)["source"]["hub"]["commit"] == COMMIT


def test_cli_subprocess_offline(hub: dict, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HOME": str(hub["home"]), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "c.safetensors"
    ok = subprocess.run([sys.executable, "-m", "chexfound", "convert", "hf://tester/tiny-chexfound@v0", "--out",
                         str(out), "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert read_meta(out)["source"]["hub"]["sha256"] == hub["old_sha"]
    miss = subprocess.run([sys.executable, "-m", "chexfound", "convert", "chexfound-vitl16", "--out",
                           str(tmp_path / "x.safetensors")], env=env, capture_output=True, text=True, timeout=300)
    assert miss.returncode == 2 and "Traceback" not in miss.stderr
    assert "hf://DIAL-RPI/CheXFound: not in the Hugging Face Hub cache" in miss.stderr
    assert "hf download DIAL-RPI/CheXFound" in miss.stderr


def test_online_lookup_order_and_errors(hub: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """With network (HF_HUB_OFFLINE unset) the client is asked, not only the cache: an id without a file takes
    the first weights file the repository has, and any client failure becomes our error naming the id."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    snap = hub["home"] / "hub" / "models--tester--tiny-chexfound" / "snapshots" / COMMIT
    asked: list[tuple[str, bool]] = []

    def fake(repo_id: str, filename: str, **kw: object) -> str:
        asked.append((filename, bool(kw["local_files_only"])))
        assert kw["cache_dir"] == str(hub["home"] / "hub")  # HF_HOME as set now
        if filename == "model.safetensors":
            raise errors.EntryNotFoundError(f"{filename} not in {repo_id}")
        if filename == "pytorch_model.bin":
            return str(snap / "model.safetensors")  # its bytes decide how it is read
        raise errors.EntryNotFoundError(filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    m = create_backbone("hf://tester/tiny-chexfound", num_heads=2)
    assert asked[:2] == [("model.safetensors", False), ("pytorch_model.bin", False)]
    assert {"config.json", "preprocessor_config.json", "config.yaml"} <= {f for f, _ in asked[2:]}
    assert m.info.origin["hub"]["file"] == "pytorch_model.bin" and m.info.origin["hub"]["commit"] == COMMIT

    def down(repo_id: str, filename: str, **kw: object) -> str:
        raise ConnectionError("Max retries exceeded with url: https://huggingface.co/...")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", down)
    with pytest.raises(CheckpointError, match=r"^hf://tester/x: could not get it from the Hugging Face Hub "
                                              r"\(ConnectionError: Max retries"):
        create_backbone("hf://tester/x")


def test_evaluate_records_the_hub_file(hub: dict) -> None:
    from chexfound.evaluate.pipeline import load_backbone_spec

    _, info, label = load_backbone_spec("hf://tester/tiny-chexfound")
    assert info["file_sha256"] == hub["sha"] and info["hub"]["commit"] == COMMIT and label == "tiny-chexfound"
