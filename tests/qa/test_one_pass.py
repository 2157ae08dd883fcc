"""The image gate's features and the probabilities come from one pass through the backbone
(`Ensemble.probs_and_ood`), torch and ONNX: the same numbers as the two separate calls, and the
backbone runs once per batch, not twice."""

from __future__ import annotations

import numpy as np
import pytest
from qa_helpers import save_scratch_checkpoint

from lung_cls.qa.backends import Ensemble, OnnxMember, TorchMember
from lung_cls.qa.ood import build_reference, pixel_vectors

SIZE = 32


def images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(10, 22, 2)
        blob = 200 * np.exp(-(((yy - cy) / 6) ** 2 + ((xx - cx) / 4) ** 2))
        out.append(np.clip(blob + rng.normal(0, 8, blob.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


def with_reference(member):
    """Give ``member`` an OOD reference fitted on its own features, as training does."""
    fit = images(24, 1)
    x = fit.astype(np.float32)[:, None] / 255.0
    feats = member.features(x, 8)
    member.ood = build_reference(
        {"features": feats[:16], "pixels": pixel_vectors(fit[:16])},
        {"features": feats[16:], "pixels": pixel_vectors(fit[16:])},
    )
    return member


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_scratch_checkpoint(tmp_path_factory.mktemp("m") / "m.ckpt", size=SIZE)


class Counting:
    """Counts calls of a wrapped callable (the backbone's first layer, an ONNX session's run)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **kw):
        self.calls += 1
        return self.fn(*a, **kw)


def test_torch_member_one_pass_equals_the_two_calls_and_runs_the_backbone_once(ckpt):
    member = with_reference(TorchMember.load(ckpt))
    ens = Ensemble.of([member])
    imgs = images(10, 2)
    x = imgs.astype(np.float32)[:, None] / 255.0
    p, f = member.probs_features(x, 4)
    np.testing.assert_allclose(p, member.probs(x, 4), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(f, member.features(x, 4), rtol=1e-5, atol=1e-6)

    first = member.net.net.conv1  # resnet18's stem: one call per backbone pass
    calls = []
    hook = first.register_forward_hook(lambda *a: calls.append(1))
    try:
        probs, ood = ens.probs_and_ood(imgs, batch_size=4)
        fused_calls = len(calls)
        calls.clear()
        want_p, want_o = ens.member_probs(imgs, 4), ens.ood_scores(imgs, 4)
        separate_calls = len(calls)
    finally:
        hook.remove()
    np.testing.assert_allclose(probs, want_p, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ood, want_o, rtol=1e-4, atol=1e-5)
    assert (fused_calls, separate_calls) == (3, 6)  # 10 images in batches of 4
    assert ens.probs_and_ood(imgs, 4, gate=False)[1] is None


def test_onnx_member_one_pass_equals_the_two_calls_and_runs_the_session_once(ckpt, tmp_path):
    pytest.importorskip("onnxruntime")
    from lung_cls.qa.onnx import export_checkpoint

    export_checkpoint(ckpt, tmp_path / "onnx")
    member = with_reference(OnnxMember.load(tmp_path / "onnx"))
    ens = Ensemble.of([member])
    imgs = images(10, 3)
    real_session = member.session

    class Session:
        run = Counting(real_session.run)

        def get_outputs(self):
            return real_session.get_outputs()

    member.session = Session()
    probs, ood = ens.probs_and_ood(imgs, batch_size=4)
    fused = Session.run.calls
    want_p, want_o = ens.member_probs(imgs, 4), ens.ood_scores(imgs, 4)
    assert (fused, Session.run.calls - fused) == (3, 6)
    np.testing.assert_allclose(probs, want_p, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ood, want_o, rtol=1e-4, atol=1e-5)
