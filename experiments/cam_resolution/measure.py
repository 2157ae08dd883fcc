"""Which Grad-CAM layer resolves the phantom's neck? One trained run dir, several CAM layers.

    python experiments/cam_resolution/measure.py RUN_DIR [--layers layer2 layer3 layer4]
        [--dilate 2] [--cam gradcam]

Reads the run dir's ``checkpoints/best.ckpt`` and ``cams.npz`` (its test images and truth masks),
recomputes Grad-CAM of the true class at each layer and prints, on the neck-positive ventilation
test images (trachea mask non-empty): the CAM map size, the energy share inside the dilated
trachea/oropharynx/oesophagus union over its area share (the ratio; >= 2 is the issue's bar) and
the share of images whose CAM maximum lies inside that union (pointing game; >= 0.5 wanted).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lung_cls.evaluation import groundtruth as gt  # noqa: E402
from lung_cls.evaluation.cam import cam_map_size, compute_gradcam, resolve_cam_layer  # noqa: E402
from lung_cls.qa.checkpoints import load_checkpoint  # noqa: E402
from lung_cls.runs import RunFile, masks_of, read_cams, run_file  # noqa: E402

NECK = ("trachea", "oropharynx", "esophagus")


def neck_scores(cams: np.ndarray, labels: np.ndarray, masks: dict, dilate: float) -> dict:
    """Energy ratio and pointing hit rate on the neck-positive ventilation images."""
    sel = (labels == 0) & masks["trachea"].any(axis=(1, 2))
    union = np.zeros_like(masks["trachea"][sel])
    for name in NECK:
        if name in masks:
            union |= masks[name][sel]
    union = np.stack([gt._dilate(m, dilate) for m in union])
    c = cams[sel].astype(np.float64)
    energy = np.nanmean(gt.cam_energy_fraction(c, union))
    chance = np.nanmean(gt.chance_level(union))
    hits = np.nanmean(gt.pointing_game(c, union))
    return {"n": int(sel.sum()), "energy": energy, "chance": chance, "hit": hits}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--layers", nargs="+", default=None)
    ap.add_argument("--dilate", type=float, default=2.0)
    ap.add_argument("--methods", nargs="+", default=["gradcam"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run_dir)
    arrays = read_cams(run)
    masks = masks_of(arrays)
    labels = arrays["labels"]
    x = torch.from_numpy(arrays["images"]).float().unsqueeze(1) / 255.0
    net, _meta = load_checkpoint(run_file(run, RunFile.BEST_CKPT))
    stored = neck_scores(arrays["cams"], labels, masks, args.dilate)
    print(
        f"{'method':<10}{'layer':<12}{'map':>8}{'n':>4}{'energy':>9}{'chance':>9}{'ratio':>7}{'hit':>6}"
    )
    print(
        f"{'':<10}{'(stored)':<12}{'':>8}{stored['n']:>4}{stored['energy']:>9.3f}"
        f"{stored['chance']:>9.3f}{stored['energy'] / stored['chance']:>7.2f}{stored['hit']:>6.2f}"
    )
    layers = args.layers or [None]
    for method, name in [(m, n) for m in args.methods for n in layers]:
        layer = resolve_cam_layer(net.net) if name is None else net.net.get_submodule(name)
        hw = cam_map_size(net, layer, tuple(x.shape[-2:]))
        cams = compute_gradcam(net, x, targets=[int(v) for v in labels], layer=layer, method=method)
        s = neck_scores(cams, labels, masks, args.dilate)
        size = f"{hw[0]}x{hw[1]}"
        print(
            f"{method:<10}{name or 'default':<12}{size:>8}{s['n']:>4}{s['energy']:>9.3f}{s['chance']:>9.3f}"
            f"{s['energy'] / s['chance']:>7.2f}{s['hit']:>6.2f}"
        )


if __name__ == "__main__":
    main()
