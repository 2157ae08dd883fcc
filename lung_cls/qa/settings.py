"""The predict command's settings: read from its Hydra config and checked before anything slow.

Cheap checks come first - the output folder, the review band, the backend, the model paths, the
input files, the keyword map - so that a typo fails in a second, not after the models loaded. A
value of the wrong type is a `ConfigError` naming the key.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lung_cls.data.sources import DataError, to_plain
from lung_cls.errors import ConfigError, UserError
from lung_cls.qa.backends import LOADERS, Ensemble
from lung_cls.qa.batch import PredictOptions
from lung_cls.qa.checkpoints import resolve_checkpoints
from lung_cls.qa.decide import check_review_band
from lung_cls.qa.declared import (
    SERIES_FIELDS,
    KeywordMatcher,
    keyword_map_from_config,
    read_declared_manifest,
)
from lung_cls.qa.gate import GateSettings
from lung_cls.qa.inputs import DEFAULT_EXTENSIONS, find_inputs
from lung_cls.qa.onnx import resolve_onnx_models
from lung_cls.qa.output import check_output, clear_overlays

log = logging.getLogger("lung_cls.predict")

#: Backend name -> how its ``ckpt`` / ``onnx`` value is turned into model files.
RESOLVERS = {"torch": ("ckpt", resolve_checkpoints), "onnx": ("onnx", resolve_onnx_models)}


def resolve_model(cfg: Mapping[str, Any]) -> tuple[str, list[Path]]:
    """``(backend, model paths)`` of a command's ``backend``/``ckpt``/``onnx`` keys (predict and
    the node): ``auto`` is ONNX when ``onnx=`` is given, else torch; paths checked, no model
    loaded."""
    backend = str(cfg.get("backend") or "auto")
    if backend == "auto":
        backend = "onnx" if cfg.get("onnx") else "torch"
    if backend not in RESOLVERS:
        raise UserError(f"backend must be auto, torch or onnx, got {backend!r}")
    key, resolve = RESOLVERS[backend]
    return backend, resolve(plain(cfg.get(key)))


def plain(value: Any) -> Any:
    """An OmegaConf value -> plain Python (lists, dicts); None stays None."""
    return to_plain(value) if value is not None else None


def number(
    cfg: Mapping[str, Any],
    key: str,
    kind: type,
    default: Any,
    *,
    minimum: Any = None,
    optional: bool = False,
    where: str | None = None,
) -> Any:
    """``cfg[key]`` as ``kind`` (int or float; null only if ``optional``); a value of the wrong
    type or below ``minimum`` is a `ConfigError` naming the key (``where.key`` when ``cfg`` is
    the section ``where`` of the config), not a traceback."""
    value = cfg.get(key, default)
    key = f"{where}.{key}" if where else key
    what = "an integer" if kind is int else "a number"
    if value is None:
        if optional:
            return None
        raise ConfigError(key, value, f"expected {what}")
    try:
        if isinstance(value, bool) or (kind is int and float(value) != int(float(value))):
            raise ValueError(value)
        out = kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(key, value, f"expected {what}") from None
    if minimum is not None and out < minimum:
        raise ConfigError(key, value, f"expected {what} >= {minimum}")
    return out


@dataclass
class PredictSettings:
    """One predict run, resolved: where results go, which models, which files, which options."""

    output: Path
    existing: list[Path]
    backend: str
    model_paths: list[Path]
    files: list[Path]
    walk_errors: list[DataError]
    root: Path
    input: str
    options: PredictOptions
    overlays: bool = False
    device: str = "cpu"
    fail_on_mismatch: bool = False
    keywords: dict[str, list[str]] = field(default_factory=dict)
    ignored: list[tuple[Path, str]] = field(default_factory=list)
    """Files under ``input`` that are not images of an accepted type, with why (rows of their own)."""

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> PredictSettings:
        output, existing = check_output(cfg["output"], bool(cfg.get("overwrite", False)))
        band = check_review_band(plain(cfg.get("review_band")))
        # Cheap checks first: a bad checkpoint path or an empty folder fails before any model loads.
        backend, model_paths = resolve_model(cfg)
        ignored: list[tuple[Path, str]] = []
        files, walk_errors, root = find_inputs(
            cfg["input"], plain(cfg.get("extensions")) or DEFAULT_EXTENSIONS, exclude=[output],
            ignored=ignored,
        )  # fmt: skip
        gate_cfg = plain(cfg.get("gate")) or {}
        if not isinstance(gate_cfg, Mapping):
            raise ConfigError("gate", gate_cfg, "expected a mapping")
        frame_index = number(cfg, "frame_index", int, None, optional=True)
        try:
            gate = GateSettings.from_config(gate_cfg, frame_index)
        except (TypeError, ValueError) as err:
            raise UserError(f"gate: {err}") from None
        manifest = None
        if cfg.get("declared_manifest"):
            manifest = read_declared_manifest(str(cfg["declared_manifest"]))
        keywords = keyword_map_from_config(plain(cfg.get("declared_keywords")))
        ignore = plain(cfg.get("declared_ignore"))
        try:
            KeywordMatcher(keywords, ignore)  # validate before the slow part
        except ValueError as err:
            raise UserError(str(err)) from None
        options = PredictOptions(
            review_band=band,
            review_sd=number(cfg, "review_sd", float, None, minimum=0.0, optional=True),
            batch_size=number(cfg, "batch_size", int, 32, minimum=1),
            frame_index=frame_index,
            keywords=keywords,
            ignore=ignore,
            series_fields=tuple(plain(cfg.get("declared_fields")) or SERIES_FIELDS),
            study_fields=tuple(plain(cfg.get("declared_study_fields")) or ()),
            manifest=manifest,
            gate=gate,
            image_gate=bool(gate_cfg.get("image", True)),
        )
        return cls(
            output, existing, backend, model_paths, files, walk_errors, root, str(cfg["input"]),
            options, overlays=bool(cfg.get("overlays", False)),
            device=str(cfg.get("device", "cpu")),
            fail_on_mismatch=bool(cfg.get("fail_on_mismatch", False)), keywords=keywords,
            ignored=ignored,
        )  # fmt: skip

    def load_ensemble(self) -> Ensemble:
        ens = LOADERS[self.backend](self.model_paths, device=self.device)
        log.info(
            "%d model(s) (%s backend), %s px, %d file(s) under %s",
            len(ens.members), self.backend, ens.size, len(self.files), self.root,
        )  # fmt: skip
        return ens

    def prepare_output(self, ens: Ensemble) -> PredictOptions:
        """Create the output folder (and the overlays folder, emptied of an earlier run's PNGs, when
        overlays can be drawn); returns the options with the overlays folder set."""
        overlays_dir = None
        if self.overlays:
            if ens.can_cam:
                overlays_dir = self.output / "overlays"
                if self.existing:  # overwrite=true: stale overlays would mislead
                    clear_overlays(self.output)
            else:
                log.warning(
                    "overlays=true: CAM overlays need the torch backend (ckpt=...); none written"
                )
        self.output.mkdir(parents=True, exist_ok=True)
        return replace(self.options, overlays_dir=overlays_dir)

    def header(
        self,
        ens: Ensemble,
        summary: Mapping[str, Any],
        seconds: float,
        warnings: list[str] | None = None,
    ) -> dict[str, Any]:
        """The run facts predictions.json carries above its rows."""
        band = self.options.review_band
        return {
            "warnings": list(warnings or []),
            "version": 1,
            "backend": self.backend,
            "models": ens.members,
            "image_size": ens.size,
            "preprocess": ens.prep,
            "review_band": list(band) if band else None,
            "review_sd": self.options.review_sd,
            "input": self.input,
            "declared_keywords": self.keywords,
            "gate": {
                "modalities": list(self.options.gate.modalities),
                "require_view": self.options.gate.require_view,
                "image": self.options.image_gate,
                "ood": [_ood_facts(m) for m in ens.runners],
            },
            "summary": dict(summary),
            "seconds": round(seconds, 3),
        }


def _ood_facts(member: Any) -> dict[str, Any] | None:
    """What predictions.json says about a member's OOD reference (None: it has none)."""
    ref = getattr(member, "ood", None)
    if not ref:
        return None
    keys = ("n_train", "n_val", "n_test", "val_false_rejection", "test_false_rejection", "alpha")
    out = {k: ref[k] for k in keys if k in ref}
    out["thresholds"] = {k: float(v["threshold"]) for k, v in ref.get("spaces", {}).items()}
    return out


