"""Every experiment and every model config composes and trains for one tiny step.

In the spirit of lightning-hydra-template's ``tests/test_sweeps.py`` (``experiment=glob(*)`` with
``fast_dev_run``): the configs are found by glob, so a new ``conf/experiment/*.yaml`` or
``conf/model/*.yaml`` is covered without touching this file. Tiny phantom, scratch weights, CPU,
the smallest image each backbone accepts; the run goes through ``lung_cls.training.run``, so the
run dir it leaves must be complete. The three big paper backbones (~50-140 M parameters, seconds
just to build on two cores) are marked slow.
"""

from __future__ import annotations

import pytest
from conftest import CONF, compose

from lung_cls.runs import RunFile, Status, read_cams, read_metrics, run_file, run_status
from lung_cls.training import run

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if not p.stem.startswith("_"))
HEAVY = {"vgg16", "inception_resnet_v2", "seresnext101"}
# Smallest input a backbone's stem accepts where that is more than 32 px (the CAM layer of all of
# them is at 1/32, so 32 px leaves a 1 x 1 map: enough to run Grad-CAM end to end).
MIN_SIZE = {"inception_resnet_v2": 75}

# A run small enough for one step: debug=fdr (the project's fast_dev_run config: CPU, one
# device, csv logger), 50 phantom images, a fixed split, scratch weights.
TINY = [
    "debug=fdr",
    "data.n_perfusion=30",
    "data.n_ventilation=20",
    "data.split.perfusion=[20,5,5]",
    "data.split.ventilation=[10,5,5]",
    "data.batch_size=8",
    "model.pretrained=false",
    "n_boot=20",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # one phantom cohort per image size, shared


def _one_step(tmp_path, cache, *overrides: str) -> dict:
    run_dir = tmp_path / "run"
    cfg = compose([*overrides, *TINY, f"paths.output_dir={run_dir}", f"paths.cache_dir={cache}"])
    run(cfg)
    metrics = read_metrics(run_dir)
    assert run_status(run_dir) == Status.OK, (metrics or {}).get("error")
    cams = read_cams(run_dir)
    size = int(cfg.data.preprocess.size)
    assert cams["cams"].shape[1:] == (size, size) and len(cams["ids"]) > 0
    assert run_file(run_dir, RunFile.PREDICTIONS).is_file()
    assert run_file(run_dir, RunFile.CONFIG).is_file()
    return metrics


def test_the_globs_find_the_configs():
    # Guards the globs themselves: an empty parametrisation would pass without testing anything.
    assert {"demo", "paper"} <= set(EXPERIMENTS)
    assert {"vgg16", "resnet18", "inception_resnet_v2", "seresnext101", "timm"} <= set(MODELS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_sweeps_known_models_and_trains_one_step(tmp_path, cache, experiment):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        full = hydra_compose(
            "train", overrides=[f"experiment={experiment}"], return_hydra_config=True
        )
    swept = full.hydra.sweeper.params or {}
    for name in str(swept.get("model", "")).split(","):
        if name:
            assert name in MODELS, f"experiment={experiment} sweeps model={name}: no such config"
    metrics = _one_step(tmp_path, cache, f"experiment={experiment}", "data.preprocess.size=32")
    assert metrics["model"] == str(compose([f"experiment={experiment}"]).model.name)


@pytest.mark.parametrize(
    "model",
    [pytest.param(m, marks=pytest.mark.slow) if m in HEAVY else m for m in MODELS],
)
def test_model_trains_one_step_from_scratch(tmp_path, cache, model):
    size = MIN_SIZE.get(model, 32)
    metrics = _one_step(tmp_path, cache, f"model={model}", f"data.preprocess.size={size}")
    cfg = compose([f"model={model}"])
    assert metrics["backbone"] == str(cfg.model.backbone) and metrics["pretrained"] is False
    assert metrics["image_size"] == size
