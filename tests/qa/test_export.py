"""ONNX export: ONNX Runtime reproduces PyTorch within 1e-4, the sidecar carries what predict needs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from qa_helpers import run_cli, save_scratch_checkpoint

from lung_cls.errors import ParityError, UserError
from lung_cls.export import (
    check_parity,
    export_checkpoint,
    file_sha256,
    load_onnx_model,
)
from lung_cls.models.classifier import load_lung_net, predict_probs

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    ckpt = save_scratch_checkpoint(base / "run" / "checkpoints" / "best.ckpt", size=32, seed=3)
    sidecar = export_checkpoint(base / "run", base / "onnx")  # a run dir resolves to best.ckpt
    return {"ckpt": ckpt, "out": base / "onnx", "sidecar": sidecar}


def test_export_writes_model_sidecar_and_reference(exported):
    out, side = exported["out"], exported["sidecar"]
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.onnx", "reference.npy"]
    on_disk = json.loads((out / "model.json").read_text())
    assert on_disk == json.loads(json.dumps(side))
    assert side["class_names"] == ["ventilation", "perfusion"]
    assert side["input"]["name"] == "image" and side["input"]["shape"] == ["batch", 1, 32, 32]
    assert side["image_size"] == 32 and side["preprocess"]["size"] == 32
    assert side["preprocess"]["threshold"] == 30  # defaults filled in: the whole truth is stored
    assert side["checkpoint"]["sha256"] == file_sha256(exported["ckpt"])
    assert side["onnx_sha256"] == file_sha256(out / "model.onnx")
    assert side["parity"]["max_abs_diff"]["logits"] <= 1e-4
    _, meta = load_lung_net(str(exported["ckpt"]))
    np.testing.assert_array_equal(np.load(out / "reference.npy"), meta["reference_image"])


def test_onnx_matches_pytorch_within_1e4(exported):
    session, sidecar, reference = load_onnx_model(exported["out"])
    net, _ = load_lung_net(str(exported["ckpt"]))
    g = torch.Generator().manual_seed(11)
    for n in (1, 5):  # the batch axis is dynamic
        x = torch.rand(n, 1, 32, 32, generator=g)
        logits_o, prob_o = session.run(["logits", "prob_perfusion"], {"image": x.numpy()})
        with torch.no_grad():
            logits_t = net(x)
        np.testing.assert_allclose(logits_o, logits_t.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(prob_o, predict_probs(net, x).numpy(), atol=1e-4, rtol=0)
    assert reference is not None and reference.shape == (32, 32)
    # The image gate's features come out of the same graph, equal to PyTorch's.
    from lung_cls.qa.ood import net_features

    x = torch.rand(3, 1, 32, 32, generator=g)
    (feats,) = session.run(["features"], {"image": x.numpy()})
    np.testing.assert_allclose(feats, net_features(net, x), atol=1e-4, rtol=0)
    assert sidecar["ood"] is None  # a scratch checkpoint without a reference: none travels


def test_the_ood_reference_travels_in_model_json(tmp_path):
    from lung_cls.qa.backends import OnnxMember
    from lung_cls.qa.ood import REFERENCE_KEY, build_reference, to_storable

    ckpt = save_scratch_checkpoint(tmp_path / "best.ckpt", size=32)
    rng = np.random.default_rng(0)
    make = lambda n: {"features": rng.normal(size=(n, 512)), "pixels": rng.random((n, 1024))}  # noqa: E731
    state = torch.load(ckpt, weights_only=True)
    state[REFERENCE_KEY] = to_storable(build_reference(make(40), make(10)))
    torch.save(state, ckpt)
    export_checkpoint(ckpt, tmp_path / "onnx")
    member = OnnxMember.load(tmp_path / "onnx")
    assert member.ood["n_train"] == 40 and set(member.ood["spaces"]) == {"features", "pixels"}
    x = np.random.default_rng(1).random((2, 1, 32, 32)).astype(np.float32)
    assert member.features(x, 2).shape == (2, 512)


def test_parity_check_fails_loudly(exported):
    net, _ = load_lung_net(str(exported["ckpt"]))
    with torch.no_grad():
        net.net.get_classifier().bias.add_(0.5)  # PyTorch now differs from the exported graph
    with pytest.raises(ParityError, match="differs from PyTorch"):
        check_parity(net, exported["out"] / "model.onnx", 32)


def test_failed_parity_leaves_nothing_behind(exported, tmp_path):
    # atol=0: float noise alone (measured ~1e-7 on the logits) fails the check.
    out = tmp_path / "out"
    with pytest.raises(ParityError, match="export failed its parity check: .*differs from PyTorch"):
        export_checkpoint(exported["ckpt"], out, atol=0.0)
    assert list(out.iterdir()) == []  # no model, no sidecar, no reference, no temporary file


def test_refuses_overwrite_and_detects_a_foreign_sidecar(exported, tmp_path):
    with pytest.raises(UserError, match="already exists"):
        export_checkpoint(exported["ckpt"], exported["out"])
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "model.onnx").write_bytes((exported["out"] / "model.onnx").read_bytes())
    side = json.loads((exported["out"] / "model.json").read_text())
    side["onnx_sha256"] = "0" * 64
    side["reference_image"] = None
    (copy / "model.json").write_text(json.dumps(side))
    with pytest.raises(UserError, match="does not match its sidecar"):
        load_onnx_model(copy)
    with pytest.raises(UserError, match="ONNX model not found"):
        load_onnx_model(tmp_path / "nothing")


@pytest.mark.slow  # subprocesses: interpreter + Lightning import each
def test_export_cli(exported, tmp_path):
    res = run_cli(
        "lung_cls.export", [f"ckpt={exported['ckpt']}", f"output={tmp_path / 'o'}"], tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert "max |diff|" in res.stdout
    assert (tmp_path / "o" / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # nothing else in the cwd
    res = run_cli(
        "lung_cls.export", [f"ckpt={tmp_path / 'none.ckpt'}", f"output={tmp_path / 'o2'}"], tmp_path
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'none.ckpt'}: checkpoint not found"
    ]
    # A failed parity check is not bad input: exit 1, one line, nothing exported.
    res = run_cli(
        "lung_cls.export", [f"ckpt={exported['ckpt']}", f"output={tmp_path / 'o3'}", "atol=0"],
        tmp_path,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: export failed its parity check: ")
    assert not (tmp_path / "o3" / "model.onnx").exists()
    # A typed mistake names its key.
    res = run_cli(
        "lung_cls.export", [f"ckpt={exported['ckpt']}", f"output={tmp_path / 'o4'}", "opset=new"],
        tmp_path,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["error: opset='new': expected an integer"]
