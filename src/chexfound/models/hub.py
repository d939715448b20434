"""Weights on the Hugging Face Hub, wherever a weights path is taken: `hf://OWNER/NAME[@REVISION][/FILE]`.

    create_backbone("hf://DIAL-RPI/CheXFound")                     # the official CheXFound ViT-L/16 weights
    create_backbone("chexfound-vitl16")                           # the same, by its short name
    create_backbone("hf://DIAL-RPI/CheXFound@<commit>/model.safetensors")   # pinned: revision and file

`resolve_weights(spec)` is the one resolver every entry point calls (`create_backbone`, `load_head`,
`Predictor`, the CLI's `--backbone` / `--head` / `--model` / `convert`): a local path comes back as it was, an
id comes back as the file in the hub's cache, with its repository, requested revision, commit and SHA-256 for
the model's provenance (`ModelInfo.origin["hub"]`). Nothing else parses ids.

Downloads go through `huggingface_hub` (optional: `pip install 'chexfound[hub]'`) and its cache, so `HF_HOME`,
`HF_HUB_CACHE`, `HF_HUB_OFFLINE=1` and `HF_TOKEN` mean what they mean to every other Hugging Face tool: a file
is downloaded once and then read from the cache; offline, only the cache is read. Ids are checked before any
lookup (owner, name and revision are plain names; the file part is a relative path without `.` / `..`
components or empty ones), and a downloaded file is read like a local one (its kind from its bytes, torch
files with `weights_only=True` only).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from os import PathLike
from pathlib import Path, PurePosixPath
from typing import Any

from chexfound.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

SCHEME = "hf://"
# Short names of published weights (documented in the README).
SHORT_NAMES: dict[str, str] = {"chexfound-vitl16": "hf://DIAL-RPI/CheXFound"}
# What a repository id without a file part means: the first of these it has (as a local folder is read).
BACKBONE_FILES = ("model.safetensors", "pytorch_model.bin", "teacher_checkpoint.pth")
# Read beside a weights file when present (architecture and preprocessing of some layouts).
SIDECARS = ("config.json", "preprocessor_config.json", "config.yaml")
INSTALL = "pip install 'chexfound[hub]'"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_OFFLINE_VALUES = ("1", "ON", "YES", "TRUE")


@dataclass(frozen=True)
class HubId:
    """A parsed, validated `hf://OWNER/NAME[@REVISION][/FILE]`."""

    owner: str
    name: str
    revision: str | None = None
    file: str | None = None

    @property
    def repo_id(self) -> str:
        return f"{self.owner}/{self.name}"

    def __str__(self) -> str:
        return (SCHEME + self.repo_id + (f"@{self.revision}" if self.revision else "")
                + (f"/{self.file}" if self.file else ""))

    def download_hint(self) -> str:
        """The command that puts this id in the cache, on a machine with internet."""
        rev = f" --revision {self.revision}" if self.revision else ""
        files = f" {self.file}" if self.file else ""
        return f"hf download {self.repo_id}{files}{rev}` (or `huggingface-cli download {self.repo_id}{files}{rev}"


@dataclass(frozen=True)
class HubFile:
    """One file of a Hub repository, in the local cache."""

    id: HubId
    file: str  # its path in the repository
    path: Path  # in the local cache
    commit: str
    sha256: str

    def origin(self) -> dict[str, Any]:
        """Provenance for `ModelInfo.origin["hub"]` and head metadata (JSON-safe)."""
        return {"id": str(self.id), "repo_id": self.id.repo_id, "revision": self.id.revision or "main",
                "commit": self.commit, "file": self.file, "sha256": self.sha256}


@dataclass(frozen=True)
class Weights:
    """What to open for a weights argument: `local` (the argument itself, or the hub file in the cache)."""

    spec: str | PathLike[str]
    local: str | PathLike[str]
    hub: HubFile | None = None


def is_hub_id(spec: object) -> bool:
    """Whether a weights argument names the Hub (an `hf://` id or a short name) rather than a local path.
    A local file or folder of the same name as a short name wins."""
    if not isinstance(spec, (str, PathLike)):
        return False
    s = os.fspath(spec)
    if not isinstance(s, str):
        return False
    if s.startswith("hf:/"):  # hf:/x: an id that went through pathlib, reported as such by parse_hub_id
        return True
    return s in SHORT_NAMES and not Path(s).exists()


def parse_hub_id(spec: str | PathLike[str]) -> HubId:
    """`hf://OWNER/NAME[@REVISION][/FILE]` or a short name -> HubId. Refused before any lookup: empty parts
    (an extra slash), `.` / `..` components, an absolute or drive-letter file part, backslashes, a revision
    with a slash, names with characters the Hub does not allow."""
    s = os.fspath(spec)
    s = SHORT_NAMES.get(s, s)
    if not s.startswith(SCHEME):
        why = (" (a pathlib.Path collapses the double slash: pass the id as a str)" if s.startswith("hf:/") else "")
        raise ConfigError(None, f"{s!r} is not a Hugging Face Hub id: write hf://OWNER/NAME[@REVISION][/FILE]{why}")
    rest = s[len(SCHEME):]

    def bad(why: str) -> ConfigError:
        return ConfigError(None, f"invalid Hugging Face Hub id {s!r}: {why} "
                                 "(expected hf://OWNER/NAME[@REVISION][/FILE])")

    if "\\" in rest:
        raise bad("backslashes are not allowed")
    owner, sep, tail = rest.partition("/")
    if not sep or not tail:
        raise bad("no repository name" if owner else "no owner")
    repo, sep, file = tail.partition("/")
    name, at, revision = repo.partition("@")
    for what, part in (("owner", owner), ("name", name)):
        if not part:
            raise bad(f"empty {what} (an extra slash?)")
        if not _NAME.match(part) or ".." in part or "--" in part or part.endswith((".", "-")):
            raise bad(f"{what} {part!r} is not a Hub name (letters, digits, '-', '_', '.'; no '..' or '--')")
    if at and (not revision or not _NAME.match(revision) or ".." in revision):
        raise bad(f"revision {revision!r} is not a branch, tag or commit name (no '/', no '..')")
    if sep:
        if not file:
            raise bad("empty file part (a trailing slash?)")
        parts = file.split("/")
        if file.startswith("/") or re.match(r"^[A-Za-z]:", file):
            raise bad(f"absolute file part {file!r}")
        if any(p in ("", ".", "..") for p in parts):
            raise bad(f"file part {file!r} has an empty, '.' or '..' component")
    return HubId(owner, name, revision or None, file or None)


def resolve_weights(spec: str | PathLike[str], default_files: tuple[str, ...] = BACKBONE_FILES) -> Weights:
    """A weights argument -> what to open. Local paths (and registry names) pass through untouched; Hub ids
    are validated, then looked up in (or downloaded into) the hub's cache. `default_files`: what an id without
    a file part means, in order (empty: the file part is required)."""
    if not is_hub_id(spec):
        return Weights(spec, spec)
    hub = resolve_hub(parse_hub_id(spec), default_files)
    return Weights(spec, hub.path, hub)


def resolve_hub(hid: HubId, default_files: tuple[str, ...] = BACKBONE_FILES) -> HubFile:
    """The file a validated id names, from the cache (downloaded first unless offline), plus the sidecar
    configs beside it that the cache holds or the Hub has."""
    hh = _import_hub(hid)
    candidates = (hid.file,) if hid.file else default_files
    if not candidates:
        raise ConfigError(None, f"{hid} names a repository: name the file in it (hf://{hid.repo_id}/FILE)")
    offline = _offline(hh)
    kw: dict[str, Any] = {"repo_id": hid.repo_id, "revision": hid.revision, "cache_dir": _cache_dir(),
                          "local_files_only": offline}
    errors = _errors(hh)
    not_cached: list[str] = []
    for name in candidates:
        try:
            path = Path(hh.hf_hub_download(filename=name, **kw))
        except errors["local"]:  # not in the cache, and offline or the Hub unreachable
            not_cached.append(name)
            continue
        except errors["entry"]:  # the repository has no such file
            continue
        except Exception as e:  # never a raw hub traceback: say what failed and for which id
            raise _hub_error(hid, e, errors) from e
        _fetch_sidecars(hh, hid, name, kw)
        return HubFile(hid, name, path, _commit_of(path, name), _sha256(path))
    if not_cached:
        where = _cache_dir() or "the default Hugging Face cache"
        how = ("HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached")
        raise CheckpointError(None, f"{hid}: not in the Hugging Face Hub cache ({where}) and {how}. Download it "
                                    f"once on a machine with internet (`{hid.download_hint()}`) with the same "
                                    "HF_HOME (or copy that cache folder here), or run with internet access")
    looked = ", ".join(candidates)
    raise CheckpointError(None, f"{hid}: the repository has no {looked}" + (
        "" if hid.file else f"; name the weights file: hf://{hid.repo_id}/FILE"))


def record(origin: dict[str, Any], weights: Weights) -> None:
    """Put a hub file's provenance into a model's `origin` (no-op for local files)."""
    if weights.hub is not None:
        origin["hub"] = weights.hub.origin()


# -- the hub client ----------------------------------------------------------------------------------------------
def _import_hub(hid: HubId) -> Any:
    try:
        import huggingface_hub
    except ImportError as e:
        raise ConfigError(None, f"{hid}: Hugging Face Hub ids need the huggingface_hub package: {INSTALL}") from e
    return huggingface_hub


def _errors(hh: Any) -> dict[str, Any]:
    import importlib

    try:  # `huggingface_hub.errors` since 0.24's successors; `huggingface_hub.utils` before
        e: Any = importlib.import_module(f"{hh.__name__}.errors")
    except ImportError:
        e = importlib.import_module(f"{hh.__name__}.utils")
    return {"local": e.LocalEntryNotFoundError, "entry": e.EntryNotFoundError,
            "repo": e.RepositoryNotFoundError, "revision": e.RevisionNotFoundError,
            "gated": getattr(e, "GatedRepoError", e.RepositoryNotFoundError)}


def _offline(hh: Any) -> bool:
    """HF_HUB_OFFLINE as set now (the client reads it once, at import), or as the client read it."""
    import importlib

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _OFFLINE_VALUES
    try:
        constants: Any = importlib.import_module(f"{hh.__name__}.constants")
    except ImportError:
        return env
    return env or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _cache_dir() -> str | None:
    """The hub cache as the environment says now (HF_HUB_CACHE, else HF_HOME/hub); None: the client's default."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.environ[var]
    home = os.environ.get("HF_HOME")
    return str(Path(home) / "hub") if home else None


