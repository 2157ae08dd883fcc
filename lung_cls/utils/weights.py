"""Pretrained weights for timm backbones: where they are, or where they come from.

They resolve in this order:

1. ``model.weights=PATH``: a local file (timm's ``pretrained_cfg_overlay=dict(file=...)`` gives it
   the same head and input-channel adaptation as a hub download);
2. the local Hugging Face cache (or timm's legacy torch-hub cache) for the pinned model tag;
3. the Hugging Face hub, where it is reachable and downloads are not turned off
   (``HF_HUB_OFFLINE=1`` or ``download_weights=false``). The training command downloads before its
   first job, once for every model of a sweep (:func:`check_pretrained`, called by
   ``lung_cls.utils.typed.preflight``); a job itself only reads local copies;
4. otherwise :class:`WeightsNotFoundError`, which says how to supply weights or train from scratch.

Lightning is not imported here, and timm only when a model asks for pretrained weights.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from lung_cls.errors import WeightsNotFoundError

log = logging.getLogger(__name__)

_HF_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
# Seconds to wait for the hub's first answer: an unreachable hub must not hold a sweep for long.
HUB_TIMEOUT_S = 10.0


def _cached_hf_file(hf_hub_id: str | None) -> str | None:
    """Return a weights file for ``hf_hub_id`` from the local HF cache, without touching the network."""
    if not hf_hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with timm
        return None
    repo_id, _, revision = hf_hub_id.partition("@")
    for name in _HF_FILES:
        found = try_to_load_from_cache(repo_id, name, revision=revision or None)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _cached_torchhub_file(url: str | None) -> str | None:
    """timm's older releases cached weights under ``$TORCH_HOME/hub/checkpoints/<file name of url>``."""
    if not url:
        return None
    candidate = Path(_torch_hub_dir()) / "checkpoints" / Path(url).name
    return str(candidate) if candidate.is_file() else None


def _pretrained_cfg(backbone: str) -> dict:
    cfg = _timm().get_pretrained_cfg(backbone)
    if cfg is None:
        raise WeightsNotFoundError(
            f"model.backbone={backbone}: timm has no pretrained weights under this name. Pin a tag "
            "(e.g. resnet18.tv_in1k), give model.weights=/path/to/file, or set "
            "model.pretrained=false."
        )
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def hub_id(backbone: str) -> str:
    """The Hugging Face repo (``timm/resnet18.tv_in1k``) that holds ``backbone``'s weights."""
    cfg = _timm().get_pretrained_cfg(backbone)
    return str((cfg.hf_hub_id if cfg is not None else None) or backbone)


def find_local_weights(backbone: str, weights: str | None) -> tuple[str, str] | None:
    """A local weights file for ``backbone`` and where it was found; None when there is none.

    ``weights`` (``model.weights``) that points to no file is an error, not "none found".
    """
    if weights:
        path = Path(os.path.expanduser(str(weights)))
        if not path.is_file():
            raise WeightsNotFoundError(f"{path}: model.weights points to no file")
        return str(path), "file"
    cfg = _pretrained_cfg(backbone)
    found = _cached_hf_file(cfg.get("hf_hub_id"))
    if found:
        return found, "hf-cache"
    found = _cached_torchhub_file(cfg.get("url"))
    if found:
        return found, "torch-hub-cache"
    return None


def downloads_off(download: bool = True) -> str | None:
    """Why weights must not be downloaded now (shown to the user), or None when they may be."""
    if not download:
        return "downloads are off (download_weights=false)"
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return "downloads are off (HF_HUB_OFFLINE=1)"
    if flag in ("", None):
        try:
            from huggingface_hub import constants

            if constants.HF_HUB_OFFLINE:
                return "downloads are off (HF_HUB_OFFLINE=1)"
        except ImportError:  # pragma: no cover
            return "huggingface_hub is not installed"
    return None


class HubUnreachable(Exception):
    """The hub did not answer (no network, proxy, DNS): no point asking it for the next model."""


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def probe_hub(timeout: float = HUB_TIMEOUT_S) -> None:
    """Raise :class:`HubUnreachable` unless the hub answers one request within ``timeout``.

    Why a probe of its own: ``huggingface_hub`` retries a failed connection five times with
    back-off and logs every retry, minutes of noise on a machine without a network.
    Any HTTP answer, even an error status, means the hub is reachable.
    """
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{hub_endpoint()}/api/models", method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()  # noqa: S310 - the hub's URL
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise HubUnreachable(f"{hub_endpoint()}: {_short(reason)}") from err


