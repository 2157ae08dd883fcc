"""Typed mistakes caught before anything runs: one line naming the key, the value and what fits.

Hydra reads ``seed=abc`` as the string ``"abc"`` and ``model.pretrained=flase`` as a (truthy)
string, and a mistyped key (``trainer.max_epoch=3``) gets the advice to append it with ``+``, which
then fails inside Lightning. :func:`preflight` composes the configuration the way the command will
(every job of a sweep), and before the first job checks, in this order:

1. keys that do not exist, with a "did you mean" from the keys that do;
2. the values users type, against :data:`SCHEMA` (integers, booleans, ranges, choices);
3. the data: a folder or manifest that is required but not given, or not there;
4. pretrained weights of every model of the sweep, once (``lung_cls.utils.weights``).

Each problem is a :class:`~lung_cls.errors.UserError`: the task wrapper prints one line, exit 2.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lung_cls.errors import ConfigError, DataError, UserError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# Command-line flags after which the command does not run a job (help, printing the config...).
_NO_JOB_FLAGS = {
    "--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc",
    "--version", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
    "--experimental-rerun",
}  # fmt: skip
# A sweep bigger than this is checked on its first jobs only (composing costs ~50 ms a job).
MAX_CHECKED_JOBS = 200


# --------------------------------------------------------------------------- the value schema
@dataclass(frozen=True)
class Check:
    """What a key accepts: ``test(value)`` is True for a good value; ``expected`` says what fits."""

    test: Callable[[Any], bool]
    expected: str


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    if lo is None and hi is None:
        return Check(_is_int, "expected an integer")
    if hi is None:
        return Check(lambda v: _is_int(v) and v >= lo, f"expected an integer >= {lo}")
    return Check(lambda v: _is_int(v) and lo <= v <= hi, f"expected an integer in [{lo}, {hi}]")


def number(lo: float | None = None, hi: float | None = None, *, above: bool = False) -> Check:
    if lo is None:
        return Check(_is_number, "expected a number")
    op = ">" if above else ">="
    if hi is None:
        ok = (lambda v: v > lo) if above else (lambda v: v >= lo)
        return Check(lambda v: _is_number(v) and ok(v), f"expected a number {op} {lo:g}")
    return Check(
        lambda v: _is_number(v) and lo <= v <= hi, f"expected a number in [{lo:g}, {hi:g}]"
    )


BOOL = Check(lambda v: isinstance(v, bool), "expected true or false")


def choice(*options: Any) -> Check:
    shown = " or ".join(str(o).lower() if isinstance(o, bool) else str(o) for o in options)
    return Check(lambda v: any(v == o and type(v) is type(o) for o in options), f"expected {shown}")


#: Keys users type, and what each accepts. A key absent from the composed config is not checked.
SCHEMA: dict[str, Check] = {
    "seed": integer(),
    "train": BOOL,
    "test": BOOL,
    "cams": BOOL,
    "resume": BOOL,
    "resumable": BOOL,
    "skip_completed": BOOL,
    "overwrite": BOOL,
    "verbose": BOOL,
    "download_weights": BOOL,
    "n_boot": integer(0),
    "model.pretrained": BOOL,
    "model.channels_last": BOOL,
    "model.compile": BOOL,
    "model.in_chans": choice(1, 3),
    "model.num_classes": integer(2),
    "model.drop_rate": number(0.0, 1.0),
    "model.optimizer.lr": number(0.0, above=True),
    "model.optimizer.weight_decay": number(0.0),
    "trainer.max_epochs": integer(1),
    "trainer.min_epochs": integer(0),
    "trainer.check_val_every_n_epoch": integer(1),
    "trainer.log_every_n_steps": integer(1),
    "trainer.num_sanity_val_steps": integer(-1),
    "trainer.num_nodes": integer(1),
    "trainer.enable_progress_bar": BOOL,
    "trainer.benchmark": BOOL,
    "trainer.deterministic": choice(True, False, "warn"),
    "data.batch_size": integer(1),
    "data.split_seed": integer(),
    "data.phantom_seed": integer(),
    "data.n_perfusion": integer(1),
    "data.n_ventilation": integer(1),
    "data.preprocess.size": integer(8),
    "data.on_error": choice("raise", "skip"),
    "data.duplicates": choice("warn", "error"),
    "data.augment.enabled": BOOL,
    "data.augment.hflip": BOOL,
    "data.augment.p": number(0.0, 1.0),
    "data.sim.difficulty": number(0.0, 1.0),
}

_UNSET = object()


def check_values(cfg: DictConfig, schema: dict[str, Check] | None = None) -> None:
    """Raise :class:`ConfigError` for the first value that does not fit :data:`SCHEMA`."""
    for key, check in (schema or SCHEMA).items():
        try:
            value = OmegaConf.select(cfg, key, default=_UNSET, throw_on_missing=False)
        except Exception:  # noqa: BLE001 - an interpolation that cannot resolve here: not typed
            continue
        if value is _UNSET or value is None or OmegaConf.is_config(value):
            continue
        if not check.test(value):
            raise ConfigError(key, value, check.expected)


# --------------------------------------------------------------------------- unknown keys
def _known_keys(node: Any) -> list[str]:
    return [str(k) for k in node.keys()] if OmegaConf.is_dict(node) else []


def did_you_mean(key: str, cfg: DictConfig, groups: Iterable[str] = ()) -> str | None:
    """The nearest existing key to ``key`` (same parent), e.g. trainer.max_epochs for max_epoch."""
    parts = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        if OmegaConf.is_dict(node) and part in node:
            node = node[part]
            continue
        candidates = _known_keys(node) + (list(groups) if i == 0 else [])
        close = difflib.get_close_matches(part, candidates, n=1, cutoff=0.6)
        if not close:
            return None
        return ".".join([*parts[:i], close[0], *parts[i + 1 :]])
    return None


def _unknown_key_error(line: str, key: str, cfg: DictConfig, groups: Iterable[str]) -> UserError:
    parent = key.rpartition(".")[0]
    suggestion = did_you_mean(key, cfg, groups)
    if suggestion:
        value = line.partition("=")[2]
        return UserError(f"{line}: no such key; did you mean {suggestion}={value}?")
    where = f" under {parent}" if parent and OmegaConf.select(cfg, parent) is not None else ""
    known = _known_keys(OmegaConf.select(cfg, parent) if where else cfg)
    shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
    return UserError(f"{line}: no such key{where} (known: {shown})")


_NO_OPTION = re.compile(r"Could not find '([^']+)/([^'/]+)'")


def _unknown_option_error(text: str, overrides: list[str]) -> UserError | None:
    """``model=vgg17``: name the group's options (not the internal ``_base``-like ones)."""
    match = _NO_OPTION.search(text)
    if not match or "Available options in" not in text:
        return None
    group, name = match.groups()
    listed = text.split("Available options in", 1)[1].split("Config search path", 1)[0]
    options = [o for o in listed.split()[1:] if not o.startswith("_")]
    if not options:
        return None
    line = next((o for o in overrides if o.lstrip("+~").split("=")[0].endswith(group)), None)
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    hint = f"; did you mean {group}={close[0]}?" if close else ""
    return UserError(
        f"{line or f'{group}={name}'}: no such {group} config{hint} (choose from: "
        f"{', '.join(options)})"
    )


