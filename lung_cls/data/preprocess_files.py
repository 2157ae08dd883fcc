"""The paper's pre-processing written as files, so a user can see what the model will see.

``python -m lung_cls.preprocess`` is the door; this module reads the input (a folder, with or
without class subfolders, or a CSV manifest), runs `lung_cls.data.preprocess.preprocess_set` and
writes:

* ``<output>/<same relative path>.png`` - the centred 8-bit image per input file;
* ``<output>/preprocess.csv`` - :data:`CSV_COLUMNS`, one row per image, written atomically and
  last (a folder with a ``preprocess.csv`` holds every image it lists);
* ``<output>/figures/<name>.png`` (``figures=True``) - a panel per image like the paper's Fig. 1:
  normalised, binary (threshold), lung contours with both centroids and their midpoint, centred.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lung_cls.errors import UserError
from lung_cls.labels import CLASS_NAMES
from lung_cls.utils.io import to_plain, write_csv_atomic

log = logging.getLogger(__name__)

CSV_COLUMNS = ("file", "method", "shift_y", "shift_x", "source", "label", "reason")
_FIGURE_CHUNK = 64  # images normalised at a time for the panels: bounded memory


def data_config_for(input_path: Path, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The `load_studies` config for a CLI input: manifest, labelled folder or label-less folder."""
    from lung_cls.data.sources import DEFAULT_CLASS_DIRS

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


def check_output(inp: Path, out: Path, overwrite: bool) -> None:
    """Refuse an output that would overwrite results or read its own files back as input."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: output folder is not empty; pass overwrite=true to write into it")
    if inp.is_dir() and out.resolve().is_relative_to(inp.resolve()):
        raise UserError(f"{out}: output folder lies inside the input folder {inp}")


def output_names(rels: Sequence[str]) -> list[str]:
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


def _csv_rows(studies: list, infos: list[dict], names: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "file": name,
            "method": info["method"],
            "shift_y": f"{info['shift_y']:.3f}",
            "shift_x": f"{info['shift_x']:.3f}",
            "source": s.path,
            "label": "" if s.label is None else CLASS_NAMES[s.label],
            "reason": info.get("reason", ""),
        }
        for s, info, name in zip(studies, infos, names, strict=True)
    ]


def _save_panels(out: Path, studies: list, images: np.ndarray, infos: list[dict], names: list[str],
                 rels: list[str], prep: Mapping[str, Any]) -> None:  # fmt: skip
    from lung_cls.data.preprocess import normalise_set

    for start in range(0, len(studies), _FIGURE_CHUNK):
        part = studies[start : start + _FIGURE_CHUNK]
        norm, _, _ = normalise_set([s.pixels for s in part], prep)
        for k in range(len(part)):
            i = start + k
            save_panel(out / "figures" / names[i], norm[k], images[i], infos[i], prep, rels[i])


def write_preprocessed(
    out: Path,
    data_cfg: Mapping[str, Any],
    prep: Mapping[str, Any],
    *,
    figures: bool = False,
) -> dict[str, Any]:
    """Read ``data_cfg``'s studies, pre-process them with ``prep`` and write everything under
    ``out``; returns the summary (counts per centring method, skipped files, output folder)."""
    from PIL import Image

    from lung_cls.data.preprocess import preprocess_set
    from lung_cls.data.sources import load_studies

    studies, errors = load_studies(data_cfg)
    images, infos = preprocess_set([s.pixels for s in studies], prep)

    rels = [str(s.meta.get("relpath") or Path(s.path).name) for s in studies]
    names = output_names(rels)
    out.mkdir(parents=True, exist_ok=True)
    for img, name in zip(images, names, strict=True):
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(target)
    if figures:
        _save_panels(out, studies, images, infos, names, rels, prep)
    write_csv_atomic(out / "preprocess.csv", _csv_rows(studies, infos, names), CSV_COLUMNS)
    return {
        "n": len(studies),
        "methods": dict(Counter(info["method"] for info in infos)),
        "skipped": [str(e) for e in errors],
        "ignored": ignored_files(data_cfg, studies, errors, out),
        "output": str(out),
    }


def ignored_files(data_cfg: Mapping[str, Any], studies: list, errors: list, out: Path) -> list[str]:
    """Files under a folder input that were neither read nor skipped (not images by their name,
    hidden, or outside the class folders): named, so the summary adds up to every file there."""
    from lung_cls.data.sources import DEFAULT_EXTENSIONS

    if str(data_cfg.get("source", "")) != "folder":
        return []
    root = Path(str(data_cfg.get("root"))).expanduser().resolve()
    seen = {Path(s.path).resolve() for s in studies}
    seen |= {Path(e.path).resolve() for e in errors if getattr(e, "path", None)}
    out = out.resolve()
    ignored = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.resolve() in seen or out in path.resolve().parents:
            continue
        rel = path.relative_to(root)
        is_image = path.suffix.lower().lstrip(".") in DEFAULT_EXTENSIONS
        why = "outside the class folders" if is_image else "not an image file by its name"
        ignored.append(f"{rel} ({why})")
    return ignored


__all__ = [
    "CSV_COLUMNS",
    "check_output",
    "data_config_for",
    "output_names",
    "save_panel",
    "write_preprocessed",
]
