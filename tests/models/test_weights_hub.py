"""Pretrained weights: local copies first, then the hub (a local HTTP server via HF_ENDPOINT), and
one message naming every model that has none. No internet is used: the server runs on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest
import torch

from lung_cls.errors import WeightsNotFoundError
from lung_cls.models.backbone import create_backbone
from lung_cls.utils import weights
from lung_cls.utils.weights import check_pretrained, find_local_weights

TINY = "test_resnet.r160_in1k"  # timm's test network: 0.47 M parameters, a ~2 MB weights file
REPO = "timm/test_resnet.r160_in1k"


class _Hub(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    requests: list[str] = []

    def _answer(self, body: bool) -> None:
        type(self).requests.append(f"{self.command} {self.path}")
        if self.path.startswith("/api/models"):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = self.files.get(self.path)
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's names
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)

    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture
def weights_file(tmp_path):
    """A weights file of the tiny network, with recognisable values, as the hub would serve it."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model(TINY, pretrained=False)
    with torch.no_grad():  # far from any fresh initialisation
        for param in net.parameters():
            param.add_(0.5)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    return path, state


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    hub_cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hub_cache), raising=False)
    return hub_cache


@pytest.fixture
def hub(weights_file, empty_caches, monkeypatch):
    """A local 'hub' serving the tiny network's weights; downloads allowed."""
    import huggingface_hub.constants as hc

    path, _ = weights_file
    _Hub.files = {f"/{REPO}/resolve/main/model.safetensors": path.read_bytes()}
    _Hub.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False, raising=False)
    try:
        yield _Hub
    finally:
        server.shutdown()
        server.server_close()


def test_missing_weights_come_from_the_hub_once_then_from_the_cache(hub, weights_file):
    _, state = weights_file
    assert find_local_weights(TINY, None) is None
    check_pretrained({"tiny": (TINY, None)})
    downloads = [r for r in hub.requests if r.startswith("GET") and "resolve" in r]
    assert downloads == [f"GET /{REPO}/resolve/main/model.safetensors"]
    path, origin = find_local_weights(TINY, None)
    assert origin == "hf-cache"
    # The job reads the downloaded copy; every backbone tensor is the served one (the head is new).
    net, origin = create_backbone(TINY, pretrained=True, num_classes=2)
    assert origin == f"hf-cache:{path}"
    head = {f"{net.default_cfg['classifier']}.weight", f"{net.default_cfg['classifier']}.bias"}
    compared = 0
    for key, value in net.state_dict().items():
        if key not in head:
            assert torch.equal(value, state[key]), key
            compared += 1
    assert compared > 10
    # A second check finds it locally and asks the hub nothing.
    hub.requests.clear()
    check_pretrained({"tiny": (TINY, None)})
    assert hub.requests == []


def test_hf_hub_offline_asks_the_hub_nothing(hub, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(WeightsNotFoundError, match=r"downloads are off \(HF_HUB_OFFLINE=1\)"):
        check_pretrained({"tiny": (TINY, None)})
    assert hub.requests == []


def test_config_switch_turns_downloads_off(hub):
    with pytest.raises(WeightsNotFoundError, match=r"download_weights=false"):
        check_pretrained({"tiny": (TINY, None)}, download=False)
    assert hub.requests == []


def test_unreachable_hub_is_one_quick_message(empty_caches, monkeypatch):
    import socket

    import huggingface_hub.constants as hc

    with socket.socket() as s:  # a port on which nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False, raising=False)
    with pytest.raises(WeightsNotFoundError) as err:
        check_pretrained({"a": (TINY, None), "b": ("resnet18.tv_in1k", None)})
    msg = str(err.value)
    assert "could not be reached" in msg and f"127.0.0.1:{port}" in msg
    assert "2 models: a (timm/test_resnet.r160_in1k), b (timm/resnet18.tv_in1k)" in msg


def test_one_message_names_every_model_and_offers_no_single_file_for_a_sweep(empty_caches):
    models = {
        "vgg16": ("vgg16.tv_in1k", None),
        "resnet18": ("resnet18.tv_in1k", None),
        "inception_resnet_v2": ("inception_resnet_v2.tf_in1k", None),
        "seresnext101": ("seresnext101_32x4d.gluon_in1k", None),
    }
    with pytest.raises(WeightsNotFoundError) as err:
        check_pretrained(models, download=False)
    msg = str(err.value)
    first = msg.splitlines()[0]
    for name in models:
        assert name in first
    assert "model.weights=" not in msg  # one file cannot serve four models
    assert "hf download timm/vgg16.tv_in1k" in msg and "huggingface-cli" not in msg
    assert "model.pretrained=false" in msg
    # One model: a local file is a way out, and is named.
    with pytest.raises(WeightsNotFoundError, match=r"model\.weights=/path/to/resnet18"):
        check_pretrained({"resnet18": ("resnet18.tv_in1k", None)}, download=False)


def test_a_given_file_is_used_and_never_downloaded(weights_file, empty_caches, monkeypatch):
    path, _ = weights_file

    def no_download(*a, **k):
        raise AssertionError("must not download")

    monkeypatch.setattr(weights, "download_weights", no_download)
    check_pretrained({"tiny": (TINY, str(path))})
    assert find_local_weights(TINY, str(path)) == (str(path), "file")
    with pytest.raises(WeightsNotFoundError, match="points to no file"):
        check_pretrained({"tiny": (TINY, str(path) + ".missing")})
