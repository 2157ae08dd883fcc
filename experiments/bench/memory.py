"""Peak memory of loading and pre-processing the paper's cohort (530 images), target <= 1 GiB.

    python experiments/bench/memory.py [--n-perfusion 394] [--n-ventilation 136] [--threads 2]

Every measurement runs in a fresh Python process, so one step's peak cannot hide another's:
* ``baseline``       - the imports only (Python, NumPy, torch, the lung_cls data modules);
* ``phantom cold``   - ``prepare_dataset`` on the built-in phantom, empty cache: simulation, truth
                       masks, pre-processing, cache write;
* ``phantom cached`` - the same call again: the cache file is read;
* ``DICOM write``    - setup: the same 530 phantom images written as an NM DICOM class folder;
* ``folder cold``    - ``prepare_dataset`` on that DICOM folder (``data=folder``), empty cache;
* ``folder cached``  - the same call again.

``--phases`` adds one more fresh process that runs the cold phantom path step by step
(``load_studies``, ``preprocess_set``, moving the truth masks) and prints the resident set and
its high-water mark after each step: where the memory goes.

The peak is the child's ``VmHWM`` (/proc/self/status, the high-water mark of its resident set),
cross-checked with ``ru_maxrss`` from ``wait4`` on that child (which also counts the brief
forks a child makes, so it can read higher). "- imports" is the peak minus the baseline: what
the data path itself adds. 1 GiB = 1024 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_MIB = 1024.0
STEPS = ("baseline", "phantom", "phantom", "write_dicom", "folder", "folder")
LABELS = ("baseline (imports)", "phantom cold", "phantom cached", "DICOM write (setup)",
          "folder cold (DICOM)", "folder cached (DICOM)")  # fmt: skip


def _status_mib(key: str) -> float:
    """A /proc/self/status memory line (kB) in MiB; NaN where /proc is not available."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _child(args: argparse.Namespace) -> None:
    """One measured step, in its own process; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from lung_cls.data.preprocess import prepare_dataset

    phantom = {"source": "phantom", "n_perfusion": args.n_perfusion,
               "n_ventilation": args.n_ventilation, "phantom_seed": 0}  # fmt: skip
    folder = {"source": "folder", "root": str(Path(args.work) / "dicom"), "on_error": "raise"}
    t0 = time.perf_counter()
    n = 0
    if args.child == "phantom":
        n = len(prepare_dataset(phantom, Path(args.work) / "cache_phantom").images)
    elif args.child == "folder":
        n = len(prepare_dataset(folder, Path(args.work) / "cache_folder").images)
    elif args.child == "phases":
        from lung_cls.data.preprocess import _move_masks, prep_config, preprocess_set
        from lung_cls.data.sources import load_studies

        marks = [("imports", _status_mib("VmRSS"), _status_mib("VmHWM"))]
        studies, _ = load_studies(phantom)
        marks.append(("load_studies", _status_mib("VmRSS"), _status_mib("VmHWM")))
        raw = [s.pixels for s in studies]
        for s in studies:
            s.pixels = None
        _, infos = preprocess_set(raw, prep_config(None), release=True)
        marks.append(("preprocess_set", _status_mib("VmRSS"), _status_mib("VmHWM")))
        _move_masks(studies, infos, int(prep_config(None)["size"]))
        marks.append(("move masks", _status_mib("VmRSS"), _status_mib("VmHWM")))
        print(json.dumps({"n": len(studies), "wall_s": time.perf_counter() - t0,
                          "peak_mib": _status_mib("VmHWM"), "marks": marks}))  # fmt: skip
        return
    elif args.child == "write_dicom":
        from lung_cls.data.dicomio import write_nm_dicom
        from lung_cls.data.phantom import simulate_cohort

        for case in simulate_cohort(None, args.n_perfusion, args.n_ventilation, 0):
            cls = "perfusion" if case.label == 1 else "ventilation"
            write_nm_dicom(Path(folder["root"]) / cls / f"{case.id}.dcm", case.image,
                           patient_id=case.patient_id, label_hint=case.label,
                           series_description="LUNG PERFUSION ANT" if case.label else "LUNG VENT ANT")  # fmt: skip
            n += 1
    wall = time.perf_counter() - t0
    print(json.dumps({"n": n, "wall_s": wall, "peak_mib": _status_mib("VmHWM"),
                      "rss_end_mib": _status_mib("VmRSS")}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n-perfusion", type=int, default=394)
    ap.add_argument("--n-ventilation", type=int, default=136)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    ap.add_argument("--phases", action="store_true",
                    help="also show the cold phantom path's memory after each step")  # fmt: skip
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return

    own_work = args.work is None
    args.work = args.work or tempfile.mkdtemp(prefix="lung_cls_mem_")
    n = args.n_perfusion + args.n_ventilation
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"cohort {args.n_perfusion} perfusion + {args.n_ventilation} ventilation = {n} images")  # fmt: skip
    print(f"{'step':24s} {'peak RSS':>10s} {'- imports':>10s} {'maxrss':>10s} {'wall':>8s}"
          f"   target <= {TARGET_MIB:.0f} MiB")  # fmt: skip
    worst, base = 0.0, None
    try:
        for step, label in zip(STEPS, LABELS, strict=True):
            r = _run_child(step, args)
            base = r["peak_mib"] if base is None else base
            measured = step != "write_dicom"
            if measured:
                worst = max(worst, r["peak_mib"])
            verdict = "" if not measured else ("ok" if r["peak_mib"] <= TARGET_MIB else "OVER")
            print(f"{label:24s} {r['peak_mib']:7.0f} MiB {r['peak_mib'] - base:+7.0f} MiB "
                  f"{r['maxrss_mib']:7.0f} MiB {r['wall_s']:7.1f} s   {verdict}")  # fmt: skip
        print(f"worst peak of loading + pre-processing: {worst:.0f} MiB "
              f"({worst / TARGET_MIB:.2f} of the target)")  # fmt: skip
        if args.phases:
            r = _run_child("phases", args)
            print(f"\nphantom cold, step by step   {'RSS':>8s} {'+ step':>8s} {'peak so far':>12s}")
            prev = None
            for name, rss, hwm in r["marks"]:
                grow = "" if prev is None else f"{rss - prev:+6.0f} MiB"
                print(f"  after {name:22s} {rss:5.0f} MiB {grow:>8s} {hwm:8.0f} MiB")
                prev = rss
    finally:
        if own_work:
            shutil.rmtree(args.work, ignore_errors=True)


def _run_child(step: str, args: argparse.Namespace) -> dict:
    """Run one step in a fresh interpreter; its peak from /proc and from the kernel's rusage."""
    cmd = [sys.executable, __file__, "--child", step, "--work", args.work,
           "--n-perfusion", str(args.n_perfusion), "--n-ventilation", str(args.n_ventilation),
           "--threads", str(args.threads)]  # fmt: skip
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"step {step} failed (exit {proc.returncode}):\n{err.read()[-3000:]}")
        result = json.loads(out.read().strip().splitlines()[-1])
    result["maxrss_mib"] = usage.ru_maxrss / 1024.0  # kB on Linux
    return result


if __name__ == "__main__":
    main()
