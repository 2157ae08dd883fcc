"""The node's settings, read from ``conf/node.yaml`` (Hydra) and checked before anything starts.

A value of the wrong type is a `ConfigError` naming the key; a missing model, an unusable spool
or a bad port fail in a second, before the model loads or a port opens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lung_cls.errors import ConfigError, UserError
from lung_cls.qa.batch import PredictOptions
from lung_cls.qa.decide import check_review_band
from lung_cls.qa.declared import (
    SERIES_FIELDS,
    STUDY_FIELDS,
    KeywordMatcher,
    keyword_map_from_config,
)
from lung_cls.qa.settings import number, plain, resolve_model

HOLDABLE = ("mismatch", "rejected", "review")


def _ae_title(key: str, value: Any) -> str:
    text = str(value if value is not None else "").strip()
    if not text or len(text) > 16 or not text.isascii() or "\\" in text:
        raise ConfigError(key, value, "expected an AE title: 1 to 16 ASCII characters, no '\\'")
    return text


def _port(cfg: Mapping[str, Any], key: str, default: int, where: str) -> int:
    port = number(cfg, key, int, default, minimum=0, where=where)
    if port > 65535:
        raise ConfigError(f"{where}.{key}", port, "expected a port number 0..65535")
    return port


def _strings(key: str, value: Any) -> list[str]:
    value = plain(value)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence):
        raise ConfigError(key, value, "expected a list of strings")
    return [str(v) for v in value]


def _processes(check: Mapping[str, Any]) -> int:
    n = number(check, "processes", int, 1, minimum=0, where="check")
    if n > 64:
        raise ConfigError("check.processes", n, "expected 0 (check in the node's process) to 64")
    return n


@dataclass
class NodeSettings:
    """One node, resolved."""

    spool: Path
    backend: str
    model_paths: list[Path]
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "LUNG_QA"
    allow: list[str] = field(default_factory=list)
    forward_host: str = "127.0.0.1"
    forward_port: int = 4242
    forward_ae: str = "PACS"
    forward_batch: int = 32
    forward_workers: int = 2
    retry_initial_s: float = 1.0
    retry_max_s: float = 30.0
    timeout_s: float = 10.0
    quiet_s: float = 3.0
    complete_on_release: bool = True
    hold: list[str] = field(default_factory=lambda: ["mismatch", "rejected"])
    report: bool = True
    lung_keywords: list[str] | None = None
    modalities: list[str] | None = field(default_factory=lambda: ["NM"])
    accept_non_image: bool = False
    device: str = "cpu"
    threads: int | None = None
    check_timeout_s: float = 120.0
    """A check that has not answered in this long is taken for hung: its process is killed."""
    check_processes: int = 0
    """Worker processes the check runs in (`lung_cls.node.workers`); 0: in the node's process.
    ``conf/node.yaml`` says 1; the dataclass says 0 for the in-memory models of the tests."""
    options: PredictOptions = field(default_factory=PredictOptions)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> NodeSettings:
        if not cfg.get("spool"):
            raise UserError("no spool folder given: pass spool=DIR (received instances live there)")
        spool = Path(str(cfg["spool"])).expanduser()
        if spool.exists() and not spool.is_dir():
            raise UserError(f"spool={spool}: exists and is not a folder")
        listen = cfg.get("listen") or {}
        forward = cfg.get("forward") or {}
        series = cfg.get("series") or {}
        check = cfg.get("check") or {}
        backend, model_paths = resolve_model(cfg)
        hold = _strings("hold", cfg.get("hold", ["mismatch", "rejected"]))
        bad = sorted(set(hold) - set(HOLDABLE))
        if bad:
            raise ConfigError("hold", hold, f"expected statuses among {list(HOLDABLE)}")
        keywords = keyword_map_from_config(plain(cfg.get("declared_keywords")))
        ignore = plain(cfg.get("declared_ignore"))
        try:
            KeywordMatcher(keywords, ignore)
        except ValueError as err:
            raise UserError(str(err)) from None
        options = PredictOptions(
            review_band=check_review_band(plain(cfg.get("review_band", [0.2, 0.8]))),
            review_sd=number(cfg, "review_sd", float, None, minimum=0.0, optional=True),
            batch_size=1,
            frame_index=number(cfg, "frame_index", int, None, optional=True),
            keywords=keywords,
            ignore=ignore,
            series_fields=tuple(plain(cfg.get("declared_fields")) or SERIES_FIELDS),
            study_fields=tuple(plain(cfg.get("declared_study_fields")) or STUDY_FIELDS),
        )
        lung = cfg.get("lung_keywords")
        modalities = cfg.get("modalities", ["NM"])
        return cls(
            spool=spool,
            backend=backend,
            model_paths=model_paths,
            host=str(listen.get("host", "127.0.0.1")),
            port=_port(listen, "port", 11112, "listen"),
            ae_title=_ae_title("listen.ae_title", listen.get("ae_title", "LUNG_QA")),
            allow=[
                _ae_title("listen.allow", a) for a in _strings("listen.allow", listen.get("allow"))
            ],
            forward_host=str(forward.get("host", "127.0.0.1")),
            forward_port=_port(forward, "port", 4242, "forward"),
            forward_ae=_ae_title("forward.ae_title", forward.get("ae_title", "PACS")),
            forward_batch=number(forward, "batch", int, 32, minimum=1, where="forward"),
            forward_workers=number(forward, "workers", int, 2, minimum=1, where="forward"),
            retry_initial_s=number(
                forward, "retry_initial_s", float, 1.0, minimum=0.01, where="forward"
            ),
            retry_max_s=number(forward, "retry_max_s", float, 30.0, minimum=0.01, where="forward"),
            timeout_s=number(forward, "timeout_s", float, 10.0, minimum=0.1, where="forward"),
            quiet_s=number(series, "quiet_s", float, 3.0, minimum=0.0, where="series"),
            complete_on_release=bool(series.get("complete_on_release", True)),
            hold=hold,
            report=bool(cfg.get("report", True)),
            lung_keywords=None if lung is None else _strings("lung_keywords", lung),
            modalities=None if modalities is None else _strings("modalities", modalities),
            accept_non_image=bool(cfg.get("accept_non_image", False)),
            device=str(cfg.get("device", "cpu")),
            threads=number(cfg, "threads", int, None, minimum=1, optional=True),
            check_processes=_processes(check),
            check_timeout_s=number(check, "timeout_s", float, 120.0, minimum=1.0, where="check"),
            options=options,
        )

    def load_ensemble(self) -> Any:
        from lung_cls.qa.backends import load_onnx_ensemble, load_torch_ensemble

        if self.backend == "onnx":
            return load_onnx_ensemble(self.model_paths, threads=self.threads)
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
        return load_torch_ensemble(self.model_paths, device=self.device)
