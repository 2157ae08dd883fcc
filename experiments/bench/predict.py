"""Speed of the pre-archive QA check on CPU: PyTorch against ONNX Runtime, same model, same studies.

    python experiments/bench/predict.py [--size 224] [--n 64] [--repeats 30] [--batch 16]

A resnet18 with scratch weights (speed does not depend on the weights) is saved as a real
checkpoint, exported with `lung_cls.export`, and run on phantom studies written as DICOM files.
It prints, for each backend:

* model throughput: pre-processed studies per second, batches of ``--batch`` (best of
  ``--rounds`` passes);
* end-to-end throughput: studies per second for the whole `predict_files` loop over ``--n``
  DICOM files (decode, declared class, pre-processing, inference; no overlays; best of
  ``--rounds``);
* single-study latency: one DICOM file -> P(perfusion) (decode + pre-processing + a batch of one),
  median (and 10th/90th percentiles) of ``--repeats`` runs after a warm-up, with the share of
  each stage;

and the ONNX Runtime speed-up over PyTorch for each figure. The two backends take turns (pass by
pass, block by block), so load from other processes on a shared machine hits both alike; still,
``--threads 1`` gives the steadiest figures on a busy machine. ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def save_scratch_checkpoint(path: Path, backbone: str, size: int, seed: int = 0) -> None:
    """A checkpoint in the training run's format (weights, hparams, run meta), scratch weights."""
    from lung_cls.models.classifier import LungClassifier

    torch.manual_seed(seed)
    model = LungClassifier(backbone=backbone, pretrained=False, optimizer=None, scheduler=None)
    model.run_meta = {
        "data": {"preprocess": {"size": size}},
        "model": {"backbone": backbone},
        "seed": seed,
    }
    model.reference_image = torch.full((size, size), 40.0)
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "epoch": 0}
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)


