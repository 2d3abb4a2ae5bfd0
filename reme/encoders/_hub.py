"""Shared helpers of the weight loaders: finding weights and failing fast.

Every loader of `reme.encoders` (``clip``, ``dinov2``, ``captioners``) resolves its
weights through this module with one rule (the open_clip / dinov2 hub pattern in STYLE.md):

1. a local path that exists is used as is;
2. otherwise weights already in the local cache (``cache_dir``, i.e. ``$REME_CACHE_DIR``, else
   the libraries' default caches) are used without any network call;
3. otherwise, if ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` is set or a 3-second TCP probe of
   the download host fails, a `reme.errors.MissingWeightsError` names the model, the
   download command to run on a machine with internet access, and how to point reme at the
   copy (a local-path spec or ``REME_CACHE_DIR``);
4. otherwise the library downloads the weights itself.

So a loader never hangs on an unreachable hub. The image-to-tensor preprocessing of the dense
encoders is in `reme.encoders._preprocess`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from reme.errors import MissingWeightsError

logger = logging.getLogger(__name__)

#: Environment variables that switch the Hugging Face libraries to offline mode.
OFFLINE_ENV_VARS: tuple[str, ...] = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
#: Seconds the TCP reachability probe waits before declaring a host unreachable.
PROBE_TIMEOUT_S: float = 3.0
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}



# --------------------------------------------------------------------------------------------
# offline detection and reachability
# --------------------------------------------------------------------------------------------
def offline_reason() -> str | None:
    """Why downloads are disabled, or None when they are allowed.

    Returns:
        ``"HF_HUB_OFFLINE is set"`` (or the variable found) when one of
        `OFFLINE_ENV_VARS` holds a true value (``1``, ``on``, ``yes``, ``true``), else None.
    """
    for var in OFFLINE_ENV_VARS:
        value = os.environ.get(var, "")
        if value.strip().upper() in _TRUE_VALUES:
            return f"{var}={value} is set"
    return None


def hf_endpoint() -> str:
    """The Hugging Face endpoint URL (``$HF_ENDPOINT``, default ``https://huggingface.co``)."""
    return os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"


@functools.lru_cache(maxsize=32)
def _probe(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError as exc:
        logger.info("host %s:%d not reachable (%s)", host, port, exc)
        return False


def host_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """TCP-connect probe of the host of ``url`` (result cached per host for the process).

    Args:
        url: an ``http(s)://`` URL or a bare host name.
        timeout: seconds to wait for the connection.

    Returns:
        True when a TCP connection to the host's port (443 for https) opens within ``timeout``.
    """
    parsed = urllib.parse.urlparse(url if "://" in url else f"https://{url}")
    host = parsed.hostname or url
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    return _probe(host, port, float(timeout))


def download_blocker(url: str | None = None) -> str | None:
    """Why a download from ``url`` (default: the HF endpoint) cannot happen now, or None.

    Checks the offline environment variables first (no network), then the TCP probe.
    """
    reason = offline_reason()
    if reason:
        return reason
    url = url or hf_endpoint()
    if not host_reachable(url):
        host = urllib.parse.urlparse(url if "://" in url else f"https://{url}").hostname
        return f"{host} is not reachable (no connection within {PROBE_TIMEOUT_S:g} s)"
    return None


# --------------------------------------------------------------------------------------------
# paths and cache lookups
# --------------------------------------------------------------------------------------------
def looks_like_path(target: str) -> bool:
    """True when ``target`` is written as a filesystem path rather than a hub id.

    Hub ids are ``name`` or ``org/name``; paths start with ``/``, ``~`` or ``.``, have more
    than one ``/``, use a backslash, or end in a checkpoint suffix.
    """
    t = target.strip()
    if t.startswith(("/", "~", "./", "../", ".\\", "..\\")) or "\\" in t or t in (".", ".."):
        return True
    if len(t) > 1 and t[1] == ":" and t[0].isalpha():  # Windows drive
        return True
    if t.count("/") > 1:
        return True
    return t.lower().endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz"))


def split_spec_options(target: str, keys: Sequence[str], *, minimum: int = 0,
                       family: str = "encoder") -> tuple[str, dict[str, int]]:
    """Split ``"TARGET,key=INT,..."`` into the target and its integer options.

    Only trailing ``key=value`` pieces whose key is in ``keys`` are options, so a folder path
    containing commas stays whole.

    Returns:
        ``(target, {key: int})``; the target may be empty.

    Raises:
        ValueError: an option value is not an integer >= ``minimum`` (the message names
            ``family`` and the piece).
    """
    target = (target or "").strip()
    options: dict[str, int] = {}
    while "," in target or ("=" in target and target.partition("=")[0].strip() in keys):
        head, _, tail = target.rpartition(",")
        key, eq, value = tail.strip().partition("=")
        if not eq or key.strip() not in keys:
            break
        try:
            options[key.strip()] = int(value)
        except ValueError:
            raise ValueError(f"{family} option {tail.strip()!r} needs an integer value") from None
        if options[key.strip()] < minimum:
            raise ValueError(f"{family} option {tail.strip()!r} must be >= {minimum}"
                             + (" (positive)" if minimum == 1 else ""))
        target = head.strip()
    return target, options


def suggested_local_dir(model_id: str, cache_dir: str | None = None) -> str:
    """Where the messages suggest downloading ``model_id`` to (under ``cache_dir`` if set)."""
    base = Path(cache_dir).expanduser() if cache_dir else Path("~/models")
    return str(base / model_id.rstrip("/").split("/")[-1])


def cached_snapshot(
    repo_id: str, cache_dir: str | None, required: Sequence[str] = ("config.json",)
) -> str | None:
    """The local snapshot folder of a hub repo, without any network call.

    Args:
        repo_id: ``org/name``.
        cache_dir: hub cache folder (None: the default ``~/.cache/huggingface/hub``).
        required: file names that must exist in the snapshot for it to count as usable.

    Returns:
        The snapshot folder, or None when the repo (or one of ``required``) is not cached.
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    try:
        folder = snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True)
    except Exception as exc:  # LocalEntryNotFoundError, invalid ids, ...
        logger.debug("%s not in the local hub cache (%s)", repo_id, exc)
        return None
    if not isinstance(folder, str) or not os.path.isdir(folder):
        return None
    missing = [name for name in required if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        logger.info("cached snapshot of %s lacks %s; treating it as missing", repo_id, missing)
        return None
    return folder


def cached_hub_file(repo_id: str, filename: str, cache_dir: str | None) -> str | None:
    """Path of one file of a hub repo if it is in the local cache (no network), else None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    except Exception as exc:
        logger.debug("cache lookup of %s/%s failed (%s)", repo_id, filename, exc)
        return None
    return found if isinstance(found, str) and os.path.isfile(found) else None


def hf_missing_message(
    model_id: str,
    family: str,
    reason: str,
    cache_dir: str | None,
    *,
    spec_prefix: str | None = None,
    local_prefix: str | None = None,
) -> str:
    """The `MissingWeightsError` text for a Hugging Face repo.

    Args:
        model_id: ``org/name``.
        family: spec family, e.g. ``dinov2``.
        reason: why no download is possible (`download_blocker`).
        cache_dir: the cache folder in use (``$REME_CACHE_DIR``) or None.
        spec_prefix: prefix of the hub spec shown (default ``"<family>:"``).
        local_prefix: prefix of the local-folder spec shown (default ``"<family>:"``).
    """
    spec_prefix = f"{family}:" if spec_prefix is None else spec_prefix
    local_prefix = f"{family}:" if local_prefix is None else local_prefix
    local = suggested_local_dir(model_id, cache_dir)
    cache_hint = cache_dir or "/path/to/hf-cache"
    return (
        f"weights for {spec_prefix}{model_id} are not available locally and cannot be downloaded "
        f"now ({reason}).\n"
        f"On a machine with internet access run\n"
        f"    hf download {model_id} --local-dir {local}\n"
        f"(older huggingface_hub: huggingface-cli download {model_id} --local-dir {local}),\n"
        f"copy the folder here and use the spec '{local_prefix}{local}'; or download into a hub "
        f"cache\n"
        f"    hf download {model_id} --cache-dir {cache_hint}\n"
        f"and set REME_CACHE_DIR={cache_hint}."
    )


def resolve_hf_repo(
    target: str,
    *,
    family: str,
    cache_dir: str | None,
    required: Sequence[str] = ("config.json",),
    spec_prefix: str | None = None,
    local_prefix: str | None = None,
) -> tuple[str, bool]:
    """Find a Hugging Face model folder or decide that the library may download it.

    Args:
        target: a local folder (``save_pretrained`` layout) or a hub id ``org/name``.
        family: the spec family (``dinov2``, ``llava``, ``blip``, ``clip``), used in messages.
        cache_dir: hub cache folder (``$REME_CACHE_DIR``) or None for the default cache.
        required: files a folder or cached snapshot must contain.
        spec_prefix, local_prefix: spec prefixes shown in messages (`hf_missing_message`).

    Returns:
        ``(source, is_local)``: an absolute folder path and True, or the hub id and False
        when it is not cached but the hub is reachable (the caller's library downloads it).

    Raises:
        reme.errors.MissingWeightsError: a path that does not exist or lacks ``required``
            files; or a hub id that is not cached while offline or the hub is unreachable.
    """
    target = target.strip()
    if not target:
        raise ValueError(f"empty {family} target; give a hub id (org/name) or a local folder")
    expanded = os.path.expanduser(target)
    if os.path.isdir(expanded):
        folder = os.path.abspath(expanded)
        missing = [n for n in required if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            raise MissingWeightsError(
                f"folder {folder} given for {family} lacks {', '.join(missing)}; expected a "
                f"model saved with save_pretrained() or downloaded with "
                f"'hf download <org/name> --local-dir {folder}'"
            )
        return folder, True
    if looks_like_path(target) or os.path.exists(expanded):
        raise MissingWeightsError(
            f"local folder {os.path.abspath(expanded)} for {family} does not exist. Download a "
            f"model with 'hf download <org/name> --local-dir <dir>' (older huggingface_hub: "
            f"'huggingface-cli download ...') and use the spec "
            f"'{local_prefix if local_prefix is not None else family + ':'}<dir>'"
        )
    snapshot = cached_snapshot(target, cache_dir, required)
    if snapshot is not None:
        logger.info("using cached snapshot of %s at %s", target, snapshot)
        return snapshot, True
    blocker = download_blocker()
    if blocker:
        raise MissingWeightsError(
            hf_missing_message(
                target, family, blocker, cache_dir,
                spec_prefix=spec_prefix, local_prefix=local_prefix,
            )
        )
    logger.info("%s not cached; downloading from %s", target, hf_endpoint())
    return target, False


def hf_dtype_kwargs(dtype: torch.dtype | None) -> dict[str, Any]:
    """``from_pretrained`` keyword for a weights dtype: ``dtype`` (transformers >= 4.56) or
    ``torch_dtype`` (older releases); empty for None."""
    if dtype is None:
        return {}
    try:
        import transformers
        from packaging.version import Version

        new = Version(transformers.__version__.split("+")[0]) >= Version("4.56")
    except Exception:  # pragma: no cover - unparsable version: assume a current release
        new = True
    return {"dtype": dtype} if new else {"torch_dtype": dtype}


# --------------------------------------------------------------------------------------------
# open_clip pretrained tags
# --------------------------------------------------------------------------------------------
_OPEN_CLIP_HF_WEIGHTS = "open_clip_pytorch_model.bin"


def _safe_alternatives(filename: str) -> Iterable[str]:
    # mirrors open_clip.pretrained._get_safe_alternatives: prefer .safetensors copies
    if filename == _OPEN_CLIP_HF_WEIGHTS:
        yield "open_clip_model.safetensors"
    elif filename.endswith((".bin", ".pth")):
        yield filename[:-4] + ".safetensors"


def open_clip_hub_file(pretrained_cfg: dict[str, Any]) -> tuple[str, str] | None:
    """``(repo_id, filename)`` of an open_clip tag's weights on the hub, or None."""
    hub = pretrained_cfg.get("hf_hub", "") or ""
    if not hub:
        return None
    # open_clip convention: "org/name/file.bin", or "org/name/" for the default file name
    repo_id, filename = os.path.split(hub)
    return repo_id, filename or _OPEN_CLIP_HF_WEIGHTS


def find_open_clip_weights(pretrained_cfg: dict[str, Any], cache_dir: str | None) -> str | None:
    """Locally cached weights file of an open_clip pretrained tag (no network), or None.

    Looks where `open_clip.download_pretrained` would have stored it: the hub cache
    (``hf_hub`` entry; the ``.safetensors`` alternative first) and, for URL-only tags, the
    open_clip URL cache (``cache_dir`` or ``~/.cache/clip``).

    Args:
        pretrained_cfg: ``open_clip.get_pretrained_cfg(arch, tag)``.
        cache_dir: cache folder or None for the libraries' defaults.
    """
    if pretrained_cfg.get("file"):
        path = pretrained_cfg["file"]
        return path if os.path.isfile(path) else None
    hub = open_clip_hub_file(pretrained_cfg)
    if hub is not None:
        repo_id, filename = hub
        for name in (*_safe_alternatives(filename), filename):
            found = cached_hub_file(repo_id, name, cache_dir)
            if found:
                return found
        return None
    url = pretrained_cfg.get("url", "") or ""
    if url:
        base = cache_dir or os.path.expanduser("~/.cache/clip")
        path = os.path.join(base, os.path.basename(urllib.parse.urlparse(url).path))
        return path if os.path.isfile(path) else None
    return None


def open_clip_missing_message(
    arch: str, tag: str, pretrained_cfg: dict[str, Any], reason: str, cache_dir: str | None,
    path_arch: str | None = None,
) -> str:
    """The `MissingWeightsError` text for an open_clip ``arch:tag`` pair.

    Args:
        arch: open_clip architecture name, e.g. ``ViT-B-16``.
        tag: pretrained tag, e.g. ``openai``.
        pretrained_cfg: ``open_clip.get_pretrained_cfg(arch, tag)``.
        reason: why no download is possible (`download_blocker`).
        cache_dir: the cache folder in use (``$REME_CACHE_DIR``) or None.
        path_arch: architecture name to show in the local-checkpoint spec (e.g. the
            ``-quickgelu`` variant when the tag was trained with QuickGELU).
    """
    path_arch = path_arch or arch
    hub = open_clip_hub_file(pretrained_cfg)
    lines = [
        f"weights for clip:{arch}:{tag} are not available locally and cannot be downloaded "
        f"now ({reason})."
    ]
    if hub is not None:
        repo_id, filename = hub
        local = suggested_local_dir(repo_id, cache_dir)
        lines += [
            "On a machine with internet access run",
            f"    hf download {repo_id} {filename} --local-dir {local}",
            f"(older huggingface_hub: huggingface-cli download {repo_id} {filename} "
            f"--local-dir {local}),",
            f"copy it here and use the spec 'clip:{path_arch}:{local}/{filename}'; or download "
            f"into a hub cache (hf download {repo_id} {filename} --cache-dir <dir>) and set "
            f"REME_CACHE_DIR=<dir>.",
        ]
    else:
        url = pretrained_cfg.get("url", "")
        name = os.path.basename(urllib.parse.urlparse(url).path) or "weights.pt"
        lines += [
            f"Download {url} on a machine with internet access, then use the spec "
            f"'clip:{path_arch}:/path/to/{name}', or put the file in a folder and set "
            f"REME_CACHE_DIR to it.",
        ]
    return "\n".join(lines)


@contextlib.contextmanager
def quiet_progress(*, verbose: bool = False):
    """Hide the Hugging Face "Loading weights" / download progress bars while a model loads
    (library calls print nothing unless reme's logger is at INFO: ``verbose``); the previous
    state is restored afterwards."""
    if verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
