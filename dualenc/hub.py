"""Hugging Face Hub model and dataset ids (`org/name`) as local snapshot directories, through the optional
huggingface_hub."""

from __future__ import annotations

import os
import re
from typing import Sequence

from dualenc.errors import CheckpointError, InputError

# Weights as safetensors only, configs, and tokenizer files; never pickled or framework-specific weights.
ALLOW_PATTERNS = ("*.safetensors", "*.json", "*.txt", "*.model", "vocab.*")
INSTALL_HINT = "pip install 'dualenc[hub]'"
_COMMIT = re.compile(r"[0-9a-f]{40}")
_REF_BYTES = 64  # a ref holds a commit hash: more is not read
_REMEDY = "the hub cache is damaged; delete {} and download the {} again"
REPO_TYPES = ("model", "dataset")


def _hub(name: str, repo_type: str = "model"):
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError(f"{name} is not a local path; loading it as a Hugging Face Hub {repo_type} id needs "
                          f"huggingface_hub: {INSTALL_HINT}") from None
    return huggingface_hub


def _looks_like_id(name: str) -> bool:
    """Whether `name` has the shape of a hub repo id, `name` or `org/name` (checked without huggingface_hub)."""
    if not name or name[0] in "./~" or name.count("/") > 1 or "\\" in name:
        return False
    return all(part and all(c.isalnum() or c in "-_." for c in part) for part in name.split("/"))


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve(name_or_path: str | os.PathLike, *, revision: str | None = None, repo_type: str = "model",
            allow_patterns: Sequence[str] | None = None) -> str:
    """A local path for a model directory or a hub model id (or, with repo_type="dataset", a dataset's).

    An existing file or directory is returned as given (a local folder wins over an id of the same name), as is
    anything that is not shaped like a hub id (`name` or `org/name`), so that the caller reports it missing.
    An id is downloaded into the hub cache (HF_HUB_CACHE / HF_HOME), or found there under HF_HUB_OFFLINE=1, with
    only safetensors, JSON and tokenizer files (ALLOW_PATTERNS) unless allow_patterns says otherwise. Under
    jax.distributed with several processes, process 0 downloads while the others wait, then read the cache.

    Args:
      name_or_path: a local path, or a hub model id such as "openai/clip-vit-base-patch32".
      revision: a branch, tag or commit of the hub repository (ids only; the default branch when None).
      repo_type: "model" or "dataset" (a dataset repository, such as "clip-benchmark/wds_cars").
      allow_patterns: the repository files to download, as huggingface_hub's glob patterns (where "*" also
        matches "/"); default ALLOW_PATTERNS. A dataset's reader names the files of the split it needs.

    Returns:
      the path, or the snapshot directory of the id.

    Raises:
      FileNotFoundError: the id is neither cached nor downloadable (a one-line message saying what to do).
      ImportError: an id was given and huggingface_hub is not installed.
    """
    if repo_type not in REPO_TYPES:
        raise InputError(f"repo_type must be one of {REPO_TYPES}, got {repo_type!r}")
    patterns = list(ALLOW_PATTERNS if allow_patterns is None else allow_patterns)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise InputError(f"allow_patterns must be non-empty strings, got {allow_patterns!r}")
    path = os.fspath(name_or_path)
    if not isinstance(path, str) or os.path.exists(path) or not _looks_like_id(path):
        return path
    hub = _hub(path, repo_type)
    if not _is_repo_id(path):
        return path
    if _processes() > 1:
        import jax
        from jax.experimental import multihost_utils

        first = jax.process_index() == 0
        error = None
        if first:
            try:
                snapshot = _download(hub, path, revision, repo_type, patterns, local_files_only=False)
            except FileNotFoundError as e:
                error = e
        multihost_utils.sync_global_devices(f"dualenc hub download {path}")
        if error is not None:
            raise error
        return snapshot if first else _download(hub, path, revision, repo_type, patterns, local_files_only=True)
    return _download(hub, path, revision, repo_type, patterns, local_files_only=False)


