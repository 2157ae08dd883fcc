"""Predict (the pre-archive QA check): declared classes, statuses, ensembles, bad input, CLI.

Fast tests use scratch checkpoints (written through the classifier's own checkpoint hook). The
`slow` ones train a small checkpoint on an easy phantom (``data.sim.difficulty=0``) and plant
mislabels on test images that the training run itself classified confidently and correctly, then
check that predict reproduces the run's probabilities and flags every planted mislabel.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose, tiny_overrides
from qa_helpers import (
    CORRUPT,
    SIM_EASY,
    make_study_dir,
    predict_cfg,
    read_rows,
    run_cli,
    save_scratch_checkpoint,
    write_plan,
    write_study,
)

from lung_cls.errors import UserError
from lung_cls.predict import (
    check_review_band,
    decide,
    find_inputs,
    resolve_checkpoints,
    run,
)
from lung_cls.qa.declared import (
    AMBIGUOUS,
    PERFUSION,
    UNKNOWN,
    VENTILATION,
    KeywordMatcher,
    declared_for_file,
    declared_from_texts,
    dicom_header_texts,
)


# --------------------------------------------------------------------------------------------------
# The declared class
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Tc-99m MAA", PERFUSION),
        ("99mTc-MAA", PERFUSION),
        ("LUNG PERFUSION ANT", PERFUSION),
        ("LUNG PERF ANT", PERFUSION),
        ("LUNG Q ANT", PERFUSION),
        ("Tc-99m DTPA aerosol", VENTILATION),
        ("Technegas", VENTILATION),
        ("Kr-81m", VENTILATION),
        ("KR81M gas", VENTILATION),
        ("Xe-133", VENTILATION),
        ("133Xe", VENTILATION),
        ("LUNG VENT ANT", VENTILATION),
        ("LUNG_VENT_ANT", VENTILATION),
        ("lung ventilation", VENTILATION),
        ("LUNG VENT + MAA", AMBIGUOUS),
        ("LUNG ANT", UNKNOWN),
        ("NM LUNG V/Q", UNKNOWN),  # names both studies: not a Q
        ("PREVENTIVE SCAN", UNKNOWN),  # "vent" only as a whole word
        ("MAAX", UNKNOWN),
        ("", UNKNOWN),
    ],
)
def test_declared_class_from_series_description(text, expected):
    result = declared_from_texts({"series_description": text})
    assert result.cls == expected
    assert bool(result.evidence) == (expected not in (UNKNOWN,))


def test_declared_fields_combine_and_study_level_is_fallback():
    both = declared_from_texts(
        {"series_description": "LUNG VENT ANT", "radiopharmaceutical": "Tc-99m MAA"}
    )
    assert both.cls == AMBIGUOUS
    assert any("radiopharmaceutical" in e for e in both.evidence)
    # The study description names the V/Q pair; the series-level field decides.
    series = declared_from_texts(
        {"series_description": "LUNG VENT ANT", "study_description": "LUNG PERFUSION VENTILATION"}
    )
    assert series.cls == VENTILATION
    fallback = declared_from_texts(
        {"series_description": "ANT", "study_description": "LUNG PERFUSION"}
    )
    assert fallback.cls == PERFUSION


def test_keyword_map_is_configurable():
    matcher = KeywordMatcher(
        {"perfusion": ["PERFUSIONE"], "ventilation": ["VENTILAZIONE"]}, ignore=[]
    )
    assert (
        declared_from_texts({"series_description": "POLMONE VENTILAZIONE"}, matcher).cls
        == VENTILATION
    )
    assert declared_from_texts({"series_description": "Tc-99m MAA"}, matcher).cls == UNKNOWN
    with pytest.raises(ValueError, match="unknown class"):
        KeywordMatcher({"perf": ["x"]})


def test_config_keyword_map_matches_module_defaults():
    from lung_cls.qa.declared import DEFAULT_IGNORE, DEFAULT_KEYWORDS, SERIES_FIELDS, STUDY_FIELDS

    cfg = predict_cfg("input=x", "output=y")
    assert {k: tuple(v) for k, v in cfg.declared_keywords.items()} == DEFAULT_KEYWORDS
    assert tuple(cfg.declared_ignore) == DEFAULT_IGNORE
    assert tuple(cfg.declared_fields) == SERIES_FIELDS
    assert tuple(cfg.declared_study_fields) == STUDY_FIELDS
    assert list(cfg.review_band) == [0.2, 0.8]


def test_declared_from_dicom_header_and_folder(tmp_path):
    img = np.random.default_rng(0).integers(0, 1000, (64, 64))
    p = write_study(
        tmp_path / "a.dcm", img, "P1", "LUNG ANT", radiopharmaceutical="Technegas",
        StudyDescription="NM LUNG V/Q",
    )  # fmt: skip
    texts = dicom_header_texts(p)
    assert "Technegas" in texts["radiopharmaceutical"]
    decl, _ = declared_for_file(p, is_dicom=True)
    assert decl.cls == VENTILATION
    (tmp_path / "perfusion").mkdir()
    np.save(tmp_path / "perfusion" / "x.npy", img)
    decl, _ = declared_for_file(tmp_path / "perfusion" / "x.npy", is_dicom=False, root=tmp_path)
    assert decl.cls == PERFUSION
    decl, _ = declared_for_file(
        tmp_path / "perfusion" / "x.npy", is_dicom=False, root=tmp_path,
        manifest={str((tmp_path / "perfusion" / "x.npy").resolve()): "ventilation"},
    )  # fmt: skip
    assert decl.cls == VENTILATION  # the manifest wins


# --------------------------------------------------------------------------------------------------
# The decision
# --------------------------------------------------------------------------------------------------
def test_decide_band_mismatch_and_unknowns():
    band = (0.2, 0.8)
    assert decide(0.95, VENTILATION, band) == (PERFUSION, True, "mismatch")
    assert decide(0.05, PERFUSION, band) == (VENTILATION, True, "mismatch")
    assert decide(0.95, PERFUSION, band) == (PERFUSION, False, "ok")
    # Inside the band (inclusive) nothing is forced, even against the declared class.
    assert decide(0.8, VENTILATION, band) == ("uncertain", False, "review")
    assert decide(0.2, PERFUSION, band) == ("uncertain", False, "review")
    # Unknown or ambiguous declarations never make a mismatch; a self-contradicting header is
    # sent to review, with the model's class.
    assert decide(0.99, UNKNOWN, band) == (PERFUSION, False, "ok")
    assert decide(0.01, AMBIGUOUS, band) == (VENTILATION, False, "review")
    # No band: every study gets a class; members that disagree can still send it to review.
    assert decide(0.55, VENTILATION, None) == (PERFUSION, True, "mismatch")
    assert decide(0.95, PERFUSION, band, sd=0.3, review_sd=0.2)[2] == "review"


def test_review_band_validation():
    assert check_review_band([0.1, 0.9]) == (0.1, 0.9)
    assert check_review_band(None) is None
    for bad in ([0.6, 0.9], [0.1], [0.2, 1.2]):
        with pytest.raises(UserError, match="review_band"):
            check_review_band(bad)


# --------------------------------------------------------------------------------------------------
# Inputs and checkpoints
# --------------------------------------------------------------------------------------------------
def test_find_inputs_and_resolve_checkpoints(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    np.save(tmp_path / "in" / "sub" / "a.npy", np.zeros((40, 40)))
    (tmp_path / "in" / "readme.txt").write_text("x")
    (tmp_path / "in" / "out").mkdir()
    np.save(tmp_path / "in" / "out" / "old.npy", np.zeros((40, 40)))
    files, errors, root = find_inputs(tmp_path / "in", exclude=[tmp_path / "in" / "out"])
    assert [f.name for f in files] == ["a.npy"] and not errors and root == tmp_path / "in"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files"):
        find_inputs(tmp_path / "empty")
    with pytest.raises(UserError, match="no such file"):
        find_inputs(tmp_path / "missing")

    for seed in (0, 1):
        ck = tmp_path / "sweep" / f"model=resnet18,seed={seed}" / "checkpoints" / "best.ckpt"
        ck.parent.mkdir(parents=True)
        ck.write_bytes(b"x")
    sweep = tmp_path / "sweep"
    assert len(resolve_checkpoints(str(sweep))) == 2
    assert len(resolve_checkpoints(str(sweep / "model=resnet18,seed=0"))) == 1
    assert len(resolve_checkpoints(f"{sweep}/*seed=1")) == 1
    assert len(resolve_checkpoints([str(sweep), str(sweep / "model=resnet18,seed=0")])) == 2
    with pytest.raises(UserError, match="checkpoint not found"):
        resolve_checkpoints(str(tmp_path / "nope.ckpt"))
    with pytest.raises(UserError, match="no checkpoint found"):
        resolve_checkpoints(str(tmp_path / "empty"))


# --------------------------------------------------------------------------------------------------
# The whole command on scratch checkpoints (fast)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    base = tmp_path_factory.mktemp("scratch")
    a = save_scratch_checkpoint(base / "a.ckpt", seed=0)
    b = save_scratch_checkpoint(base / "b.ckpt", seed=1)
    truth = make_study_dir(base / "studies", SIM_EASY)
    return {"a": a, "b": b, "input": base / "studies", "truth": truth, "base": base}


def test_corrupt_files_become_error_rows(scratch, tmp_path):
    out = tmp_path / "out"
    assert (
        run(predict_cfg(f"ckpt={scratch['a']}", f"input={scratch['input']}", f"output={out}")) == 0
    )
    rows = {Path(r["file"]).name: r for r in read_rows(out)}
    # One row per file: notes.txt is named too, as not an image.
    assert set(rows) == set(scratch["truth"]) | {"truncated.dcm", "random.dcm", "notes.txt"}
    assert rows["notes.txt"]["status"] == "rejected: not an image file type (.txt)"
    assert rows["notes.txt"]["gate"] == "file"
    for bad in ("truncated.dcm", "random.dcm"):
        assert rows[bad]["status"].startswith("error: "), rows[bad]
        assert rows[bad]["prob_perfusion"] == ""
    # The truncated file still has a readable header: its declared class is known.
    assert rows["truncated.dcm"]["declared"] == VENTILATION
    for name in scratch["truth"]:
        assert rows[name]["status"] in ("ok", "review", "mismatch", "review: lungs not found")
        assert (rows[name]["modality"], rows[name]["view"]) == ("NM", "Anterior projection")
        assert rows[name]["sop_class"] == "Nuclear Medicine Image Storage"
        assert 0.0 <= float(rows[name]["prob_perfusion"]) <= 1.0
        assert rows[name]["preprocessing"] in ("centroid", "nmi")
    data = json.loads((out / "predictions.json").read_text())
    assert len(data["rows"]) == len(rows)
    assert data["summary"]["counts"]["error"] == 2
    assert data["summary"]["n"] == sum(data["summary"]["counts"].values()) == len(rows)
    # A scratch checkpoint without a reference: the user is told so, once, at the top of the JSON.
    assert any("no OOD reference" in w for w in data["warnings"])
    assert any("from scratch" in w for w in data["warnings"])
    assert data["preprocess"]["size"] == 32
    assert {r["file"] for r in data["rows"]} == {r["file"] for r in read_rows(out)}


def test_ensemble_mean_and_spread(scratch, tmp_path):
    single = {}
    for key in ("a", "b"):
        out = tmp_path / key
        run(predict_cfg(f"ckpt={scratch[key]}", f"input={scratch['input']}", f"output={out}"))
        single[key] = {r["file"]: r for r in read_rows(out)}
    out = tmp_path / "ens"
    run(
        predict_cfg(
            f"ckpt=[{scratch['a']},{scratch['b']}]", f"input={scratch['input']}", f"output={out}"
        )
    )
    rows = [r for r in read_rows(out) if r["prob_perfusion"] != ""]
    assert rows
    spread = []
    for r in rows:
        pa, pb = (
            float(single["a"][r["file"]]["prob_perfusion"]),
            float(single["b"][r["file"]]["prob_perfusion"]),
        )
        assert float(r["prob_perfusion"]) == pytest.approx((pa + pb) / 2, abs=2e-6)
        assert float(r["prob_sd"]) == pytest.approx(abs(pa - pb) / 2, abs=2e-6)
        assert float(r["prob_min"]) == pytest.approx(min(pa, pb), abs=2e-6)
        assert float(r["prob_max"]) == pytest.approx(max(pa, pb), abs=2e-6)
        spread.append(float(r["prob_sd"]))
    assert max(spread) > 0  # two different seeds do disagree a little
    assert len(json.loads((out / "predictions.json").read_text())["models"]) == 2


def test_mismatch_logic_and_fail_on_mismatch(scratch, tmp_path):
    """Without a review band every study gets a class: the status follows the declared class."""
    out = tmp_path / "out"
    args = [
        f"ckpt={scratch['a']}",
        f"input={scratch['input']}",
        f"output={out}",
        "review_band=null",
    ]
    assert run(predict_cfg(*args, "fail_on_mismatch=true")) == 1  # an untrained model mismatches
    rows = [r for r in read_rows(out) if r["prob_perfusion"] != ""]
    for r in rows:
        pred = PERFUSION if float(r["prob_perfusion"]) >= 0.5 else VENTILATION
        assert r["predicted"] == pred
        expect = r["declared"] in (PERFUSION, VENTILATION) and r["declared"] != pred
        assert (r["status"] == "mismatch") == expect == (r["mismatch"] == "True"), r
    assert run(predict_cfg(*args, "overwrite=true")) == 0  # flagged, but no failure asked for


def test_refuses_to_overwrite_and_checks_members_agree(scratch, tmp_path):
    out = tmp_path / "out"
    run(predict_cfg(f"ckpt={scratch['a']}", f"input={scratch['input']}", f"output={out}"))
    with pytest.raises(UserError, match="already exists"):
        run(predict_cfg(f"ckpt={scratch['a']}", f"input={scratch['input']}", f"output={out}"))
    other = save_scratch_checkpoint(tmp_path / "c.ckpt", prep={"size": 40})
    with pytest.raises(UserError, match="pre-processing differs"):
        run(
            predict_cfg(
                f"ckpt=[{scratch['a']},{other}]",
                f"input={scratch['input']}",
                f"output={tmp_path / 'o2'}",
            )
        )
    bare = save_scratch_checkpoint(tmp_path / "d.ckpt", prep=None)
    ck = torch.load(bare, weights_only=True)
    ck["lung_cls"]["data"] = {}
    torch.save(ck, bare)
    with pytest.raises(UserError, match="no pre-processing config"):
        run(predict_cfg(f"ckpt={bare}", f"input={scratch['input']}", f"output={tmp_path / 'o3'}"))
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(np.random.default_rng(1).bytes(200))
    with pytest.raises(UserError, match="junk.ckpt: not a readable") as info:
        run(predict_cfg(f"ckpt={junk}", f"input={scratch['input']}", f"output={tmp_path / 'o4'}"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("batch_size=abc", "batch_size='abc': expected an integer"),
        ("batch_size=0", "batch_size=0: expected an integer >= 1"),
        ("batch_size=2.5", "batch_size=2.5: expected an integer"),
        ("review_sd=-0.1", "review_sd=-0.1: expected a number >= 0.0"),
        ("frame_index=first", "frame_index='first': expected an integer"),
        ("+declared_keywords.perf=[x]", "declared_keywords: unknown class name"),
    ],
)
def test_typed_config_mistakes_name_the_key(scratch, tmp_path, override, message):
    from lung_cls.errors import ConfigError

    cfg = predict_cfg(
        f"ckpt={scratch['a']}", f"input={scratch['input']}", f"output={tmp_path}", override
    )
    with pytest.raises(UserError) as info:
        run(cfg)
    assert str(info.value).startswith(message)
    assert isinstance(info.value, ConfigError) == ("declared_keywords" not in override)
    assert not (tmp_path / "predictions.csv").exists()


def test_overlays_written_per_study(scratch, tmp_path):
    one = scratch["input"] / "day1" / "study05.dcm"
    out = tmp_path / "out"
    run(
        predict_cfg(
            f"ckpt=[{scratch['a']},{scratch['b']}]",
            f"input={one}",
            f"output={out}",
            "overlays=true",
        )
    )
    (row,) = read_rows(out)
    assert row["overlay"] == "overlays/study05.dcm.png"
    from PIL import Image

    with Image.open(out / row["overlay"]) as im:
        assert im.size[0] > 200 and im.size[1] > 150


def test_non_dicom_declared_from_folder(scratch, tmp_path):
    from lung_cls.data.phantom import simulate_cohort

    (case,) = simulate_cohort(SIM_EASY, 1, 0, 5)
    (tmp_path / "in" / "LUNG VENT").mkdir(parents=True)
    np.save(tmp_path / "in" / "LUNG VENT" / "x.npy", case.image)
    out = tmp_path / "out"
    run(
        predict_cfg(
            f"ckpt={scratch['a']}", f"input={tmp_path / 'in'}", f"output={out}", "review_band=null"
        )
    )
    (row,) = read_rows(out)
    assert row["declared"] == VENTILATION
    assert (row["status"] == "mismatch") == (row["predicted"] == PERFUSION)
    # A sidecar manifest wins over the folder name.
    (tmp_path / "declared.csv").write_text("path,declared\nin/LUNG VENT/x.npy,Tc-99m MAA\n")
    out2 = tmp_path / "out2"
    run(
        predict_cfg(
            f"ckpt={scratch['a']}", f"input={tmp_path / 'in'}", f"output={out2}",
            f"declared_manifest={tmp_path / 'declared.csv'}",
        )
    )  # fmt: skip
    (row,) = read_rows(out2)
    assert row["declared"] == PERFUSION and "manifest" in row["declared_evidence"]


@pytest.mark.slow  # subprocesses: interpreter + Lightning import each
def test_cli_clear_errors(scratch, tmp_path):
    (tmp_path / "empty").mkdir()
    res = run_cli(
        "lung_cls.predict", [f"ckpt={scratch['a']}", f"input={tmp_path / 'empty'}", f"output={tmp_path / 'o'}"],
        tmp_path,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no image files found" in lines[0] and "Traceback" not in res.stderr
    res = run_cli(
        "lung_cls.predict",
        [
            f"ckpt={tmp_path / 'missing.ckpt'}",
            f"input={scratch['input']}",
            f"output={tmp_path / 'o'}",
        ],
        tmp_path,
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.ckpt: checkpoint not found" in lines[0]
    assert "Traceback" not in res.stderr
    # No Hydra output folder or log file in the working directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# --------------------------------------------------------------------------------------------------
# Trained checkpoints: planted mislabels are caught (slow)
# --------------------------------------------------------------------------------------------------
# A small model in about a minute on two slow cores: the easy phantom at 64 px, no augmentation, and
# the checkpoint kept at the lowest validation loss (the best validation accuracy on 16 images ties
# early, at an epoch whose probabilities still hug 0.5). Such a model is right on most test images,
# not on all (its own metrics.json shows 75-90 % test accuracy, depending on the torch build), so the
# studies are written from test images that the run classified confidently and correctly.
TRAIN_EXTRA = (
    "data.sim.difficulty=0",
    "data.preprocess.size=64",
    "data.n_perfusion=40",
    "data.n_ventilation=40",
    "data.split.perfusion=[24,8,8]",
    "data.split.ventilation=[24,8,8]",
    "data.augment.enabled=false",
    "trainer.max_epochs=8",
    "callbacks.model_checkpoint.monitor=val/loss",
    "callbacks.model_checkpoint.mode=min",
    "cams=false",
)
# A test image counts as confidently classified beyond the review band's edges (0.2, 0.8) by a
# margin that numerical differences between the run's test loop and predict cannot cross.
CONFIDENT = 0.1


def confident_test_images(
    run_dir: Path, data_cfg
) -> dict[int, list[tuple[str, float, np.ndarray]]]:
    """Per class, the run's test images that it classified correctly with P(perfusion) beyond
    ``CONFIDENT`` of 0 or 1: (id, the run's P, raw pixels re-read from the same data config)."""
    from lung_cls.data.sources import load_studies
    from lung_cls.runs import read_predictions

    test = read_predictions(run_dir, split="test")
    studies = {s.id: s for s in load_studies(data_cfg)[0]}
    out: dict[int, list[tuple[str, float, np.ndarray]]] = {0: [], 1: []}
    for sid, label, p in zip(test["id"], test["label"], test["prob_perfusion"], strict=True):
        if (label == 1 and p >= 1 - CONFIDENT) or (label == 0 and p <= CONFIDENT):
            out[int(label)].append((sid, float(p), studies[sid].pixels))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from lung_cls.train import train

    base = tmp_path_factory.mktemp("trained")
    run_dir = base / "seed0"
    cfg = compose(tiny_overrides(run_dir, "seed=0", *TRAIN_EXTRA))
    train(cfg)
    confident = confident_test_images(run_dir / "run", cfg.data)
    # Not a skip: a run that is confident on no test image of a class did not train at all.
    assert confident[0] and confident[1], (
        f"the tiny run is confident and right on {len(confident[1])} perfusion and "
        f"{len(confident[0])} ventilation test images; it needs one of each "
        f"(see {run_dir / 'run' / 'metrics.json'})"
    )
    truth = write_plan(base / "studies", {k: [c[2] for c in v] for k, v in confident.items()})
    for t in truth.values():
        t["id"], t["train_prob"], _ = confident[t["label"]][t["image"]]
    return {
        "ckpt": run_dir / "run" / "checkpoints" / "best.ckpt",
        "run_dir": run_dir / "run",
        "input": base / "studies",
        "truth": truth,
    }


@pytest.mark.slow
def test_every_planted_mismatch_is_flagged(trained, tmp_path):
    out = tmp_path / "out"
    code = run(
        predict_cfg(f"ckpt={trained['run_dir']}", f"input={trained['input']}", f"output={out}")
    )
    assert code == 0
    rows = {Path(r["file"]).name: r for r in read_rows(out)}
    assert set(rows) == set(trained["truth"]) | set(CORRUPT) | {"notes.txt"}  # one row per file
    data = json.loads((out / "predictions.json").read_text())
    assert data["models"][0]["path"] == str(trained["ckpt"])
    assert data["image_size"] == 64
    # Predict pre-processes each study file on its own exactly as training did: it reproduces the
    # probability the training run's test loop gave the same image (to float noise, for images
    # centred by their lung centroids; the NMI fallback's target differs between the two).
    for name, t in trained["truth"].items():
        assert rows[name]["preprocessing"] in ("centroid", "nmi"), rows[name]
        tol = 1e-5 if rows[name]["preprocessing"] == "centroid" else CONFIDENT / 2
        assert float(rows[name]["prob_perfusion"]) == pytest.approx(t["train_prob"], abs=tol), (
            name,
            t,
        )
    # The logic, on every study: a mismatch is exactly a confident prediction against a known
    # declared class.
    for name, r in rows.items():
        if r["status"].startswith(("error", "rejected")):
            continue
        p = float(r["prob_perfusion"])
        confident = not (0.2 <= p <= 0.8)
        pred = PERFUSION if p >= 0.5 else VENTILATION
        expect = confident and r["declared"] in (PERFUSION, VENTILATION) and r["declared"] != pred
        assert (r["status"] == "mismatch") == expect, (name, r)
    # Every planted mislabel is caught, with the image's true class ...
    planted = [n for n, t in trained["truth"].items() if t["planted"]]
    assert len(planted) == 4
    for name in planted:
        assert rows[name]["status"] == "mismatch", rows[name]
        assert rows[name]["predicted"] == (
            PERFUSION if trained["truth"][name]["label"] else VENTILATION
        )
    # ... and the correctly labelled studies are not flagged.
    for name, t in trained["truth"].items():
        if not t["planted"]:
            assert rows[name]["status"] != "mismatch", rows[name]
    assert rows["study04.dcm"]["declared"] == UNKNOWN
    assert rows["study04.dcm"]["status"] == "ok"
    assert rows["study08.dcm"]["declared"] == AMBIGUOUS
    assert rows["study08.dcm"]["status"] == "review"


@pytest.mark.slow
def test_cli_fail_on_mismatch_exit_code(trained, tmp_path):
    # The checkpoint sits where a sweep puts it: the run dir's name holds "=" and ",", and the
    # path is typed as it is, unquoted, as in the README.
    ckpt = tmp_path / "sweep" / "model=resnet18,seed=0" / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    shutil.copyfile(trained["ckpt"], ckpt)
    res = run_cli(
        "lung_cls.predict",
        [
            f"ckpt={ckpt}",
            f"input={trained['input']}",
            f"output={tmp_path / 'o'}",
            "fail_on_mismatch=true",
        ],  # fmt: skip
        tmp_path,
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert "mismatch" in res.stdout
    assert (tmp_path / "o" / "predictions.csv").is_file()  # outputs are written before exiting
    data = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert [m["path"] for m in data["models"]] == [str(ckpt)]


@pytest.mark.slow
def test_onnx_backend_gives_the_same_classes(trained, tmp_path):
    from lung_cls.export import export_checkpoint

    export_checkpoint(trained["ckpt"], tmp_path / "onnx")
    common = [f"input={trained['input']}"]
    run(predict_cfg(f"ckpt={trained['ckpt']}", *common, f"output={tmp_path / 'pt'}"))
    # backend=auto picks onnx when onnx= is given.
    run(
        predict_cfg(
            f"onnx={tmp_path / 'onnx'}", *common, f"output={tmp_path / 'ort'}", "overlays=true"
        )
    )
    pt = {r["file"]: r for r in read_rows(tmp_path / "pt")}
    ort = {r["file"]: r for r in read_rows(tmp_path / "ort")}
    assert set(pt) == set(ort)
    for f, r in pt.items():
        assert ort[f]["status"] == r["status"]
        assert ort[f]["predicted"] == r["predicted"]
        if r["prob_perfusion"]:
            assert float(ort[f]["prob_perfusion"]) == pytest.approx(
                float(r["prob_perfusion"]), abs=1e-4
            )
        assert ort[f]["overlay"] == ""  # CAM overlays need the torch backend
    assert not (tmp_path / "ort" / "overlays").exists()