def download_weights(backbone: str) -> str:
    """Download ``backbone``'s pinned weights from the Hugging Face hub into its cache; the path.

    ``HF_ENDPOINT`` (read now, not at import) names the hub, so a mirror, or a test's local
    server, serves the same request. Raises :class:`HubUnreachable` when the hub does not
    answer, :class:`WeightsNotFoundError` when it answers without the weights.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, revision = hub_id(backbone).partition("@")
    endpoint = hub_endpoint()
    for name in _HF_FILES[:2]:
        try:
            return hf_hub_download(
                repo_id,
                name,
                revision=revision or None,
                endpoint=endpoint,
                etag_timeout=HUB_TIMEOUT_S,
                library_name="lung_cls",
            )
        except EntryNotFoundError:  # this repo keeps the other file format
            continue
        except (RepositoryNotFoundError, RevisionNotFoundError) as err:
            raise WeightsNotFoundError(f"{repo_id}: not on the hub ({type(err).__name__})") from err
        except LocalEntryNotFoundError as err:  # raised when the connection itself failed
            raise HubUnreachable(_short(err)) from err
        except HfHubHTTPError as err:
            raise WeightsNotFoundError(f"{repo_id}: the hub refused it ({_short(err)})") from err
        except OSError as err:  # connection refused, DNS, timeouts
            raise HubUnreachable(_short(err)) from err
    raise WeightsNotFoundError(f"{repo_id}: the hub holds no {' or '.join(_HF_FILES[:2])}")


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:160] + "...") if len(text) > 160 else text or type(err).__name__


def _missing_message(missing: Mapping[str, str], why: str) -> str:
    """One message for every model without weights (named with its hub repo)."""
    names = ", ".join(f"{name} ({hub})" for name, hub in missing.items())
    fetch = " && ".join(f"hf download {hub}" for hub in dict.fromkeys(missing.values()))
    head = (
        f"model.pretrained=true but no ImageNet weights for {len(missing)} models: {names}"
        if len(missing) > 1
        else f"model.pretrained=true but no ImageNet weights for {names}"
    )
    lines = [f"{head}: not in the local Hugging Face cache, and {why}. Either"]
    n = 1
    if len(missing) == 1:  # one file can serve one model; a sweep of several needs the cache
        (hub,) = missing.values()
        lines.append(
            f"  {n}. give a local file: model.weights=/path/to/{hub.split('/')[-1]}.safetensors, or"
        )
        n += 1
    lines.append(
        f"  {n}. on a machine with internet run `{fetch}` and copy ~/.cache/huggingface here, or"
    )
    lines.append(f"  {n + 1}. train from scratch: model.pretrained=false.")
    return "\n".join(lines)


def check_pretrained(
    models: Mapping[str, tuple[str, str | None]], *, download: bool = True
) -> None:
    """Make sure every model has weights before anything trains; one error naming all that lack them.

    ``models`` maps a model's name to ``(backbone, model.weights)``. Local copies come first; a
    model without one is downloaded from the hub unless :func:`downloads_off` says not to. After
    the hub failed to answer once, the other models are not tried (each try could wait
    ``HUB_TIMEOUT_S``).
    """
    missing: dict[str, str] = {}
    why = downloads_off(download)
    probed = False
    for name, (backbone, weights) in models.items():
        if find_local_weights(backbone, weights) is not None:
            continue
        if why is None and not probed:
            probed = True
            try:
                probe_hub()
            except HubUnreachable as err:
                why = f"the hub could not be reached ({err})"
        if why is None:
            try:
                path = download_weights(backbone)
                log.info("Downloaded the %s weights from the hub: %s", name, path)
                continue
            except HubUnreachable as err:
                why = f"the hub could not be reached ({err})"
            except WeightsNotFoundError as err:
                missing[name] = hub_id(backbone)
                log.warning("%s", err)
                continue
        missing[name] = hub_id(backbone)
    if missing:
        raise WeightsNotFoundError(_missing_message(missing, why or "the hub does not hold them"))


def resolve_weights(backbone: str, weights: str | None) -> tuple[str, str]:
    """Find a local weights file for ``backbone``; return ``(path, origin)``.

    ``origin`` is ``"file"``, ``"hf-cache"`` or ``"torch-hub-cache"`` so the run can record where
    its weights came from. Nothing is downloaded here (see :func:`check_pretrained`).
    """
    found = find_local_weights(backbone, weights)
    if found is not None:
        return found
    raise WeightsNotFoundError(
        _missing_message({backbone: hub_id(backbone)}, "a training job does not download")
    )


def _timm():
    import timm

    return timm


def _torch_hub_dir() -> str:
    import torch

    return torch.hub.get_dir()


__all__ = [
    "HubUnreachable",
    "check_pretrained",
    "download_weights",
    "downloads_off",
    "find_local_weights",
    "hub_id",
    "probe_hub",
    "resolve_weights",
]
