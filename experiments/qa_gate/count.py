"""Counts per category of what the QA gate answers (issue 15's closing numbers).

    python experiments/qa_gate/count.py --ckpt PATH/best.ckpt --work /tmp/qa_gate [--phantom-seed 0]

Categories: pydicom's own test files, the pydicom-data package, synthetic other-organ and
non-planar NM studies (tests/qa/organs.py, honest and lung headers), and the phantom's lung
studies (`python -m lung_cls.phantom format=dicom seed=...`: with seed 0 the demo's own training
cohort, so the tool also warns that the input is its training data). Prints one table per
category (status kinds) and the share of phantom lung studies answered (ok | review | mismatch).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "qa")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--work", default="/tmp/qa_gate")
    ap.add_argument("--phantom-seed", type=int, default=0)
    args = ap.parse_args()

    import data_store
    import pydicom
    from organs import write_others

    from lung_cls.qa.backends import load_torch_ensemble
    from lung_cls.qa.batch import PredictOptions, predict_files
    from lung_cls.qa.decide import status_kind
    from lung_cls.qa.inputs import find_inputs
    from lung_cls.qa.settings import model_warnings

    work = Path(args.work)
    cats = {
        "pydicom test files": Path(pydicom.__file__).parent / "data" / "test_files",
        "pydicom-data": Path(data_store.__file__).parent / "data",
        "synthetic other organs / acquisitions": work / "others",
        f"phantom lung studies (seed {args.phantom_seed})": work / "phantom",
    }
    if not (work / "others").is_dir():
        write_others(work / "others")
    if not (work / "phantom").is_dir():
        subprocess.run(
            [sys.executable, "-m", "lung_cls.phantom", f"out={work / 'phantom'}", "format=dicom",
             f"seed={args.phantom_seed}"], check=True, cwd=ROOT, capture_output=True,
        )  # fmt: skip
    ens = load_torch_ensemble([args.ckpt])
    all_rows = []
    for name, folder in cats.items():
        ignored: list = []
        files, errors, root = find_inputs(folder, ignored=ignored)
        rows = predict_files(ens, files, root, PredictOptions(), errors, ignored=ignored)
        all_rows += rows
        dicom = [r for r in rows if r["gate"] != "file"]
        counts = collections.Counter(status_kind(r["status"]) for r in dicom)
        print(f"\n{name}: {len(dicom)} DICOM/image files (+{len(rows) - len(dicom)} other files)")
        print("  " + ", ".join(f"{k} {counts.get(k, 0)}" for k in
                               ("ok", "review", "mismatch", "rejected", "error")))  # fmt: skip
        if name.startswith("synthetic"):
            for r in sorted(dicom, key=lambda r: r["file"]):
                print(f"    {Path(r['file']).name:28s} {r['status']}")
        if name.startswith("phantom"):
            answered = sum(counts[k] for k in ("ok", "review", "mismatch"))
            print(f"  answered {answered}/{len(dicom)} = {answered / len(dicom):.1%}; "
                  f"in the training split: {sum(r['training_split'] == 'train' for r in dicom)}, "
                  f"validation: {sum(r['training_split'] == 'val' for r in dicom)}")  # fmt: skip
            for r in dicom:
                if status_kind(r["status"]) == "rejected":
                    print(f"    {Path(r['file']).name}: {r['status']}")
    print()
    for w in model_warnings(ens, all_rows):
        print("WARNING", w)
    shutil.rmtree(work / "unused", ignore_errors=True)


if __name__ == "__main__":
    main()
