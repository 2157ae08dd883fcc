"""The ensemble and the batch runner with stand-in members (no network): averaging, agreement,
and one row per study whichever way it arrives (a folder, one file, one image in memory)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from qa_helpers import SIM_EASY, make_study_dir, save_scratch_checkpoint

from lung_cls.data.preprocess import prep_config
from lung_cls.errors import UserError
from lung_cls.qa.backends import Ensemble
from lung_cls.qa.batch import (
    PredictOptions,
    check_dataset,
    check_file,
    check_image,
    predict_files,
)
from lung_cls.qa.declared import dataset_texts
from lung_cls.qa.inputs import find_inputs
from lung_cls.qa.output import COLUMNS

SIZE = 32


@dataclass
class Member:
    """A stand-in for a model: P(perfusion) from the image's mean grey level, so that different
    images get different probabilities, and a CAM that is the image itself."""

    backend: ClassVar[str] = "fake"
    can_cam: ClassVar[bool] = True
    gain: float = 1.0
    info: dict[str, Any] = field(default_factory=lambda: {"path": "fake.ckpt"})
    prep: dict[str, Any] = field(default_factory=lambda: prep_config({"size": SIZE}))
    reference: np.ndarray | None = None
    calls: list[int] = field(default_factory=list)

    def probs(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        assert x.dtype == np.float32 and x.shape[1:] == (1, SIZE, SIZE)
        assert 0.0 <= x.min() and x.max() <= 1.0
        self.calls.append(len(x))
        z = self.gain * (x.mean(axis=(1, 2, 3)) * 40.0 - 6.0)
        return 1.0 / (1.0 + np.exp(-z.astype(np.float64)))

    def cams(self, images: np.ndarray, targets, batch_size: int) -> np.ndarray:
        return images.astype(np.float32) / 255.0 * self.gain


class NoCamMember(Member):
    can_cam: ClassVar[bool] = False


def test_ensemble_averages_members_and_their_cams():
    a, b = Member(gain=1.0), Member(gain=2.0)
    ens = Ensemble.of([a, b])
    images = np.random.default_rng(0).integers(0, 60, (5, SIZE, SIZE)).astype(np.uint8)
    probs = ens.member_probs(images, batch_size=2)
    x = images.astype(np.float32)[:, None] / 255.0
    np.testing.assert_array_equal(probs, np.stack([a.probs(x, 2), b.probs(x, 2)]))
    assert probs.shape == (2, 5) and not np.allclose(probs[0], probs[1])
    np.testing.assert_allclose(ens.cams(images, [1] * 5), images / 255.0 * 1.5, rtol=1e-6)
    assert ens.backend == "fake" and ens.size == SIZE and ens.can_cam
    assert [m["path"] for m in ens.members] == ["fake.ckpt", "fake.ckpt"]
    mixed = Ensemble.of([a, NoCamMember()])
    assert not mixed.can_cam
    with pytest.raises(RuntimeError, match="CAM needs the torch backend"):
        mixed.cams(images, [1] * 5)


def test_ensemble_members_must_preprocess_alike_and_references_are_averaged():
    other = Member(prep=prep_config({"size": 40}), info={"path": "b.ckpt"})
    with pytest.raises(UserError, match="b.ckpt: pre-processing differs from fake.ckpt"):
        Ensemble.of([Member(), other])
    with pytest.raises(UserError, match="no model"):
        Ensemble.of([])
    ref = np.full((SIZE, SIZE), 100.0, np.float32)
    ens = Ensemble.of([Member(reference=ref), Member(reference=ref + 2), Member()])
    np.testing.assert_array_equal(ens.reference, ref + 1)
    # A reference of the wrong size is not used.
    assert Ensemble.of([Member(reference=np.zeros((8, 8)))]).reference is None


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    truth = make_study_dir(root / "in", SIM_EASY)
    return root / "in", truth


def _comparable(row: dict) -> dict:
    return {k: row[k] for k in COLUMNS if k not in ("file", "overlay")}


def test_rows_do_not_depend_on_the_chunk_size(studies):
    root, truth = studies
    files, errors, root = find_inputs(root)
    member = Member()
    ens = Ensemble.of([member])
    one = predict_files(ens, files, root, PredictOptions(batch_size=1), errors)
    member.calls.clear()
    many = predict_files(ens, files, root, PredictOptions(batch_size=4), errors)
    assert member.calls == [4, 4, 2]  # 10 readable studies in chunks of 4; broken files skip
    assert one == many
    assert len(one) == len(truth) + 2
    assert {r["status"].split(":")[0] for r in one} >= {"ok", "error"}


def test_one_file_and_one_image_in_memory_give_the_folder_run_rows(studies, tmp_path):
    import pydicom

    from lung_cls.data.sources import read_image

    root, truth = studies
    files, errors, root = find_inputs(root)
    ens = Ensemble.of([Member(), Member(gain=1.5)])
    opts = PredictOptions(review_sd=0.02, overlays_dir=tmp_path / "overlays")
    rows = {Path(r["file"]).name: r for r in predict_files(ens, files, root, opts, errors)}
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == [
        f"day1__{n}.png" for n in sorted(truth)
    ]
    for name in truth:
        path = root / "day1" / name
        by_file = check_file(ens, path, root, PredictOptions(review_sd=0.02))
        assert _comparable(by_file) == _comparable(rows[name])
        pixels, _ = read_image(path)
        ds = pydicom.dcmread(path)
        header = dataset_texts(ds)
        opts1 = PredictOptions(review_sd=0.02)
        in_memory = check_image(ens, pixels, header, f"node/{name}", opts1, dataset=ds)
        assert in_memory["file"] == f"node/{name}"
        assert _comparable(in_memory) == _comparable(rows[name])
        assert _comparable(check_dataset(ens, ds, f"node/{name}", opts1)) == _comparable(rows[name])
        # Without the Dataset the header gate cannot run (no header columns): the image gate and
        # the model decide alone, and here they decide alike.
        bare = check_image(ens, pixels, header, f"node/{name}", opts1)
        assert bare["modality"] is None and bare["view"] is None
        assert bare["status"] == rows[name]["status"]
    # Broken input in memory is an error row, never an exception.
    flat = check_image(ens, np.ones((64, 64)), {"series_description": "LUNG VENT"}, "flat")
    assert flat["status"].startswith("error: constant image") and flat["declared"] == "ventilation"
    assert flat["prob_perfusion"] is None


def test_studies_of_the_models_own_training_split_are_marked_and_warned(studies):
    from lung_cls.data.sources import pixel_hash, read_image
    from lung_cls.qa.settings import model_warnings

    root, truth = studies
    files, errors, root = find_inputs(root)
    first = sorted(truth)[0]
    train_hash = pixel_hash(read_image(root / "day1" / first)[0])
    uid = str(pydicom_uid(root / "day1" / sorted(truth)[1]))
    member = Member()
    member.ood = {"train": {"pixel_hashes": [train_hash]}, "val": {"sop_instance_uids": [uid]}}
    ens = Ensemble.of([member])
    assert not ens.has_ood  # identities only, no fitted spaces: no OOD score
    rows = {Path(r["file"]).name: r for r in predict_files(ens, files, root, PredictOptions())}
    assert rows[first]["training_split"] == "train"
    assert rows[sorted(truth)[1]]["training_split"] == "val"
    assert all(rows[n]["training_split"] is None for n in sorted(truth)[2:])
    text = " ".join(model_warnings(ens, list(rows.values())))
    assert "1 input stud(y/ies) are in the model's own training split" in text
    assert "validation split" in text and "below the paper's 224 px" in text


def pydicom_uid(path):
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


def test_stored_temperature_scales_the_probabilities_the_qa_tool_reports(tmp_path) -> None:
    """A checkpoint fitted with temperature_scaling=true carries T; the QA member divides the logit
    by it (review band and P(perfusion) then mean what they say); without T nothing changes."""
    import torch

    from lung_cls.evaluation.calibration import scale_probs
    from lung_cls.qa.backends import TorchMember, calibrated

    plain = save_scratch_checkpoint(tmp_path / "plain.ckpt", size=32)
    ckpt = torch.load(plain, map_location="cpu", weights_only=True)
    ckpt["temperature"] = 2.5
    hot = tmp_path / "hot.ckpt"
    torch.save(ckpt, hot)

    x = np.random.default_rng(0).random((4, 1, 32, 32)).astype(np.float32)
    a, b = TorchMember.load(plain), TorchMember.load(hot)
    assert a.temperature is None and b.temperature == 2.5 and b.info["temperature"] == 2.5
    p_plain, p_hot = a.probs(x, 2), b.probs(x, 2)
    np.testing.assert_allclose(p_hot, scale_probs(p_plain, 2.5), rtol=1e-9)
    # T > 1 pulls every probability towards 0.5, ranking kept.
    assert np.all(np.abs(p_hot - 0.5) <= np.abs(p_plain - 0.5) + 1e-12)
    assert np.array_equal(np.argsort(p_hot), np.argsort(p_plain))
    assert calibrated(p_plain, None) is p_plain and calibrated(p_plain, 1.0) is p_plain
