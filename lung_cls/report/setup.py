"""What was run: the setup box at the top of the report, and the failure report of a sweep in
which no run finished.

Why a box: a number beside the paper's means nothing without the set-up it came from (a phantom
at 64 px, 6 epochs from scratch is not the paper's 530 real studies at 224 px, 100 epochs,
ImageNet-pretrained). Everything is read from the run dirs (``metrics.json``,
``config_resolved.yaml``, ``timing.json``); a fact that differs between runs is listed with all
its values.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from lung_cls.report.discover import RunRecord
from lung_cls.runs import RunFile, run_file

#: The paper's set-up, in the box's words (Jeong et al. 2022; ../shared/PAPER.md).
PAPER_SETUP: dict[str, str] = {
    "data": "530 real anterior planar studies (394 perfusion, 136 ventilation), 256 x 256",
    "input size": "224 px",
    "epochs": "100, best validation accuracy kept",
    "weights": "ImageNet-pretrained",
    "models": "VGG-16, ResNet-18, Inception-ResNet-v2, SE-ResNeXt-101",
    "seeds": "5 repetitions",
}


def _yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            out = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        return {}
    return out if isinstance(out, dict) else {}


def _json(path: Path) -> dict[str, Any]:
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def _get(d: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _values(items: Iterable[Any]) -> str:
    """One value, or every distinct value with its count when the runs differ."""
    counts = Counter(str(v) for v in items if v is not None and v != "")
    if not counts:
        return "?"
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{v} ({n} runs)" for v, n in counts.most_common())


def _data_source(cfg: dict[str, Any]) -> str:
    data = cfg.get("data") or {}
    source = data.get("source")
    if source == "phantom":
        n = (data.get("n_perfusion"), data.get("n_ventilation"))
        diff = _get(data, "sim.difficulty")
        return (
            f"built-in V/Q phantom (simulated, not patient data): {n[0]} perfusion + {n[1]} "
            f"ventilation, difficulty {diff}, phantom seed {data.get('phantom_seed')}"
        )
    where = data.get("root") or data.get("manifest") or ""
    return f"{source or '?'} {where}".strip()


def _split_text(summary: dict[str, Any]) -> str:
    parts = []
    for split in ("train", "val", "test"):
        s = summary.get(split) or {}
        if s:
            parts.append(
                f"{split} {s.get('images')} ({s.get('perfusion')} perfusion / "
                f"{s.get('ventilation')} ventilation, {s.get('patients')} patients)"
            )
    if summary.get("n_train_balanced"):
        parts.append(f"training set up-sampled to {summary['n_train_balanced']}")
    return ", ".join(parts) or "?"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def setup_facts(runs: Sequence[RunRecord]) -> dict[str, str]:
    """The box's facts (label -> text), from the finished runs (all runs if none finished)."""
    ok = [r for r in runs if r.status == "ok"] or list(runs)
    cfgs = [_yaml(run_file(r.path, RunFile.CONFIG)) for r in ok]
    mets = [r.metrics or {} for r in ok]
    times = [_json(run_file(r.path, RunFile.TIMING)) for r in ok]
    summaries = [m.get("data") or {} for m in mets]
    total = [
        sum((s.get(k) or {}).get("images") or 0 for k in ("train", "val", "test", "unused"))
        for s in summaries
    ]
    weights = [
        "from scratch"
        if m.get("pretrained") is False or m.get("weights") == "scratch"
        else f"pretrained ({m.get('weights')})"
        for m in mets
    ]
    best = sorted({int(m["best_epoch"]) for m in mets if isinstance(m.get("best_epoch"), int)})
    epochs = [f"{m.get('max_epochs')}" for m in mets]
    run_s = [t.get("run_seconds") for t in times if isinstance(t.get("run_seconds"), int | float)]
    trainer = [c.get("trainer") or {} for c in cfgs]
    facts = {
        "data": _values(_data_source(c) for c in cfgs),
        "images": _values(total),
        "splits": _values(_split_text(s) for s in summaries),
        "input size": _values(f"{m.get('image_size')} px" for m in mets),
        "epochs": _values(epochs)
        + (f" (best validation epoch kept: {', '.join(map(str, best))})" if best else ""),
        "weights": _values(weights),
        "models": ", ".join(sorted({r.model for r in ok})) or "?",
        "seeds": ", ".join(str(s) for s in sorted({r.seed for r in ok if r.seed is not None})),
        "CAM layer": _values(_get(c, "model.cam_layer") or "last feature map" for c in cfgs),
        "device": _values(
            f"{t.get('device') or tr.get('accelerator')}, precision {tr.get('precision')}, "
            f"{t.get('threads', '?')} thread(s)"
            for t, tr in zip(times, trainer, strict=True)
        ),
        "time taken": (
            f"{_minutes(sum(run_s))} of run time over {len(run_s)} runs "
            f"(mean {_minutes(sum(run_s) / len(run_s))} per run)"
            if run_s
            else "?"
        ),
        "git commit": _values(t.get("git_commit") for t in times),
    }
    return facts


def comparison_caption(facts: dict[str, str]) -> str:
    """Table 1's label: a comparison of two set-ups that differ, in the box's words."""
    ours = ", ".join(f"{k} {facts.get(k, '?')}" for k in ("input size", "epochs", "weights"))
    theirs = ", ".join(f"{k} {PAPER_SETUP[k]}" for k in ("input size", "epochs", "weights"))
    data = facts.get("data", "?")
    same = "phantom" not in data and "224" in facts.get("input size", "")
    verdict = (
        ""
        if same
        else " The numbers come from different set-ups; agreement or disagreement with "
        "the paper is not a reproduction of it."
    )
    return f"This sweep: {data}; {ours}. The paper: {PAPER_SETUP['data']}; {theirs}.{verdict}"


# --------------------------------------------------------------------------- no finished run
_VOLATILE = re.compile(r"(/[^\s:'\"]+)|(\b\d+(\.\d+)?\b)")


def error_groups(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """The runs' errors grouped: identical messages (paths and numbers aside) once, with the
    runs that hit them, most frequent first."""
    groups: dict[str, dict[str, Any]] = {}
    for r in runs:
        if r.status == "ok":
            continue
        text = (r.error or f"{r.status}: no error recorded").strip()
        last = text.splitlines()[-1] if text else text
        key = _VOLATILE.sub("#", last)
        g = groups.setdefault(key, {"error": last, "status": r.status, "runs": []})
        g["runs"].append(r.name)
    return sorted(groups.values(), key=lambda g: -len(g["runs"]))
