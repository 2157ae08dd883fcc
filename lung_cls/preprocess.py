"""``python -m lung_cls.preprocess input=DIR output=DIR [figures=true] [size=224]``

Runs the paper's pre-processing (resize, min-max x 255, lung-centroid centring with the NMI
fallback) on a folder of images or a CSV manifest, so a user can see what the model will see:

* ``output/<same relative path>.png`` - the centred 8-bit image per input file;
* ``output/preprocess.csv`` - file, method (centroid | nmi | none), shift_y, shift_x (px at the
  output size), source, label, reason (why the centroid method was not used);
* ``output/figures/<name>.png`` (``figures=true``) - a panel per image like the paper's Fig. 1:
  normalised, binary (threshold), lung contours with both centroids and their midpoint, centred.

A folder with class subfolders (``class_dirs``) is read as labelled; any other folder is read
label-less. Bad files stop the run with one line naming the file (``on_error=skip`` lists them at
the end instead). The logic lives in `lung_cls.data.sources` and `lung_cls.data.preprocess`.
"""

from __future__ import annotations

import csv
import logging
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from lung_cls.utils.hydra import UserError, clean_errors, quote_path_overrides

log = logging.getLogger(__name__)

CSV_COLUMNS = ("file", "method", "shift_y", "shift_x", "source", "label", "reason")