def _processes() -> int:
    import jax

    initialized = getattr(jax.distributed, "is_initialized", None)
    if initialized is not None and not initialized():
        return 1  # without initialising a backend (the CLI checks its arguments before jax.distributed.initialize)
    return jax.process_count()


def _download(hub, repo_id: str, revision: str | None, repo_type: str, patterns: list[str], *,
              local_files_only: bool) -> str:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    storage = os.path.join(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type=repo_type))
    ref = _check_ref(storage, revision, repo_type)
    try:
        snapshot = hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                         local_files_only=local_files_only, repo_type=repo_type)
    except OSError as e:  # every huggingface_hub error is one
        offline = bool(getattr(constants, "HF_HUB_OFFLINE", False))
        at = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
        if isinstance(e, RevisionNotFoundError):
            advice = "revision not found on the Hugging Face Hub: check the revision"
        elif isinstance(e, RepositoryNotFoundError):
            advice = ("not found on the Hugging Face Hub (or private or gated: log in with `hf auth login`): "
                      "check the name")
        elif isinstance(e, LocalEntryNotFoundError) and local_files_only and not offline:
            advice = (f"process 0 downloaded it, but it is not in this process's hub cache {constants.HF_HUB_CACHE}: "
                      f"give all processes one HF_HUB_CACHE on a shared filesystem")
        elif isinstance(e, LocalEntryNotFoundError) and offline:
            advice = (f"not in the hub cache {constants.HF_HUB_CACHE} and HF_HUB_OFFLINE is "
                      f"set: download it once with HF_HUB_OFFLINE=0, or check the name")
        else:
            reason = str(e).splitlines()[0].removeprefix("Got: ") if str(e) else type(e).__name__
            advice = (f"could not be downloaded ({reason}) and is not in the hub cache {constants.HF_HUB_CACHE}; "
                      f"HF_HUB_OFFLINE is {'set' if offline else 'not set'}: check the network and the name")
        raise FileNotFoundError(f"no local directory and no Hugging Face Hub {repo_type} {at}: {advice}") from None
    return _check_snapshot(storage, snapshot, ref, repo_type)


def _check_ref(storage: str, revision: str | None, repo_type: str = "model") -> str | None:
    """The ref file a branch or tag is read from in the repository's cache folder (None for a commit), checked to
    hold a commit hash when it exists: huggingface_hub follows it offline, or when the network fails."""
    if revision is not None and _COMMIT.fullmatch(revision):
        return None
    ref = os.path.join(storage, "refs", revision or "main")
    if not os.path.lexists(ref):
        return ref
    try:
        with open(ref, "rb") as f:
            content = f.read(_REF_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"hub cache ref {ref} cannot be read ({e.strerror or e}): "
                              f"{_REMEDY.format(storage, repo_type)}") from None
    if not _COMMIT.fullmatch(content.decode("latin-1")):
        raise CheckpointError(f"hub cache ref {ref} holds {content[:_REF_BYTES]!r}, not a commit hash (40 hex "
                              f"digits): {_REMEDY.format(storage, repo_type)}")
    return ref


def _check_snapshot(storage: str, snapshot: str, ref: str | None, repo_type: str = "model") -> str:
    """`snapshot` once checked to be a commit's folder under the repository's snapshots/, where it resolves too."""
    snapshots = os.path.join(storage, "snapshots")
    name = os.path.basename(snapshot)
    if os.path.dirname(snapshot) != snapshots or not _COMMIT.fullmatch(name):
        where = f"hub cache ref {ref} names" if ref else "the hub gave"
        raise CheckpointError(f"{where} {snapshot}, not a commit's folder in {snapshots}: "
                              f"{_REMEDY.format(storage, repo_type)}")
    if os.path.dirname(os.path.realpath(snapshot)) != os.path.realpath(snapshots):
        raise CheckpointError(f"hub cache snapshot {snapshot} resolves to {os.path.realpath(snapshot)}, outside "
                              f"{snapshots}: {_REMEDY.format(storage, repo_type)}")
    return snapshot
