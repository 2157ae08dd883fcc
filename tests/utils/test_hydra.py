"""Hydra glue (lung_cls/utils/hydra.py): run-dir paths typed as they are, sweep dir names."""

from __future__ import annotations

import pytest


def test_quote_path_overrides_only_touches_values_hydra_cannot_read():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from lung_cls.utils.hydra import quote_path_overrides

    run = "outputs/demo/2026-11-28_17-38-47/model=resnet18,seed=0/checkpoints/best.ckpt"
    kept = [
        "-m", "model=resnet18,vgg16", "seed=0,1", "hydra/launcher=parallel", "+x.y=1",
        "data.root=/a,/b", "ckpt=['a=1','b=2']", "x=interval(start=0,end=1)", "ckpt='a=b'",
        "ckpt=\"a=b\"", "not an override",
    ]  # fmt: skip
    assert quote_path_overrides(kept) == kept
    args = [f"ckpt={run}", f"+ckpt_path={run}", "ckpt=outputs/*/model=resnet18,*/best.ckpt",
            "ckpt=it's/model=a,seed=0"]  # fmt: skip
    quoted = quote_path_overrides(args)
    assert quoted[0] == f"ckpt='{run}'" and quoted[1] == f"+ckpt_path='{run}'"
    assert quoted[3] == 'ckpt="it\'s/model=a,seed=0"'
    # Hydra reads each quoted value back as the literal path; unquoted, it cannot parse them.
    parser = OverridesParser.create()
    for arg, q in zip(args, quoted, strict=True):
        with pytest.raises(OverrideParseException):
            parser.parse_overrides([arg])
        assert parser.parse_overrides([q])[0].value() == arg.partition("=")[2]


def test_sweep_dir_names_leave_out_paths_and_launch_flags():
    from lung_cls.utils.hydra import sweep_subdir

    name = sweep_subdir(
        [
            "seed=0",
            "model=resnet18",
            "paths.cache_dir=/tmp/c",
            "hydra/launcher=parallel",
            "skip_completed=true",
            "resumable=true",
            "resume=true",
            "trainer.max_epochs=5",
            "model.backbone=a/b",
        ]
    )
    assert name == "model=resnet18,model.backbone=a_b,seed=0,trainer.max_epochs=5"
    assert sweep_subdir([]) == "default"