def data_config_for(input_path: Path, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The `load_studies` config for a CLI input: manifest, labelled folder or label-less folder."""
    from lung_cls.data.sources import DEFAULT_CLASS_DIRS, to_plain

    class_dirs = to_plain(cfg.get("class_dirs")) or dict(DEFAULT_CLASS_DIRS)
    common = {
        "on_error": str(cfg.get("on_error", "raise")),
        "frame_index": cfg.get("frame_index"),
        "duplicates": str(cfg.get("duplicates", "warn")),
        "extensions": to_plain(cfg.get("extensions")),
        "allow_empty_class": True,  # one class only is fine here: nothing is trained
        "class_dirs": class_dirs,
    }
    if input_path.is_file():
        if input_path.suffix.lower() != ".csv":
            raise UserError(f"{input_path}: input must be a folder or a .csv manifest")
        return {**common, "source": "manifest", "manifest": str(input_path)}
    if not input_path.is_dir():
        raise UserError(f"{input_path}: input does not exist")
    folders = {str(v).lower() for v in class_dirs.values()}
    labelled = any(
        p.is_dir() and p.name.lower() in folders
        for p in input_path.iterdir()
        if not p.name.startswith(".")
    )
    return {
        **common,
        "source": "folder",
        "root": str(input_path),
        "class_dirs": class_dirs if labelled else None,
    }


def _output_names(rels: Sequence[str]) -> list[str]:
    """Input relative paths -> unique output PNG paths (``a.dcm`` -> ``a.png``; clashes keep the
    original extension in the name: ``a_dcm.png``)."""
    first = [str(Path(r).with_suffix(".png")) if Path(r).suffix else r + ".png" for r in rels]
    counts = Counter(first)
    out, used = [], set()
    for rel, name in zip(rels, first, strict=True):
        if counts[name] > 1:
            p = Path(rel)
            name = str(p.with_name(p.name.replace(".", "_") + ".png"))
        base, k = name, 1
        while name in used:
            name = f"{base[:-4]}_{k}.png"
            k += 1
        used.add(name)
        out.append(name)
    return out


def save_panel(
    path: Path,
    norm: np.ndarray,
    centred: np.ndarray,
    info: Mapping[str, Any],
    prep: Mapping[str, Any],
    title: str,
) -> None:
    """The paper's Fig. 1 for one image: normalised, binary, contours + centroids, centred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lung_cls.data.preprocess import detect_lungs

    det = detect_lungs(norm, prep)
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    axes[0].imshow(norm, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title("normalised 0..255")
    axes[1].imshow(det["binary"], cmap="gray")
    axes[1].set_title(f"binary (>= {prep['threshold']:g})")
    axes[2].imshow(norm, cmap="gray", vmin=0, vmax=255)
    for lab in det["chosen"]:
        axes[2].contour(det["labels"] == lab, levels=[0.5], colors="yellow", linewidths=1)
    if det["centroids"] is not None:
        c = np.asarray(det["centroids"])
        axes[2].plot(c[:, 1], c[:, 0], "r+", ms=10, mew=2, label="C1, C2")
        m = det["midpoint"]
        axes[2].plot([m[1]], [m[0]], "c*", ms=10, label="midpoint C")
    s = norm.shape[-1]
    axes[2].plot([(s - 1) / 2], [(s - 1) / 2], "gx", ms=8, mew=2, label="image centre")
    axes[2].legend(loc="lower right", fontsize=6)
    axes[2].set_title("lungs" if det["ok"] else "lungs: not separable", fontsize=10)
    axes[3].imshow(centred, cmap="gray", vmin=0, vmax=255)
    axes[3].set_title(
        f"{info['method']}: shift ({info['shift_y']:+.1f}, {info['shift_x']:+.1f})", fontsize=10
    )
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    reason = f"  [{info['reason']}]" if info.get("reason") else ""
    fig.suptitle(f"{title}{reason}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The CLI's work; returns a summary (counts, skipped files, output folder)."""
    from PIL import Image

    from lung_cls.data.preprocess import normalise_set, prep_config, preprocess_set
    from lung_cls.data.sources import CLASS_NAMES, load_studies, to_plain

    inp = Path(str(cfg["input"])).expanduser()
    out = Path(str(cfg["output"])).expanduser()
    try:
        prep = prep_config(to_plain(cfg["prep"]))
    except ValueError as err:
        raise UserError(f"prep: {err}") from None
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not bool(cfg.get("overwrite", False)):
        raise UserError(f"{out}: output folder is not empty; pass overwrite=true to write into it")
    if inp.is_dir() and out.resolve().is_relative_to(inp.resolve()):
        raise UserError(f"{out}: output folder lies inside the input folder {inp}")

    data_cfg = data_config_for(inp, cfg)
    studies, errors = load_studies(data_cfg)
    images, infos = preprocess_set([s.pixels for s in studies], prep)

    rels = [str(s.meta.get("relpath") or Path(s.path).name) for s in studies]
    names = _output_names(rels)
    out.mkdir(parents=True, exist_ok=True)
    for img, name in zip(images, names, strict=True):
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(target)
    with open(out / "preprocess.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for s, info, name in zip(studies, infos, names, strict=True):
            w.writerow(
                [
                    name,
                    info["method"],
                    f"{info['shift_y']:.3f}",
                    f"{info['shift_x']:.3f}",
                    s.path,
                    "" if s.label is None else CLASS_NAMES[s.label],
                    info.get("reason", ""),
                ]
            )
    if bool(cfg.get("figures", False)):
        for start in range(0, len(studies), 64):  # normalised images in chunks: bounded memory
            part = studies[start : start + 64]
            norm, _, _ = normalise_set([s.pixels for s in part], prep)
            for k in range(len(part)):
                i = start + k
                save_panel(
                    out / "figures" / names[i],
                    norm[k],
                    images[i],
                    infos[i],
                    prep,
                    title=rels[i],
                )
    methods = Counter(info["method"] for info in infos)
    return {
        "n": len(studies),
        "methods": dict(methods),
        "skipped": [str(e) for e in errors],
        "output": str(out),
    }


@hydra.main(version_base="1.3", config_path="../conf", config_name="preprocess")
@clean_errors
def main(cfg: DictConfig) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, soft_wrap=True)
    summary = run(cfg)
    m = summary["methods"]
    console.print(
        f"Pre-processed {summary['n']} image(s) -> {escape(summary['output'])}: "
        f"{m.get('centroid', 0)} centred by lung centroids, {m.get('nmi', 0)} by the NMI fallback"
        + (f", {m['none']} not centred" if m.get("none") else "")
    )
    if summary["skipped"]:
        console.print(f"[yellow]Skipped {len(summary['skipped'])} file(s):[/yellow]")
        for line in summary["skipped"]:
            console.print(f"  {escape(line)}")


if __name__ == "__main__":
    sys.argv[1:] = quote_path_overrides(sys.argv[1:])  # run-dir paths hold "=" and ","
    main()