_NOT_IN_STRUCT = re.compile(r"Could not override '([^']+)'")
_NO_GROUP_MATCH = re.compile(r"Could not (?:override|delete) '([^']+)'\. No match in the defaults")


# --------------------------------------------------------------------------- composing
def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    import lung_cls.utils.hydra  # noqa: F401 - registers the project's resolvers

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


def compose_or_explain(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose like the command will; a composition error becomes one clear :class:`UserError`."""
    from hydra.errors import HydraException

    try:
        return _compose(config_name, overrides)
    except HydraException as err:
        text = str(err)
        if (option_error := _unknown_option_error(text, overrides)) is not None:
            raise option_error from None
        match = _NO_GROUP_MATCH.search(text) or _NOT_IN_STRUCT.search(text)
        line = next((o for o in overrides if match and o.split("=")[0] == match.group(1)), None)
        if match and line is not None:
            rest = [o for o in overrides if o is not line]
            try:
                cfg = _compose(config_name, rest)
            except HydraException:
                raise UserError(" ".join(text.split())) from None
            groups = [str(g) for g in (OmegaConf.select(cfg, "hydra.runtime.choices") or {})]
            groups = [g for g in groups if not g.startswith("hydra/")]
            raise _unknown_key_error(line, match.group(1), cfg, groups) from None
        raise UserError(" ".join(text.split())) from None


def sweep_jobs(cfg: DictConfig, parsed: list[Any]) -> list[list[str]]:
    """The override lists of every job of the multirun, as Hydra's basic sweeper makes them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    lines = [f"{k}={v}" for k, v in params.items()]
    lines += [o.input_line for o in parsed]
    overrides = OverridesParser.create().parse_overrides(lines)
    # Hydra's own splitting, so the jobs are the jobs it will run (a later key replaces an earlier).
    batches = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def compose_jobs(config_name: str, base: DictConfig, jobs: list[list[str]]) -> list[DictConfig]:
    """Every job's config, composing once per distinct choice of config groups.

    Composing takes 0.1-2 s (a loaded machine); the paper sweep's 20 jobs differ in 4 model
    choices, and their seeds are plain values set on a copy, as Hydra would set them.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = set(OmegaConf.select(base, "hydra.runtime.choices") or {})
    parser = OverridesParser.create()
    composed: dict[tuple[str, ...], DictConfig] = {}
    out = []
    for job in jobs:
        parsed = parser.parse_overrides(job)
        plain = [
            o
            for o in parsed
            if o.key_or_group not in groups
            and not o.key_or_group.startswith("hydra")
            and o.type.name == "CHANGE"
            and OmegaConf.select(base, o.key_or_group, default=_UNSET, throw_on_missing=False)
            is not _UNSET
        ]
        rest = tuple(o.input_line for o in parsed if o not in plain)
        if rest not in composed:
            composed[rest] = compose_or_explain(config_name, list(rest))
        cfg = composed[rest].copy()
        for o in plain:
            OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True, force_add=False)
        out.append(cfg)
    return out


# --------------------------------------------------------------------------- data and weights
def check_data(cfg: DictConfig) -> None:
    """A data folder or manifest that is required but not given, or not there (the data source's
    own wording), before the weights are looked at."""
    data = cfg.get("data")
    if data is None:
        return
    source = data.get("source") if not OmegaConf.is_missing(data, "source") else None
    if source == "folder":
        if OmegaConf.is_missing(data, "root") or data.get("root") in (None, ""):
            raise DataError("data.root", "no data folder given: set data.root=DIR")
        root = Path(str(data.root)).expanduser()
        if not root.is_dir():
            raise DataError(
                root, "data folder does not exist" if not root.exists() else "not a folder"
            )
    elif source == "manifest":
        if OmegaConf.is_missing(data, "manifest") or data.get("manifest") in (None, ""):
            raise DataError("data.manifest", "no manifest given: set data.manifest=FILE.csv")
        manifest = Path(str(data.manifest)).expanduser()
        if not manifest.is_file():
            raise DataError(manifest, "manifest file does not exist")


def check_weights(cfgs: list[DictConfig]) -> None:
    """Every pretrained model of the sweep has weights (or gets them from the hub), checked once."""
    wanted: dict[str, tuple[str, str | None]] = {}
    download = True
    for cfg in cfgs:
        model = cfg.get("model")
        if model is None or model.get("pretrained") is not True:
            continue
        download = download and bool(cfg.get("download_weights", True))
        weights = model.get("weights")
        wanted.setdefault(str(model.get("name")), (str(model.backbone), weights))
    if not wanted:
        return
    from lung_cls.utils.weights import check_pretrained

    check_pretrained(wanted, download=download)


# --------------------------------------------------------------------------- the whole check
def preflight(argv: list[str], config_name: str = "train", *, weights: bool = True) -> None:
    """Check the command line ``argv`` of ``python -m lung_cls.<config_name>`` before Hydra runs it.

    Does nothing for help and config-printing flags, and leaves malformed overrides to Hydra,
    whose message for those is clear. Raises :class:`UserError` for the first problem found.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if any(a.split("=", 1)[0] in _NO_JOB_FLAGS for a in argv):
        return
    multirun = "-m" in argv or "--multirun" in argv
    args = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except HydraException:
        return
    if not multirun and any(o.is_sweep_override() for o in parsed):
        return  # Hydra says "use --multirun"
    base = compose_or_explain(
        config_name, [o.input_line for o in parsed if not o.is_sweep_override()]
    )
    if multirun:
        try:
            jobs = sweep_jobs(base, parsed)
        except HydraException:
            return
        cfgs = compose_jobs(config_name, base, jobs[:MAX_CHECKED_JOBS])
    else:
        cfgs = [base]
    for cfg in cfgs:
        check_values(cfg)
    for cfg in cfgs:
        check_data(cfg)
    if weights:
        check_weights(cfgs)


__all__ = [
    "SCHEMA",
    "Check",
    "check_data",
    "check_values",
    "check_weights",
    "compose_or_explain",
    "did_you_mean",
    "preflight",
    "sweep_jobs",
]
