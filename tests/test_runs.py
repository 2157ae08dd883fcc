"""The run-dir contract (lung_cls/runs.py): names, writers, readers and the one rule that finds
run dirs. Train writes run dirs on one machine; the report, the sweep callback, the QA tool and
the benchmarks read them elsewhere, later - so every name and dtype here is an interface.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from lung_cls.runs import (
    MASK_PREFIX,
    PREDICTION_FIELDS,
    CamKey,
    RunFile,
    Status,
    find_run_dirs,
    is_complete,
    is_run_dir,
    masks_of,
    read_cams,
    read_metrics,
    read_predictions,
    run_file,
    run_status,
    write_cams,
    write_metrics,
    write_predictions,
)


# --------------------------------------------------------------------------- names
def test_file_and_key_names_are_the_documented_contract():
    # Run dirs written by earlier versions (and docs/internals.md) use exactly these names.
    assert {f.name: str(f) for f in RunFile} == {
        "CONFIG": "config_resolved.yaml",
        "HYDRA_CONFIG": ".hydra/config.yaml",
        "OVERRIDES": ".hydra/overrides.yaml",
        "METRICS": "metrics.json",
        "PREDICTIONS": "predictions.csv",
        "CAMS": "cams.npz",
        "TIMING": "timing.json",
        "STEP_TIMING": "step_timing.json",
        "BEST_CKPT": "checkpoints/best.ckpt",
        "LAST_CKPT": "checkpoints/last.ckpt",
    }
    assert [str(k) for k in CamKey] == ["cams", "labels", "ids", "images", "probs", "preds"]
    assert PREDICTION_FIELDS == (
        "id", "path", "patient_id", "split", "label", "prob_perfusion", "pred", "subgroup",
    )  # fmt: skip
    assert [str(s) for s in Status] == ["ok", "failed", "interrupted", "incomplete"]
    assert Status.OK == "ok" and f"{RunFile.METRICS}" == "metrics.json"  # usable as plain str
    assert run_file("/r", RunFile.BEST_CKPT) == Path("/r/checkpoints/best.ckpt")


def test_the_training_side_writes_through_this_module():
    """The run-dir writers other modules use are these functions (one definition each)."""
    from lung_cls.evaluation import callbacks, groundtruth

    assert callbacks.PREDICTION_FIELDS is PREDICTION_FIELDS
    assert callbacks.write_metrics is write_metrics and callbacks.write_cams is write_cams
    assert callbacks.write_predictions is write_predictions
    assert groundtruth.masks_from_npz is masks_of


# --------------------------------------------------------------------------- metrics.json
def test_metrics_round_trip_with_nan_as_null(tmp_path):
    write_metrics(tmp_path, {"status": "ok", "auc": float("nan"), "x": np.float32(0.5)})
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text and json.loads(text)["auc"] is None  # strict JSON for any reader
    assert read_metrics(tmp_path) == {"status": "ok", "auc": None, "x": 0.5}
    assert run_status(tmp_path) == Status.OK and is_complete(tmp_path)


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (None, Status.INCOMPLETE),  # killed before it wrote anything
        ('{"status": "ok"}', Status.OK),
        ('{"status": "failed", "error": "x"}', Status.FAILED),
        ('{"status": "interrupted"}', Status.INTERRUPTED),
        ('{"status": "weird"}', Status.FAILED),
        ("{}", Status.FAILED),
        ("{not json", Status.FAILED),
        ("[1, 2]", Status.FAILED),
    ],
)
def test_run_status(tmp_path, content, status):
    if content is not None:
        (tmp_path / "metrics.json").write_text(content)
    assert run_status(tmp_path) == status
    assert is_complete(tmp_path) == (status == Status.OK)


@pytest.mark.parametrize(("content", "why"), [("{not json", "not valid JSON"), ("[1]", "object")])
def test_broken_metrics_name_the_file(tmp_path, content, why):
    (tmp_path / "metrics.json").write_text(content)
    with pytest.raises(ValueError, match=why) as info:
        read_metrics(tmp_path)
    assert str(tmp_path / "metrics.json") in str(info.value)
    assert read_metrics(tmp_path / "elsewhere") is None


# --------------------------------------------------------------------------- predictions.csv
def _rows(split: str, n: int, start: int = 0) -> list[dict]:
    return [
        {"id": f"s{i}", "path": f"/d/s{i}.dcm", "patient_id": f"p{i}", "split": split,
         "label": i % 2, "prob_perfusion": f"{(i % 10) / 10:.6f}", "pred": int(i % 10 >= 5),
         "extra": "left out"}
        for i in range(start, start + n)
    ]  # fmt: skip


def test_predictions_round_trip_typed(tmp_path):
    write_predictions(tmp_path, _rows("val", 3) + _rows("test", 4, start=3))
    with (tmp_path / "predictions.csv").open() as fh:
        assert tuple(next(csv.reader(fh))) == PREDICTION_FIELDS  # extra keys are not written
    df = read_predictions(tmp_path)
    assert len(df) == 7 and df["label"].dtype == np.int64
    assert df["prob_perfusion"].dtype == np.float64 and df["pred"].dtype == np.int64
    test = read_predictions(tmp_path, split="test")
    assert test["id"].tolist() == ["s3", "s4", "s5", "s6"] and test.index.tolist() == [0, 1, 2, 3]

    write_predictions(tmp_path, [{**_rows("test", 1)[0], "id": "007", "patient_id": "0042"}])
    again = read_predictions(tmp_path, "test")
    assert again["id"].tolist() == ["007"] and again["patient_id"].tolist() == ["0042"]  # not 7


def test_predictions_keep_subgroup_categories_as_written(tmp_path):
    rows = _rows("val", 1) + _rows("test", 4, start=1)
    for r, v in zip(rows, ["yes", "None", "NA", "", "no"], strict=True):
        r["subgroup"] = v  # "None" and "NA" are categories here, not pandas' missing values
    write_predictions(tmp_path, rows)
    assert read_predictions(tmp_path, "test")["subgroup"].tolist() == ["None", "NA", "", "no"]
    assert read_predictions(tmp_path)["subgroup"].tolist()[0] == "yes"


def test_predictions_without_pred_column_get_it_from_the_probability(tmp_path):
    (tmp_path / "predictions.csv").write_text(
        "id,split,label,prob_perfusion\na,test,1,0.5\nb,test,0,0.49\n"
    )
    assert read_predictions(tmp_path, "test")["pred"].tolist() == [1, 0]  # >= 0.5 is perfusion


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("id,split,label\na,test,1\n", "missing columns"),
        ("id,split,label,prob_perfusion\na,val,1,0.2\n", "no rows with split"),
        ("id,split,label,prob_perfusion\na,test,1,0.2\na,test,0,0.3\n", "duplicate test ids"),
        ("id,split,label,prob_perfusion\na,test,yes,0.2\n", "does not parse"),
    ],
)
def test_bad_predictions_name_the_file_and_the_reason(tmp_path, text, why):
    (tmp_path / "predictions.csv").write_text(text)
    with pytest.raises(ValueError, match=why) as info:
        read_predictions(tmp_path, split="test")
    assert str(tmp_path / "predictions.csv") in str(info.value)


def test_missing_predictions_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_predictions(tmp_path)


# --------------------------------------------------------------------------- cams.npz
def _cam_arrays(n: int = 4, size: int = 8) -> dict:
    rng = np.random.default_rng(0)
    return {
        "cams": rng.random((n, size, size)),
        "labels": np.array([1, 0, 1, 0][:n]),
        "ids": [f"s{i}" for i in range(n)],
        "images": rng.integers(0, 256, (n, size, size)),
        "probs": np.array([0.9, 0.5, 0.4999, 0.1][:n]),
    }


def test_cams_round_trip_with_contract_dtypes_and_masks(tmp_path):
    masks = {"trachea": np.zeros((4, 8, 8), bool), "lungs": np.ones((4, 8, 8), int)}
    write_cams(tmp_path, **_cam_arrays(), masks=masks, extra={"layer_size": np.array([2, 2])})
    arrays = read_cams(tmp_path)
    assert arrays["cams"].dtype == np.float16 and arrays["labels"].dtype == np.int64
    assert arrays["images"].dtype == np.uint8 and arrays["probs"].dtype == np.float32
    assert arrays["ids"].tolist() == ["s0", "s1", "s2", "s3"]
    assert arrays["preds"].tolist() == [1, 1, 0, 0]  # the same 0.5 rule as predictions.csv
    assert arrays["layer_size"].tolist() == [2, 2]
    assert f"{MASK_PREFIX}trachea" in arrays
    got = masks_of(arrays)
    assert set(got) == {"trachea", "lungs"} and got["lungs"].dtype == bool and got["lungs"].all()
    assert read_cams(tmp_path / "cams.npz").keys() == arrays.keys()  # a file works as well as a dir


def test_cams_refuse_arrays_of_different_lengths_and_clashing_extras(tmp_path):
    bad = {**_cam_arrays(), "labels": np.array([1, 0, 1])}
    with pytest.raises(ValueError, match="labels has"):
        write_cams(tmp_path, **bad)
    for name in ("probs", "mask_lungs"):
        with pytest.raises(ValueError, match="clashes"):
            write_cams(tmp_path, **_cam_arrays(), extra={name: np.zeros(4)})
    assert not (tmp_path / "cams.npz").exists()


def test_unreadable_cams_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_cams(tmp_path)
    (tmp_path / "cams.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="unreadable") as info:
        read_cams(tmp_path)
    assert str(tmp_path / "cams.npz") in str(info.value)
    np.savez(tmp_path / "cams.npz", cams=np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="needs the arrays"):
        read_cams(tmp_path)
    np.savez(tmp_path / "cams.npz", cams=np.zeros((2, 4, 4)), labels=np.zeros(3))
    with pytest.raises(ValueError, match="do not match"):
        read_cams(tmp_path)


# --------------------------------------------------------------------------- find_run_dirs
def _run(path: Path, status: str | None = "ok", hydra: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if hydra:
        (path / ".hydra").mkdir(exist_ok=True)
        (path / ".hydra" / "config.yaml").write_text("{}")
    if status is not None:
        (path / "metrics.json").write_text(json.dumps({"status": status}))
    return path


def test_find_run_dirs_of_a_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    ok = _run(sweep / "model=resnet18,seed=0")
    failed = _run(sweep / "model=resnet18,seed=1", "failed")
    killed = _run(sweep / "model=vgg16,seed=0", None)  # Hydra wrote .hydra, the job died
    copied = _run(sweep / "copy_of_cluster" / "model=vgg16,seed=1", hydra=False)  # nested sweep
    (sweep / "multirun.yaml").write_text("{}")
    # never run dirs: the report, hidden folders, anything inside a run dir
    _run(sweep / "report")
    _run(sweep / ".cache" / "x")
    _run(ok / "checkpoints" / "inner")
    _run(ok / "wandb" / "offline-run")
    (sweep / "notes").mkdir()
    assert find_run_dirs(sweep) == sorted([ok, failed, killed, copied])
    assert [run_status(d) for d in find_run_dirs(sweep)] == [
        Status.OK, Status.OK, Status.FAILED, Status.INCOMPLETE,
    ]  # fmt: skip
    assert find_run_dirs(sweep, exclude=sweep / "copy_of_cluster") == [ok, failed, killed]
    assert all(is_run_dir(d) for d in (ok, failed, killed, copied))
    assert not is_run_dir(sweep / "notes")


def test_find_run_dirs_of_a_single_run_and_of_nothing(tmp_path):
    single = _run(tmp_path / "run")
    _run(single / "sub")  # a run dir's own sub-folders are not searched
    assert find_run_dirs(single) == [single]
    # A Hydra multirun's top folder has .hydra-like files of its own but no metrics: not a run.
    top = tmp_path / "multi"
    top.mkdir()
    (top / "multirun.yaml").write_text("{}")
    (top / ".hydra").mkdir()
    (top / ".hydra" / "config.yaml").write_text("{}")
    job = _run(top / "seed=0")
    assert find_run_dirs(top) == [job]
    assert not is_run_dir(top)
    assert find_run_dirs(tmp_path) == [job, single]  # below a parent folder, too
    assert find_run_dirs(tmp_path / "absent") == []
