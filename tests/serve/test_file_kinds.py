"""predict / serve / export read model files by their bytes: a torch checkpoint named *.safetensors is loaded as
what it is (or refused with the project's error naming it) - never a raw SafetensorError traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from chexfound.cli.main import main
from chexfound.models import create_backbone
from chexfound.serve import Predictor


@pytest.fixture(scope="module")
def renamed(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("renamed")
    bb = create_backbone(models["backbone"])
    torch.save(bb.state_dict(), root / "torch_backbone.safetensors")  # a DINOv2-style .pth under the wrong name
    shutil.copy(models["linear"], root / "linear_head.pth")  # our safetensors head under a torch name
    (root / "garbage.safetensors").write_bytes(b"\x00\x01" * 600)
    return {"torch_backbone": root / "torch_backbone.safetensors", "head_pth": root / "linear_head.pth",
            "garbage": root / "garbage.safetensors"}


def test_predictor_reads_kinds_from_bytes(models: dict[str, Path], renamed: dict[str, Path],
                                          png_paths: list[Path]) -> None:
    ref = Predictor(models["backbone"], models["linear"], device="cpu")
    # The foreign state dict carries no architecture; it is the same weights, so the head's hash still matches.
    bb = create_backbone(renamed["torch_backbone"], config="tiny_vit")
    p = Predictor(bb, renamed["head_pth"], device="cpu")
    assert p.backbone_sha256 == ref.backbone_sha256 and p.pairing_warning is None
    a, b = ref.predict(png_paths[:1])[0], p.predict(png_paths[:1])[0]
    torch.testing.assert_close(torch.from_numpy(a.probabilities), torch.from_numpy(b.probabilities))


@pytest.mark.parametrize("verb", ["predict", "serve", "export"])
def test_cli_names_the_file_and_what_it_is(models: dict[str, Path], renamed: dict[str, Path], png_paths: list[Path],
                                           tmp_path: Path, verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    tail = {"predict": ["--out", str(tmp_path / "p.csv"), str(png_paths[0])], "serve": ["--port", "1"],
            "export": ["--format", "safetensors", "--out", str(tmp_path / "b.safetensors")]}[verb]
    # A head that is not a head file: the error says what it is.
    assert main([verb, "--backbone", str(models["backbone"]), "--head", str(renamed["garbage"]), *tail]) == 2
    err = capsys.readouterr().err
    assert f"{renamed['garbage']}: this is an unrecognised binary file, not a head file" in err
    # A bundle that is really a torch checkpoint.
    assert main([verb, "--model", str(renamed["torch_backbone"]), *tail]) == 2
    err = capsys.readouterr().err
    assert f"{renamed['torch_backbone']}: this is a PyTorch checkpoint (torch.save zip archive), not a chexfound " \
           "safetensors file" in err
    assert "Traceback" not in err and "SafetensorError" not in err
    # The renamed torch backbone (no config recorded) asks for its architecture instead of guessing.
    assert main([verb, "--backbone", str(renamed["torch_backbone"]), "--head", str(models["linear"]), *tail]) == 2
    assert "number of attention heads cannot be read" in capsys.readouterr().err


def test_predict_takes_the_architecture_of_a_bare_state_dict(models: dict[str, Path], renamed: dict[str, Path],
                                                             png_paths: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    assert main(["predict", "--backbone", str(renamed["torch_backbone"]), "--arch", "tiny_vit", "--head",
                 str(models["linear"]), "--quiet", "--out", str(out), str(png_paths[0])]) == 0
    assert out.is_file()


def test_head_and_bundle_whose_tensors_disagree_with_their_metadata_name_the_file(
        models: dict[str, Path], tmp_path: Path) -> None:
    """A head/bundle file whose metadata lost a key or lists other findings than its tensors hold is refused
    with a CheckpointError naming the file (it used to be a bare KeyError / load_state_dict RuntimeError)."""
    from chexfound.adapt import load_head
    from chexfound.errors import CheckpointError
    from chexfound.models.format import load_tensors, save_tensors
    from chexfound.serve.bundle import load_bundle, load_pair, save_bundle

    tensors, meta = load_tensors(models["linear"])
    more = tmp_path / "more_findings.safetensors"
    save_tensors(more, tensors, {**meta, "findings": [*meta["findings"], "Extra"]})
    with pytest.raises(CheckpointError, match=f"{more}: head tensors do not match its metadata"):
        load_head(more)
    lost = tmp_path / "no_n_blocks.safetensors"
    save_tensors(lost, tensors, {k: v for k, v in meta.items() if k != "n_blocks"})
    with pytest.raises(CheckpointError, match=f"{lost}: invalid head metadata .*n_blocks"):
        load_head(lost)

    bundle = tmp_path / "bundle.safetensors"
    save_bundle(load_pair(models["backbone"], models["linear"]), bundle)
    bt, bmeta = load_tensors(bundle)
    bad = tmp_path / "bad_bundle.safetensors"
    save_tensors(bad, bt, {**bmeta, "head": {**bmeta["head"], "findings": [*bmeta["head"]["findings"], "Extra"]}})
    with pytest.raises(CheckpointError, match=f"{bad}: head tensors do not match the bundle metadata"):
        load_bundle(bad)


def test_a_safetensors_header_length_that_looks_like_a_pickle_opcode(tmp_path):
    """A 640-byte header length starts with b"\\x80\\x02", a pickle's protocol marker: still safetensors."""
    import struct

    from chexfound.models.filekind import sniff

    header = b'{"__metadata__":{"k":"' + b"x" * (640 - 25) + b'"}}'
    assert len(header) == 640
    f = tmp_path / "h.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header)
    assert f.read_bytes()[:2] == b"\x80\x02" and sniff(f) == "safetensors"
