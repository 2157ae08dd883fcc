"""Data-path speed on the paper's cohort (530 images: 394 perfusion, 136 ventilation).

    python experiments/bench/preprocess.py [--n-perfusion 394] [--n-ventilation 136] [--threads 2]

Prints, each next to its target where there is one:
* phantom generation (images/s);
* DICOM write and read back (images/s; `write_nm_dicom` then `read_image`);
* pre-processing, cold: `preprocess_set` on the 530 images already in memory (target <= 2 s);
* `prepare_dataset` on the phantom source: cold (generation + pre-processing + masks + cache
  write) and cached (target <= 0.2 s);
* how the centring went: methods used and the centring error against the phantom's truth.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


class Timer:
    """Wall and CPU seconds of a block. On a machine shared with other jobs the wall time grows
    with the load; the process CPU time does not, and bounds the wall time on free cores (the
    parts that run on one thread take CPU = wall, the two-thread resize takes CPU ~ 2 x wall)."""

    def __enter__(self) -> Timer:
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def line(name: str, t: Timer, n: int | None = None, target: float | None = None) -> None:
    rate = f"{n / t.wall:8.1f} img/s" if n else " " * 14
    tgt = (
        f"target <= {target:g} s  ratio wall {t.wall / target:4.2f} cpu {t.cpu / target:4.2f}"
        if target
        else ""
    )
    print(f"{name:42s} wall {t.wall:7.3f} s  cpu {t.cpu:7.3f} s {rate}   {tgt}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n-perfusion", type=int, default=394)
    ap.add_argument("--n-ventilation", type=int, default=136)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lung_cls.data.dicomio import write_nm_dicom
    from lung_cls.data.phantom import simulate_cohort
    from lung_cls.data.preprocess import prepare_dataset, preprocess_set
    from lung_cls.data.sources import read_image

    n = args.n_perfusion + args.n_ventilation
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"cohort: {args.n_perfusion} perfusion + {args.n_ventilation} ventilation = {n} images, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip

    with Timer() as t:
        cases = simulate_cohort(None, args.n_perfusion, args.n_ventilation, args.seed)
    line("phantom generation", t, n)

    tmp = Path(tempfile.mkdtemp(prefix="lung_cls_bench_"))
    try:
        with Timer() as t:
            paths = [
                write_nm_dicom(
                    tmp / "dicom" / f"{c.id}.dcm",
                    c.image,
                    patient_id=c.patient_id,
                    series_description="LUNG PERFUSION ANT" if c.label == 1 else "LUNG VENT ANT",
                    label_hint=c.label,
                )
                for c in cases
            ]
        line("DICOM write", t, n)
        with Timer() as t:
            read = [read_image(p)[0] for p in paths]
        line("DICOM read (read_image)", t, n)
        assert all(np.array_equal(r, c.image) for r, c in zip(read, cases, strict=True))

        images = [c.image.astype(np.float32) for c in cases]
        timings: dict = {}
        with Timer() as t:
            out, infos = preprocess_set(images, timings=timings)
        line("pre-processing, cold (preprocess_set)", t, n, 2.0)
        print(f"{'':42s} of which NMI fallback {timings['nmi_s']:.3f} s wall "
              f"for {timings['n_nmi']} images")  # fmt: skip

        data_cfg = {"source": "phantom", "n_perfusion": args.n_perfusion,
                    "n_ventilation": args.n_ventilation, "phantom_seed": args.seed}  # fmt: skip
        cache = tmp / "cache"
        with Timer() as t:
            cold = prepare_dataset(data_cfg, cache)
        line("prepare_dataset, cold (phantom + masks)", t, n)
        with Timer() as t:
            warm = prepare_dataset(data_cfg, cache)
        line("prepare_dataset, cached load", t, n, 0.2)
        assert np.array_equal(warm.images, cold.images) and np.array_equal(out, cold.images)
        with Timer() as t:
            lungs = warm.masks["lungs"]
        line("  + unpack one mask on first use", t)
        assert np.array_equal(lungs, cold.masks["lungs"])
        size_mb = Path(cold.cache_file).stat().st_size / 2**20
        print(f"cache file: {size_mb:.1f} MB ({len(cold.masks)} masks, bit-packed)")

        methods = collections.Counter(i["method"] for i in infos)
        print(f"centring methods: {dict(methods)}")
        off = np.array([[c.params["offset_y"], c.params["offset_x"]] for c in cases])
        sh = np.array([[i["shift_y"], i["shift_x"]] for i in infos])
        err = sh + off * (out.shape[-1] / cases[0].image.shape[-1])
        for m in ("centroid", "nmi"):
            sel = np.array([i["method"] == m for i in infos])
            if sel.any():
                e = err[sel]
                print(
                    f"centring error vs phantom truth ({m:8s}, px at {out.shape[-1]}): "
                    f"mean y {e[:, 0].mean():+.2f} x {e[:, 1].mean():+.2f}; "
                    f"median |y| {np.median(np.abs(e[:, 0])):.2f} |x| {np.median(np.abs(e[:, 1])):.2f}; "
                    f"95th pct |y| {np.percentile(np.abs(e[:, 0]), 95):.2f} "
                    f"|x| {np.percentile(np.abs(e[:, 1]), 95):.2f}"
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