def write_studies(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` phantom studies (half perfusion) as single-frame NM DICOM files."""
    from lung_cls.data.dicomio import write_nm_dicom
    from lung_cls.data.phantom import simulate_cohort

    cases = simulate_cohort({}, n - n // 2, n // 2, seed)
    paths = []
    for c in cases:
        p = folder / f"{c.id}.dcm"
        desc = "LUNG PERFUSION ANT" if c.label == 1 else "LUNG VENT ANT"
        write_nm_dicom(p, c.image, patient_id=c.patient_id, series_description=desc)
        paths.append(p)
    return paths


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench_model(backends: dict, images: np.ndarray, batch: int, rounds: int) -> dict[str, float]:
    """Pre-processed studies per second, best of ``rounds`` passes over ``images`` per backend.

    The backends take turns pass by pass, so a burst of load on a shared machine hits both.
    """
    best = dict.fromkeys(backends, float("inf"))
    for ens in backends.values():
        ens.member_probs(images[:batch], batch_size=batch)  # warm-up
    for _ in range(rounds):
        for name, ens in backends.items():
            t0 = time.perf_counter()
            ens.member_probs(images, batch_size=batch)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: len(images) / dt for name, dt in best.items()}


def bench_end_to_end(
    backends: dict, files: list[Path], root: Path, batch: int, rounds: int
) -> dict[str, float]:
    """Studies per second through `predict_files` (decode ... inference), best of ``rounds``."""
    from lung_cls.predict import PredictOptions, predict_files

    opts = PredictOptions(batch_size=batch)
    best = dict.fromkeys(backends, float("inf"))
    for ens in backends.values():
        predict_files(ens, files[:2], root, opts)  # warm-up
    for _ in range(rounds):
        for name, ens in backends.items():
            t0 = time.perf_counter()
            rows = predict_files(ens, files, root, opts)
            best[name] = min(best[name], time.perf_counter() - t0)
            assert all(not str(r["status"]).startswith("error") for r in rows), rows
    return {name: len(files) / dt for name, dt in best.items()}


def bench_latency(
    backends: dict, file: Path, repeats: int, blocks: int = 3
) -> dict[str, dict[str, float]]:
    """One DICOM file -> P(perfusion), per backend: median / p10 / p90 ms, median of each stage.

    Runs come in ``blocks`` per backend, alternating backends (A B A B ...), each block starting
    with 2 unrecorded warm-up runs. Blocks rather than single runs: both libraries' thread pools
    spin for a while after each call and would steal the CPU from the other one.
    """
    from lung_cls.data.sources import read_image
    from lung_cls.predict import preprocess_study

    keys = ("decode", "preprocess", "inference", "total")
    stages = {name: {k: [] for k in keys} for name in backends}
    per_block = max(1, -(-repeats // blocks))
    for _ in range(blocks):
        for name, ens in backends.items():
            for i in range(per_block + 2):
                t0 = time.perf_counter()
                pixels, _ = read_image(file)
                t1 = time.perf_counter()
                image, _ = preprocess_study(pixels, ens.prep, ens.reference)
                t2 = time.perf_counter()
                ens.member_probs(image[None], batch_size=1)
                t3 = time.perf_counter()
                if i >= 2:
                    for k, v in zip(keys, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
                        stages[name][k].append(v * 1000.0)
    out = {}
    for name, st in stages.items():
        out[name] = {f"{k}_ms": statistics.median(v) for k, v in st.items()}
        out[name]["total_p10_ms"] = pct(st["total"], 10)
        out[name]["total_p90_ms"] = pct(st["total"], 90)
        out[name]["runs"] = len(st["total"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--n", type=int, default=64, help="studies for the throughput figures")
    parser.add_argument("--repeats", type=int, default=30, help="runs for the latency median")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="passes for the throughput figures")
    parser.add_argument("--threads", type=int, default=0, help="0: each library's default")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from lung_cls.export import export_checkpoint
    from lung_cls.predict import find_inputs, load_onnx_ensemble, load_torch_ensemble

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ckpt = tmp / "bench.ckpt"
        save_scratch_checkpoint(ckpt, args.backbone, args.size)
        export_checkpoint(ckpt, tmp / "onnx")
        files = write_studies(tmp / "studies", args.n)
        files, _, root = find_inputs(tmp / "studies")

        backends = {
            "pytorch": load_torch_ensemble([ckpt]),
            "onnxruntime": load_onnx_ensemble(
                [tmp / "onnx" / "model.onnx"], threads=args.threads or None
            ),
        }
        ref = backends["pytorch"]
        from lung_cls.data.sources import read_image
        from lung_cls.predict import preprocess_study

        images = np.stack(
            [preprocess_study(read_image(f)[0], ref.prep, ref.reference)[0] for f in files]
        )
        model = bench_model(backends, images, args.batch, args.rounds)
        e2e = bench_end_to_end(backends, files, root, args.batch, args.rounds)
        latency = bench_latency(backends, files[0], args.repeats)
        results = {
            name: {
                "model_studies_per_s": model[name],
                "end_to_end_studies_per_s": e2e[name],
                **latency[name],
            }
            for name in backends
        }

    t, o = results["pytorch"], results["onnxruntime"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\n{args.backbone} at {args.size} px on CPU ({os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} torch threads, ORT threads "
        f"{args.threads or 'default'}; {platform.processor() or platform.machine()}; "
        f"1-min load average at the end {load:.1f})"
    )
    print(f"{'':38s}{'PyTorch':>10s}{'ONNX RT':>10s}{'ORT speed-up':>14s}")
    rows = [
        ("model throughput, studies/s", "model_studies_per_s", True),
        ("end-to-end throughput, studies/s", "end_to_end_studies_per_s", True),
        ("single-study latency, median ms", "total_ms", False),
        ("  of which DICOM decode, ms", "decode_ms", False),
        ("  of which pre-processing, ms", "preprocess_ms", False),
        ("  of which inference, ms", "inference_ms", False),
        ("single-study latency, p10 ms", "total_p10_ms", False),
        ("single-study latency, p90 ms", "total_p90_ms", False),
    ]
    for label, key, higher_is_better in rows:
        speedup = o[key] / t[key] if higher_is_better else t[key] / o[key]
        print(f"{label:38s}{t[key]:10.1f}{o[key]:10.1f}{speedup:13.2f}x")
    print(
        f"(batch {args.batch}, {args.n} studies, latency median of {args.repeats}; "
        "speed-up > 1: ONNX Runtime is faster)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "load_average": load, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