def model_warnings(ens: Ensemble, rows: list[Mapping[str, Any]] | None = None) -> list[str]:
    """What the user must know about the models and the input, said once at the top: a model
    trained from scratch or below 224 px, no OOD reference, input that is the model's own
    training (or validation) data."""
    out: list[str] = []
    scratch = [m.info.get("path") for m in ens.runners if m.info.get("pretrained") is False]
    if scratch:
        out.append(
            f"{len(scratch)} of {len(ens.runners)} model(s) trained from scratch (not ImageNet-"
            f"pretrained, as the paper's): {scratch[0]}"
        )
    if ens.size < 224:
        out.append(
            f"the model(s) work at {ens.size} px, below the paper's 224 px: a demo-sized model, "
            "coarse CAMs"
        )
    if not ens.has_ood:
        out.append(
            "no OOD reference in the model(s) (a checkpoint from before the image gate): images "
            "that are not lung V/Q studies are caught only by the header and segmentation checks"
        )
    if rows:
        for split, what in (("train", "training"), ("val", "validation")):
            n = sum(1 for r in rows if r.get("training_split") == split)
            if n:
                out.append(
                    f"{n} input stud(y/ies) are in the model's own {what} split (same pixels or "
                    "SOP Instance UID): their results say nothing about new studies"
                )
    return out
