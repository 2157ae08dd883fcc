"""Finding and reading a sweep's runs: one outcome per run dir, the reason with it, and the jobs
that never ran. Run dirs are written with lung_cls.runs, the contract train.py writes through."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from lung_cls.report.discover import (
    RunRecord,
    discover_runs,
    missing_jobs,
    parse_overrides,
    runs_by_model,
)
from lung_cls.runs import write_metrics, write_predictions

TEST_ROWS = [
    {"id": i, "path": f"p/{i}", "patient_id": i, "split": "test", "label": y, "prob_perfusion": p, "pred": int(p >= 0.5)}
    for i, y, p in (("a", 1, 0.9), ("b", 1, 0.4), ("c", 0, 0.2), ("d", 0, 0.1))
]  # fmt: skip


def _run_dir(sweep: Path, name: str, overrides: list[str] | None = None) -> Path:
    """A folder as Hydra leaves it at job start: .hydra/config.yaml and overrides.yaml."""
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 7\nmodel:\n  name: ${oc.env:X}\n")
    lines = "".join(f"- {o}\n" for o in (overrides or []))
    (run / ".hydra" / "overrides.yaml").write_text(lines)
    return run


def _metrics(status: str = "ok", **extra) -> dict:
    return {"status": status, "error": None, "model": "resnet18", "seed": 0, **extra}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    s = tmp_path / "sweep"
    ok = _run_dir(s, "model=resnet18,seed=0", ["model=resnet18", "seed=0"])
    write_predictions(ok, TEST_ROWS)
    write_metrics(ok, _metrics(test={"acc": 0.75, "auc": 1.0}))

    stale = _run_dir(s, "model=resnet18,seed=1", ["model=resnet18", "seed=1"])
    write_predictions(stale, TEST_ROWS)  # metrics.json's test acc disagrees with its rows
    write_metrics(stale, _metrics(seed=1, test={"acc": 0.5, "auc": 1.0}))

    json_only = _run_dir(s, "model=vgg16,seed=0", ["model=vgg16", "seed=0"])
    write_metrics(json_only, _metrics(model="vgg16", test={"acc": 0.6, "f1": 0.5}))

    empty = _run_dir(s, "model=vgg16,seed=1", ["model=vgg16", "seed=1"])
    write_metrics(empty, _metrics(model="vgg16", seed=1))  # no predictions, no test numbers

    failed = _run_dir(s, "model=vgg16,seed=2", ["model=vgg16", "seed=2"])
    write_metrics(failed, _metrics("failed", model="vgg16", seed=2, error="CUDA out of memory"))

    interrupted = _run_dir(s, "model=vgg16,seed=3", ["model=vgg16", "seed=3"])
    write_metrics(interrupted, _metrics("interrupted", model="vgg16", seed=3))

    broken = _run_dir(s, "model=vgg16,seed=4", ["+model=vgg16", "seed=4"])
    (broken / "metrics.json").write_text("[1, 2]")

    _run_dir(s, "model=vgg16,seed=5")  # killed: no overrides, no metrics.json, no log
    (s / "model=vgg16,seed=0" / "report").mkdir()  # never a run dir
    return s


def test_each_run_dir_gets_one_outcome_and_its_reason(sweep: Path) -> None:
    runs = {r.name: r for r in discover_runs(sweep)}
    assert sorted(runs) == [f"model=resnet18,seed={s}" for s in (0, 1)] + [
        f"model=vgg16,seed={s}" for s in range(6)
    ]
    ok = runs["model=resnet18,seed=0"]
    assert (ok.status, ok.metrics_source, ok.notes) == ("ok", "predictions.csv", [])
    assert ok.test_metrics["acc"] == 0.75 and len(ok.test) == 4
    stale = runs["model=resnet18,seed=1"]
    assert stale.test_metrics["acc"] == 0.75  # recomputed from the rows
    assert stale.notes == [
        "test acc in metrics.json (0.5000) differs from predictions.csv (0.7500); "
        "the report uses predictions.csv"
    ]
    json_only = runs["model=vgg16,seed=0"]
    assert (json_only.status, json_only.metrics_source, json_only.test) == (
        "ok",
        "metrics.json",
        None,
    )
    assert json_only.test_metrics == {"acc": 0.6, "f1": 0.5}
    assert "predictions.csv: missing; using the metrics.json test numbers" in json_only.notes[0]
    empty = runs["model=vgg16,seed=1"]
    assert empty.status == "failed" and "nothing to report" in empty.error
    assert (runs["model=vgg16,seed=2"].status, runs["model=vgg16,seed=2"].error) == (
        "failed",
        "CUDA out of memory",
    )
    interrupted = runs["model=vgg16,seed=3"]
    assert interrupted.status == "failed" and interrupted.error == "status 'interrupted'"
    broken = runs["model=vgg16,seed=4"]
    assert broken.status == "failed" and broken.error.endswith("metrics.json: not a JSON object")
    assert broken.model == "vgg16" and broken.seed == 4  # from "+model=vgg16" in the overrides
    killed = runs["model=vgg16,seed=5"]
    assert killed.status == "incomplete" and "did not finish" in killed.error
    # No metrics, no overrides: the config's seed; its model name is an interpolation, not a name.
    assert (killed.model, killed.seed) == ("unknown", 7)


def test_an_unfinished_run_shows_its_last_traceback(sweep: Path) -> None:
    killed = sweep / "model=vgg16,seed=5"
    (killed / "train.log").write_text(
        "epoch 1\nTraceback (most recent call last):\n  old\nValueError: first\n"
        "epoch 2\nTraceback (most recent call last):\n  File x\nRuntimeError: disk full\n"
    )
    run = {r.name: r for r in discover_runs(sweep)}["model=vgg16,seed=5"]
    assert (
        run.error
        == "train.log: Traceback (most recent call last):\n  File x\nRuntimeError: disk full"
    )


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda df: df.assign(label=2), "y_true must hold only 0 (ventilation) and 1 (perfusion)"),
        (lambda df: df.drop(columns=["label"]), "missing columns ['label']"),
        (lambda df: df.assign(split="val"), "no rows with split == 'test'"),
        (lambda df: df.assign(id="same"), "duplicate test ids"),
    ],
)
def test_unusable_predictions_name_the_file_and_the_reason(sweep: Path, change, reason) -> None:
    ok = sweep / "model=resnet18,seed=0"
    change(pd.DataFrame(TEST_ROWS)).to_csv(ok / "predictions.csv", index=False)
    run = {r.name: r for r in discover_runs(sweep)}["model=resnet18,seed=0"]
    assert run.metrics_source == "metrics.json" and run.test is None  # never pooled
    assert run.notes[0].startswith(f"{ok / 'predictions.csv'}: unusable ({reason}"), run.notes


def test_the_report_folder_and_an_excluded_dir_are_skipped(sweep: Path) -> None:
    out = sweep / "elsewhere"
    _run_dir(out, "model=x,seed=0")
    names = {r.name for r in discover_runs(sweep, exclude=out)}
    assert not any(n.startswith("elsewhere") for n in names) and len(names) == 8
    assert any(n.startswith("elsewhere") for n in (r.name for r in discover_runs(sweep)))


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["model=resnet18", "seed=0"], {"model": "resnet18", "seed": "0"}),
        (["+x=1", "++y=a=b", "~z=3"], {"x": "1", "y": "a=b", "z": "3"}),
        (["no_value", 3, "k=v"], {"k": "v"}),
        ("model=resnet18", {}),  # not a list
        (None, {}),
    ],
)
def test_parse_overrides(items, expected) -> None:
    assert parse_overrides(items) == expected


def _multirun(sweep: Path, text: str) -> None:
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "multirun.yaml").write_text(text)


def _ran(**overrides: str) -> RunRecord:
    return RunRecord(
        name="r", path=Path("."), model="m", seed=None, status="ok", overrides=overrides
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (  # config sweeper params and command-line overrides, range() expanded
            "hydra:\n  sweeper:\n    params:\n      model: a,b\n"
            "  overrides:\n    task:\n    - seed=range(0,3)\n    - hydra.launcher.n_jobs=2,4\n",
            ["model=a,seed=1", "model=a,seed=2", "model=b,seed=0", "model=b,seed=1"],
        ),
        ("hydra:\n  overrides:\n    task:\n    - model=a,b\n    - seed=0\n", []),  # all ran
        ("hydra:\n  overrides:\n    task:\n    - model=glob(*)\n    - seed=0,1,2\n", []),
        ("hydra:\n  overrides:\n    task:\n    - seed=range(0,4,2)\n", []),  # 0 and 2 ran
        ("not: hydra\n", []),
    ],
)
def test_missing_jobs(tmp_path: Path, text: str, expected: list[str]) -> None:
    _multirun(tmp_path, text)
    runs = [_ran(model="a", seed="0"), _ran(model="b", seed="2")]
    assert missing_jobs(tmp_path, runs) == expected


def test_missing_jobs_without_multirun_yaml(tmp_path: Path) -> None:
    assert missing_jobs(tmp_path, []) == []


def test_runs_by_model_orders_groups_and_notes_repeated_seeds() -> None:
    def rec(model: str, seed: int | None, name: str, status: str = "ok") -> RunRecord:
        return RunRecord(
            name=name, path=Path(name), model=model, seed=seed, status=status, test_metrics={}
        )

    runs = [
        rec("zebra", 0, "z0"),
        rec("resnet18", 1, "r1"),
        rec("alpha", None, "a-none"),
        rec("alpha", 2, "a2"),
        rec("vgg16", 0, "v0"),
        rec("resnet18", 0, "r0"),
        rec("resnet18", 0, "r0-again"),
        rec("inception_resnet_v2", 0, "i0", status="failed"),
    ]
    notes: list[str] = []
    grouped = runs_by_model(runs, notes)
    assert list(grouped) == ["vgg16", "resnet18", "alpha", "zebra"]  # paper order, then A-Z
    assert [r.name for r in grouped["resnet18"]] == ["r0", "r0-again", "r1"]
    assert [r.name for r in grouped["alpha"]] == ["a2", "a-none"]  # no seed: last
    assert notes == ["resnet18: several runs share a seed ([0, 0, 1]); all are counted"]
    folds = [rec("resnet18", 0, f"f{k}") for k in range(3)]
    for k, r in enumerate(folds):
        r.overrides = {"data.split.fold": str(k)}
    notes = []
    assert len(runs_by_model(folds, notes)["resnet18"]) == 3
    assert notes == []  # three folds of seed 0 are three test sets, not repeated runs


def test_metrics_json_names_the_model(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, "job0", ["model=vgg16"])
    write_predictions(run, TEST_ROWS)
    write_metrics(run, _metrics(model="seresnext101", seed=3))
    (record,) = discover_runs(tmp_path)
    assert (record.model, record.seed) == ("seresnext101", 3)  # metrics.json wins
    assert json.loads((run / "metrics.json").read_text())["status"] == "ok"