def _hub_error(hid: HubId, e: Exception, errors: dict[str, Any]) -> Exception:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, errors["gated"]) and errors["gated"] is not errors["repo"]:
        return CheckpointError(None, f"{hid}: the repository is gated: accept its terms on huggingface.co and log "
                                     f"in (`hf auth login` or HF_TOKEN) ({first})")
    if isinstance(e, errors["repo"]):
        return CheckpointError(None, f"{hid}: no such repository on the Hugging Face Hub, or it is private "
                                     f"(log in with `hf auth login` or set HF_TOKEN) ({first})")
    if isinstance(e, errors["revision"]):
        return CheckpointError(None, f"{hid}: the repository has no revision {hid.revision!r} ({first})")
    return CheckpointError(None, f"{hid}: could not get it from the Hugging Face Hub ({type(e).__name__}: {first})")


def _fetch_sidecars(hh: Any, hid: HubId, weights_name: str, kw: dict[str, Any]) -> None:
    """Configs beside the weights file (same folder of the same commit), where they exist: the loaders read
    them from beside the file, as in a local folder. Missing ones are simply absent."""
    if not weights_name.endswith((".safetensors", ".bin", ".pth", ".pt")):
        return
    folder = str(PurePosixPath(weights_name).parent)
    for name in SIDECARS:
        try:
            hh.hf_hub_download(filename=name if folder == "." else f"{folder}/{name}", **kw)
        except Exception as e:  # noqa: BLE001 - a sidecar is optional; the loader says if one was needed
            log.debug("%s: no %s beside %s (%s)", hid, name, weights_name, type(e).__name__)


def _commit_of(path: Path, name: str) -> str:
    """The commit of a cached file: its snapshot folder (`snapshots/<commit>/<file>`)."""
    depth = len(PurePosixPath(name).parts)
    parts = path.parts
    if len(parts) < depth + 2:
        return ""
    cand = parts[-depth - 1]
    return cand if _COMMIT.match(cand) and parts[-depth - 2] == "snapshots" else ""


def _sha256(path: Path) -> str:
    from chexfound.models.format import sha256_file

    return sha256_file(path)
