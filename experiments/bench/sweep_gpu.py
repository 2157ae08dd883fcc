"""The paper's whole sweep on one GPU, timed: 4 models x 5 seeds x 100 epochs, CAMs and report.

    python experiments/bench/sweep_gpu.py                  # on a GPU machine (e.g. one H200)
    python experiments/bench/sweep_gpu.py --cpu-smoke      # every code path, CPU-sized, ~1 minute
    experiments/bench/sweep_gpu.sh [options]               # the same on a bare GPU image (wheels)

It runs the real command line (nothing is re-implemented here):

    python -m lung_cls.train -m experiment=paper hydra/launcher=parallel hydra.launcher.n_jobs=8 \\
        model=seresnext101,vgg16,inception_resnet_v2,resnet18 model.pretrained=false logger=csv ...

``model.pretrained=false``: ImageNet weights cannot be downloaded here (the machines are offline),
so every run trains from scratch; the compute is the same as with pretrained weights.

Phases, in order:
1. **Cache.** The phantom cohort (530 images, 224 px) is simulated and pre-processed once, before
   any job starts, so concurrent jobs read one cache file instead of all building it at once.
2. **FLOPs.** Forward FLOPs per image of each model, counted with
   ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no memory, no weights); a
   training step is counted as 3 x forward (backward = 2 x forward). The counter's own
   forward+backward total is recorded too, but not used: in torch 2.x it counts the weight
   gradient of a grouped convolution ``groups`` times over (33x the forward for groups=32), which
   would inflate SE-ResNeXt's figure 5x.
3. **Sweep.** The full sweep through ``hydra/launcher=parallel`` (joblib, one process per worker),
   ``n_jobs`` concurrent jobs, the report built by the sweep callback at the end. GPU utilisation
   and memory are sampled every 500 ms (``nvidia-smi -lms 500``, else pynvml) in the background.
4. **Baseline.** A subset (one model x 2 seeds, fewer epochs, no report) run both ways: one job
   after the other (Hydra's basic launcher) and concurrently (``parallel``, 2 jobs). Their wall
   times give the concurrent/sequential ratio; their metrics are compared too.

It prints total wall time and time per run, a utilisation summary, the achieved TFLOP/s, the
concurrent/sequential ratio, next to the targets (sweep <= 10 min, goal 6), and writes everything to
``<out>/summary.json`` (and ``--summary`` if given).

Why these defaults (for one H200, 141 GB, 16 CPU cores; budget 9 min):
- The sweep trains 20 x 100 x 708 images (+ 40 val images per epoch). From the FLOP counts at
  224 px (training, per image: vgg16 ~93, SE-ResNeXt-101 ~48, Inception-ResNet-v2 ~39,
  ResNet-18 ~11 GFLOP) that is about 69 PFLOP: ~90 s at the ~790 TFLOP/s an H200 reaches on large
  bf16 matrix products, so 9 minutes need ~15 % of that sustained. Batches of 32 small images leave a single job launch-bound
  (a step is hundreds of small kernels) and idle between epochs (validation, checkpoint writes,
  CAMs, start-up), so several jobs run at once to fill those gaps.
- ``n_jobs=8``: 16 cores give each job 2 threads (joblib caps them); 8 jobs x <= 12 GB (weights,
  AdamW state and bf16 activations of the largest model at batch 32) fit in memory with room to
  spare; 20 jobs make 2.5 waves. Without MPS the GPU time-slices between processes, so more jobs
  than this only add context switches. ``--mps`` starts an MPS daemon (if the binary is there and
  allowed) so kernels of different jobs can overlap; it is off by default.
- The models are queued longest first (SE-ResNeXt-101, VGG-16, Inception-ResNet-v2, ResNet-18), so
  the last wave holds the short jobs.
- Batch size stays at the configured 32 (the training recipe is not changed for speed);
  ``--batch-size`` changes it if you accept a different recipe.
- ``logger=csv``: W&B (the default logger) starts a service process per run; the benchmark
  measures training, not logging. ``--logger wandb`` restores it.
- The report (Table 1, ROC, CAM statistics with 1000 permutations) over 20 runs x 40 test CAMs at
  224 px took 25 s on the 2-core development CPU; it runs once, at the end of the sweep.
- ``--deadline-s`` (default 560 s): the sweep is stopped at the deadline and the finished runs are
  reported (with a projection), so a capped machine session always returns figures; the baseline
  runs only if the time left allows. ``--deadline-s 0`` removes the cap.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PAPER_MODELS = ("seresnext101", "vgg16", "inception_resnet_v2", "resnet18")  # longest first
TARGET_S, GOAL_S = 600.0, 360.0


# --------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(f"[sweep_gpu {datetime.now():%H:%M:%S}] {msg}", flush=True)


def gpu_info() -> dict[str, Any]:
    """GPU name/memory from nvidia-smi (the parent process never creates a CUDA context)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return {"available": False}
    try:
        out = (
            subprocess.run(
                [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            .stdout.strip()
            .splitlines()
        )
    except (subprocess.SubprocessError, OSError) as err:
        return {"available": False, "error": str(err)}
    return {"available": bool(out), "gpus": out}


class UtilSampler:
    """GPU utilisation and memory every ``interval_ms`` in the background, with phase marks."""

    def __init__(self, path: Path, interval_ms: int = 500) -> None:
        self.path, self.interval_ms = path, interval_ms
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self.rows: list[tuple[float, float, float]] = []  # (unix time, util %, memory MiB)
        self.source = "none"
        self._stop = threading.Event()

    def start(self) -> UtilSampler:
        smi = shutil.which("nvidia-smi")
        if smi:
            self.source = "nvidia-smi"
            self._fh = open(self.path, "w")  # noqa: SIM115 - closed in stop()
            self.proc = subprocess.Popen(
                [
                    smi,
                    "--query-gpu=timestamp,utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    f"-lms={self.interval_ms}",
                ],
                stdout=self._fh,
                stderr=subprocess.DEVNULL,
            )
            self._t0 = time.time()
            return self
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no NVIDIA driver: nothing to sample
            return self
        self.source = "pynvml"

        def loop() -> None:
            while not self._stop.is_set():
                u = pynvml.nvmlDeviceGetUtilizationRates(handle)
                m = pynvml.nvmlDeviceGetMemoryInfo(handle)
                self.rows.append((time.time(), float(u.gpu), m.used / 2**20))
                self._stop.wait(self.interval_ms / 1000)

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self._fh.close()
            self.rows = self._parse_smi(self.path.read_text())
        if self.thread is not None:
            self._stop.set()
            self.thread.join(timeout=5)

    @staticmethod
    def _parse_smi(text: str) -> list[tuple[float, float, float]]:
        rows = []
        for rec in csv.reader(io.StringIO(text)):
            if len(rec) < 3:
                continue
            try:
                stamp = datetime.strptime(rec[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
                rows.append((stamp, float(rec[1]), float(rec[2])))
            except ValueError:
                continue
        return rows

    def summary(self, t0: float, t1: float) -> dict[str, Any]:
        sel = [(u, m) for t, u, m in self.rows if t0 <= t <= t1]
        if not sel:
            return {"source": self.source, "samples": 0}
        util = sorted(u for u, _ in sel)

        def q(p: float) -> float:
            return util[min(len(util) - 1, int(p * (len(util) - 1) + 0.5))]

        return {
            "source": self.source,
            "samples": len(sel),
            "util_mean": round(statistics.fmean(util), 1),
            "util_p10": q(0.10),
            "util_median": q(0.50),
            "util_p90": q(0.90),
            "share_samples_util_0": round(sum(u == 0 for u in util) / len(util), 3),
            "share_samples_util_ge_90": round(sum(u >= 90 for u in util) / len(util), 3),
            "memory_max_mib": max(m for _, m in sel),
        }


def count_flops(backbone: str, size: int, in_chans: int = 3) -> dict[str, float]:
    """Forward FLOPs per image (FlopCounterMode, meta device) and the counter's fwd+bwd total."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lung_cls.models.backbone import LungNet

    n = 2
    with torch.device("meta"):
        net = LungNet(
            timm.create_model(backbone, pretrained=False, num_classes=2, in_chans=in_chans),
            in_chans,
        )
        x = torch.rand(n, 1, size, size)
    net.train()
    with FlopCounterMode(display=False) as counter:
        out = net(x)
        fwd = counter.get_total_flops()
        out.float().sum().backward()
        both = counter.get_total_flops()
    return {
        "forward_per_image": fwd / n,
        "train_per_image": 3 * fwd / n,
        "counter_fwd_bwd_per_image": both / n,
        "params": float(sum(p.numel() for p in net.parameters())),
    }


def compose(overrides: Sequence[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import lung_cls.utils.hydra  # noqa: F401 - resolvers

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(
            config_name="train", overrides=list(overrides), return_hydra_config=True
        )


def run_cli(
    args: Sequence[str],
    log_path: Path,
    deadline: float | None,
    env_extra: dict[str, str] | None = None,
) -> tuple[int, float, bool]:
    """Run ``python -m lung_cls.train <args>`` in its own process group; stop it at ``deadline``."""
    cmd = [sys.executable, "-m", "lung_cls.train", *args]
    log(" ".join(cmd[1:]))
    env = {
        **os.environ,
        "HYDRA_FULL_ERROR": "1",
        "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
        **(env_extra or {}),
    }
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        killed = False
        while proc.poll() is None:
            if deadline is not None and time.time() > deadline:
                log("deadline reached: stopping the sweep (finished runs are still reported)")
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                killed = True
                break
            time.sleep(0.5)
    return proc.returncode, time.perf_counter() - t0, killed


def collect_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One record per run dir: status, metrics, start/end from the files it wrote, timings."""
    from lung_cls.runs import RunFile, find_run_dirs, read_metrics, run_file

    runs = []
    for run_dir in find_run_dirs(sweep_dir):
        cfg_file = run_file(run_dir, RunFile.CONFIG)
        if not cfg_file.is_file():  # Hydra made the dir, the job never started training
            continue
        rec: dict[str, Any] = {"run": run_dir.name, "start": cfg_file.stat().st_mtime}
        mpath = run_file(run_dir, RunFile.METRICS)
        m = read_metrics(run_dir)
        if m is not None:
            rec.update(
                status=m.get("status"),
                model=m.get("model"),
                seed=m.get("seed"),
                end=mpath.stat().st_mtime,
                epochs_run=m.get("epochs_run"),
                image_size=m.get("image_size"),
                best_epoch=m.get("best_epoch"),
                test_acc=(m.get("test") or {}).get("acc"),
                test_auc=(m.get("test") or {}).get("auc"),
                n_train=(m.get("data") or {}).get("n_train_balanced"),
                n_val=((m.get("data") or {}).get("val") or {}).get("images"),
                n_test=((m.get("data") or {}).get("test") or {}).get("images"),
                error=m.get("error"),
            )
            rec["seconds"] = rec["end"] - rec["start"]
        else:
            rec["status"] = "unfinished"
        for name in (RunFile.STEP_TIMING, RunFile.TIMING):
            p = run_file(run_dir, name)
            if p.is_file():
                data = json.loads(p.read_text())
                data.pop("per_epoch", None)
                rec[str(name).removesuffix(".json")] = data
        runs.append(rec)
    return runs


def run_flops(run: dict[str, Any], flops: dict[str, dict[str, float]]) -> float:
    """Model FLOPs a finished run executed: training steps, validation, test, val re-score, CAMs."""
    f = flops.get(str(run.get("model")))
    if not f or run.get("status") != "ok":
        return 0.0
    epochs = int(run.get("epochs_run") or 0)
    n_train, n_val, n_test = (int(run.get(k) or 0) for k in ("n_train", "n_val", "n_test"))
    train = f["train_per_image"] * n_train * epochs
    evaluation = f["forward_per_image"] * (n_val * epochs + n_test + n_val)
    cams = f["train_per_image"] * n_test  # Grad-CAM: a forward and a backward per test image
    return train + evaluation + cams


def phase_summary(
    name: str, wall: float, rc: int, killed: bool, runs: list[dict], flops: dict, n_jobs: int
) -> dict[str, Any]:
    ok = [r for r in runs if r.get("status") == "ok"]
    total_flops = sum(run_flops(r, flops) for r in runs)
    per_run = [r["seconds"] for r in ok if "seconds" in r]
    out: dict[str, Any] = {
        "phase": name,
        "n_jobs": n_jobs,
        "wall_seconds": round(wall, 2),
        "returncode": rc,
        "stopped_at_deadline": killed,
        "runs_total": len(runs),
        "runs_ok": len(ok),
        "runs_failed": [r["run"] for r in runs if r.get("status") not in ("ok",)],
        "run_seconds_median": round(statistics.median(per_run), 2) if per_run else None,
        "run_seconds_max": round(max(per_run), 2) if per_run else None,
        "run_seconds_sum": round(sum(per_run), 2),
        "effective_concurrency": round(sum(per_run) / wall, 2) if wall and per_run else None,
        "model_pflop": round(total_flops / 1e15, 3),
        "achieved_tflops": round(total_flops / wall / 1e12, 2) if wall else None,
        "util": {},
    }
    by_model: dict[str, list[dict]] = {}
    for r in ok:
        by_model.setdefault(str(r["model"]), []).append(r)
    out["per_model"] = {
        m: {
            "runs": len(rs),
            "run_seconds_median": round(statistics.median(r["seconds"] for r in rs), 2),
            "median_epoch_seconds": _median(
                [(r.get("step_timing") or {}).get("median_epoch_seconds") for r in rs]
            ),
            "first_epoch_seconds": _median(
                [(r.get("step_timing") or {}).get("first_epoch_seconds") for r in rs]
            ),
            "host_data_stall": _median(
                [(r.get("step_timing") or {}).get("stall_fraction_after_first_epoch") for r in rs]
            ),
            "test_acc_mean": round(
                statistics.fmean(r["test_acc"] for r in rs if r.get("test_acc") is not None), 4
            )
            if any(r.get("test_acc") is not None for r in rs)
            else None,
            "tflop_per_run": round(run_flops(rs[0], flops) / 1e12, 2),
        }
        for m, rs in sorted(by_model.items())
    }
    return out


def _median(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return round(statistics.median(vals), 4) if vals else None


def metrics_equal(dir_a: Path, dir_b: Path) -> dict[str, Any]:
    """Same run names in both dirs with byte-identical metrics.json and predictions.csv?"""
    from lung_cls.runs import RunFile, find_run_dirs

    names = [
        str(p.relative_to(dir_a))
        for p in find_run_dirs(dir_a)
        if (p / str(RunFile.METRICS)).is_file()
    ]
    same = []
    for name in names:
        files = (str(RunFile.METRICS), str(RunFile.PREDICTIONS))
        same.append(
            all(
                (dir_b / name / f).is_file()
                and (dir_a / name / f).read_bytes() == (dir_b / name / f).read_bytes()
                for f in files
            )
        )
    return {"runs": names, "identical": same}


def start_mps(workdir: Path) -> dict[str, str] | None:
    """Start an MPS control daemon with private pipe/log dirs; None if that is not possible."""
    ctl = shutil.which("nvidia-cuda-mps-control")
    if not ctl:
        log("--mps: nvidia-cuda-mps-control not found; running without MPS")
        return None
    env = {
        "CUDA_MPS_PIPE_DIRECTORY": str(workdir / "mps_pipe"),
        "CUDA_MPS_LOG_DIRECTORY": str(workdir / "mps_log"),
    }
    for d in env.values():
        Path(d).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([ctl, "-d"], env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        log(f"--mps: could not start the daemon ({proc.stderr.strip()}); running without MPS")
        return None
    os.environ.update(env)
    return env


def stop_mps(env: dict[str, str] | None) -> None:
    if env:
        subprocess.run(
            [shutil.which("nvidia-cuda-mps-control") or "nvidia-cuda-mps-control"],
            input="quit\n",
            text=True,
            env={**os.environ, **env},
            capture_output=True,
        )


# --------------------------------------------------------------------------- main
def fixed_settings(a: argparse.Namespace, epochs: int) -> list[str]:
    """Settings that change what a job computes but are the same for every job of a phase.

    They go into a generated experiment config (see :func:`write_experiment`), not onto the command
    line: run dirs are named by the command-line overrides that change what a job computes
    (``lung_cls.utils.hydra.sweep_subdir``), and the report and docs/internals.md expect exactly
    ``model=...,seed=...``.
    """
    out = [
        "model.pretrained=false",
        "trainer.enable_progress_bar=false",
        f"trainer.max_epochs={epochs}",
    ]
    if a.cpu_smoke:
        out += [
            f"data.preprocess.size={a.size or 32}",
            "data.n_perfusion=30",
            "data.n_ventilation=20",
            "data.split.perfusion=[20,5,5]",
            "data.split.ventilation=[10,5,5]",
        ]
    elif a.size:
        out.append(f"data.preprocess.size={a.size}")
    if a.batch_size:
        out.append(f"data.batch_size={a.batch_size}")
    return out


def write_experiment(conf_dir: Path, name: str, settings: Sequence[str]) -> None:
    """``<conf_dir>/experiment/<name>.yaml``: the paper experiment plus ``settings``."""
    from omegaconf import OmegaConf

    body = OmegaConf.to_yaml(OmegaConf.from_dotlist(list(settings)))
    path = conf_dir / "experiment" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# @package _global_\n# Written by experiments/bench/sweep_gpu.py: the paper sweep plus the\n"
        "# benchmark's fixed settings.\ndefaults:\n  - paper\n  - _self_\n\n" + body
    )


def cli_common(a: argparse.Namespace, conf_dir: Path, experiment: str) -> list[str]:
    """Command-line overrides shared by every phase (none of them enters a run-dir name)."""
    out = [
        f"hydra.searchpath=[file://{conf_dir}]",
        f"experiment={experiment}",
        f"logger={a.logger}",
        "callbacks.rich_progress_bar=null",
        "+callbacks.step_timer._target_=lung_cls.evaluation.timing.StepTimer",
    ]
    if a.cpu_smoke:
        out += ["trainer=cpu", "n_boot=100"]
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="CPU-sized: 2 models x 2 seeds x 2 epochs at 32 px on a 50-image phantom",
    )
    p.add_argument("--models", nargs="+", default=None, help=f"default {' '.join(PAPER_MODELS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 3 4")
    p.add_argument("--epochs", type=int, default=None, help="default 100 (the paper)")
    p.add_argument("--n-jobs", type=int, default=None, help="concurrent jobs (default 8; smoke 2)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's (32)")
    p.add_argument("--size", type=int, default=None, help="image size (default 224; smoke 32)")
    p.add_argument("--logger", default="csv")
    p.add_argument("--baseline-model", default="resnet18")
    p.add_argument("--baseline-epochs", type=int, default=None, help="default 20 (smoke 2)")
    p.add_argument("--baseline", choices=["last", "first", "skip"], default="last")
    p.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="stop the sweep after this many seconds from start (default 560; smoke: none; 0 = none)",
    )
    p.add_argument(
        "--mps", action="store_true", help="start an MPS daemon for the sweep (off by default)"
    )
    p.add_argument("--out", type=Path, default=None, help="default outputs/bench/sweep_gpu/<time>")
    p.add_argument("--summary", type=Path, default=None, help="also write the summary JSON here")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    a = p.parse_args(argv)

    smoke = a.cpu_smoke
    models = a.models or (["resnet18", "vgg16"] if smoke else list(PAPER_MODELS))
    seeds = a.seeds if a.seeds is not None else ([0, 1] if smoke else [0, 1, 2, 3, 4])
    epochs = a.epochs or (2 if smoke else 100)
    n_jobs = a.n_jobs or (2 if smoke else 8)
    base_epochs = a.baseline_epochs or (2 if smoke else 20)
    deadline_s = a.deadline_s if a.deadline_s is not None else (0 if smoke else 560)
    t_start = time.time()
    deadline = t_start + deadline_s if deadline_s else None
    out = (
        a.out or ROOT / "outputs" / "bench" / "sweep_gpu" / f"{datetime.now():%Y-%m-%d_%H-%M-%S}"
    ).resolve()
    out.mkdir(parents=True, exist_ok=True)
    conf_dir = out / "conf"
    write_experiment(conf_dir, "bench_sweep", fixed_settings(a, epochs))
    write_experiment(conf_dir, "bench_baseline", fixed_settings(a, base_epochs))
    sweep_common = cli_common(a, conf_dir, "bench_sweep")
    cfg = compose(
        [
            "experiment=paper",
            *fixed_settings(a, epochs),
            *[o for o in sweep_common if not o.startswith(("hydra.", "experiment="))],
            f"model={models[0]}",
        ]
    )
    size = int(cfg.data.preprocess.size)

    sweep_args = [
        "-m",
        *sweep_common,
        f"model={','.join(models)}",
        f"seed={','.join(map(str, seeds))}",
        "hydra/launcher=parallel",
        f"hydra.launcher.n_jobs={n_jobs}",
        f"hydra.sweep.dir={out / 'sweep'}",
    ]
    base_common = [
        "-m",
        *cli_common(a, conf_dir, "bench_baseline"),
        f"model={a.baseline_model}",
        "seed=0,1",
        "++hydra.callbacks.report.enabled=false",
    ]
    base_seq = [
        *base_common,
        "hydra/launcher=basic",
        f"hydra.sweep.dir={out / 'baseline_sequential'}",
    ]
    base_par = [
        *base_common,
        "hydra/launcher=parallel",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={out / 'baseline_concurrent'}",
    ]
    summary: dict[str, Any] = {
        "mode": "cpu-smoke" if smoke else "gpu",
        "started": datetime.now().isoformat(timespec="seconds"),
        "host": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "gpu": gpu_info(),
            "load_avg_start": os.getloadavg(),
        },
        "settings": {
            "models": models,
            "seeds": seeds,
            "epochs": epochs,
            "n_jobs": n_jobs,
            "image_size": size,
            "batch_size": int(cfg.data.batch_size),
            "trainer": {
                k: str(cfg.trainer.get(k)) for k in ("accelerator", "precision", "benchmark")
            },
            "channels_last": bool(cfg.model.channels_last),
            "compile": bool(cfg.model.compile),
            "baseline": {"model": a.baseline_model, "seeds": [0, 1], "epochs": base_epochs},
            "deadline_s": deadline_s,
            "mps": a.mps,
            "pretrained": False,
            "commands": {
                "sweep": "python -m lung_cls.train " + " ".join(sweep_args),
                "baseline_sequential": "python -m lung_cls.train " + " ".join(base_seq),
                "baseline_concurrent": "python -m lung_cls.train " + " ".join(base_par),
            },
        },
        "targets": {"sweep_wall_s": TARGET_S, "sweep_goal_s": GOAL_S},
    }
    if a.dry_run:
        print(json.dumps(summary["settings"]["commands"], indent=2))
        return summary

    def save() -> None:
        text = json.dumps(summary, indent=2, default=str)
        (out / "summary.json").write_text(text)
        if a.summary:
            a.summary.parent.mkdir(parents=True, exist_ok=True)
            a.summary.write_text(text)

    # 1. cache -------------------------------------------------------------------------------
    from lung_cls.data.preprocess import prepare_dataset

    t = time.perf_counter()
    cache_dir = Path(str(cfg.paths.cache_dir))
    prepare_dataset(cfg.data, str(cache_dir if cache_dir.is_absolute() else ROOT / cache_dir))
    summary["cache_seconds"] = round(time.perf_counter() - t, 2)
    log(f"cache ready in {summary['cache_seconds']} s ({size} px)")

    # 2. FLOPs ----------------------------------------------------------------------------------
    t = time.perf_counter()
    flops = {}
    for m in sorted(set(models) | {a.baseline_model}):
        backbone = str(compose(["experiment=paper", f"model={m}"]).model.backbone)
        flops[m] = count_flops(backbone, size)
        log(
            f"{m:<20} {flops[m]['forward_per_image'] / 1e9:8.2f} GFLOP fwd/img, "
            f"{flops[m]['train_per_image'] / 1e9:8.2f} GFLOP train/img (3 x fwd)"
        )
    summary["flops"] = flops
    summary["flops_seconds"] = round(time.perf_counter() - t, 2)
    save()

    sampler = UtilSampler(out / "gpu_util.csv").start()
    mps_env = start_mps(out) if a.mps else None
    summary["mps"] = bool(mps_env)

    windows: dict[str, tuple[float, float]] = {}  # phase -> (start, end), for the GPU samples

    def timed(
        name: str, args_: list[str], dl: float | None, env: dict[str, str] | None = None
    ) -> dict[str, Any]:
        t0 = time.time()
        rc, wall, killed = run_cli(args_, out / f"{name}.log", dl, env)
        windows[name] = (t0, time.time())
        runs = collect_runs(out / name)
        jobs = (
            1 if name == "baseline_sequential" else (2 if name == "baseline_concurrent" else n_jobs)
        )
        ph = phase_summary(name, wall, rc, killed, runs, flops, jobs)
        ends = [r["end"] for r in runs if r.get("status") == "ok"]
        ph["seconds_after_last_run"] = round(windows[name][1] - max(ends), 2) if ends else None
        ph["runs"] = runs
        log(f"{name}: {wall:.1f} s, {ph['runs_ok']}/{len(runs)} runs ok")
        return ph

    def baseline() -> None:
        # The sequential job gets the thread count each of the 2 concurrent workers gets from joblib
        # (cores // 2), so the two ways differ only in running at once; CPU kernels (bf16 above
        # all) round differently with another thread count.
        threads = str(max(1, (os.cpu_count() or 2) // 2))
        seq = timed("baseline_sequential", base_seq, None, {"OMP_NUM_THREADS": threads})
        par = timed("baseline_concurrent", base_par, None)
        summary["baseline"] = {
            "baseline_sequential": seq,
            "baseline_concurrent": par,
            "ratio_concurrent_to_sequential": round(par["wall_seconds"] / seq["wall_seconds"], 3),
            "metrics_equal": metrics_equal(
                out / "baseline_sequential", out / "baseline_concurrent"
            ),
        }
        save()

    try:
        if a.baseline == "first":
            baseline()
        # 3. sweep ------------------------------------------------------------------------------
        sweep = timed("sweep", sweep_args, deadline)
        sweep["report"] = (out / "sweep" / "report" / "report.html").is_file()
        n_total = len(models) * len(seeds)
        if sweep["stopped_at_deadline"] and sweep["runs_ok"]:
            sweep["projected_wall_seconds"] = round(
                sweep["wall_seconds"] * n_total / sweep["runs_ok"], 1
            )
        summary["sweep"] = sweep
        save()
        # 4. baseline ---------------------------------------------------------------------------
        if a.baseline == "last":
            left = (deadline - time.time()) if deadline else float("inf")
            med = (sweep["per_model"].get(a.baseline_model) or {}).get("run_seconds_median")
            # two sequential runs + two concurrent ones, each with ~30 s of start-up, test and CAMs
            need = 3.0 * (med * base_epochs / epochs + 30.0) if med else 240.0
            if left >= need:
                baseline()
            else:
                summary["baseline"] = {
                    "skipped": f"{left:.0f} s left before the deadline, ~{need:.0f} s needed"
                }
                log(f"baseline skipped: {summary['baseline']['skipped']}")
    finally:
        sampler.stop()
        stop_mps(mps_env)
        phases = {
            "sweep": summary.get("sweep"),
            **{
                k: v
                for k, v in (summary.get("baseline") or {}).items()
                if isinstance(v, dict) and "phase" in v
            },
        }
        for name, ph in phases.items():
            if ph is not None and name in windows:
                ph["util"] = sampler.summary(*windows[name])
        summary["total_seconds"] = round(time.time() - t_start, 2)
        summary["host"]["load_avg_end"] = os.getloadavg()
        save()

    print_summary(summary)
    return summary


def print_summary(s: dict[str, Any]) -> None:
    sw = s.get("sweep", {})
    st = s["settings"]
    print()
    print(
        f"mode: {s['mode']}   models: {','.join(st['models'])}   seeds: {len(st['seeds'])}   "
        f"epochs: {st['epochs']}   size: {st['image_size']}   batch: {st['batch_size']}   "
        f"n_jobs: {st['n_jobs']}   precision: {st['trainer']['precision']}   MPS: {s.get('mps')}"
    )
    print(
        f"host: {s['host']['cpus']} CPUs, GPU: {s['host']['gpu']}, "
        f"load avg {s['host']['load_avg_start'][0]:.1f} -> {s['host'].get('load_avg_end', [0])[0]:.1f}"
    )
    print(
        f"cache (prepare once): {s.get('cache_seconds')} s   FLOP count: {s.get('flops_seconds')} s"
    )
    if sw:
        proj = (
            f" (stopped at deadline; projected {sw.get('projected_wall_seconds')} s)"
            if sw["stopped_at_deadline"]
            else ""
        )
        print(
            f"SWEEP wall: {sw['wall_seconds']:.1f} s = {sw['wall_seconds'] / 60:.2f} min{proj}   "
            f"target <= {TARGET_S / 60:.0f} min (goal {GOAL_S / 60:.0f})"
        )
        print(
            f"  runs ok {sw['runs_ok']}/{sw['runs_total']}, per run: median {sw['run_seconds_median']} s, "
            f"max {sw['run_seconds_max']} s; effective concurrency {sw['effective_concurrency']}; "
            f"after the last run (report) {sw.get('seconds_after_last_run')} s; report written: {sw.get('report')}"
        )
        print(
            f"  model compute {sw['model_pflop']} PFLOP -> achieved {sw['achieved_tflops']} TFLOP/s over the wall time"
        )
        u = sw.get("util", {})
        if u.get("samples"):
            print(
                f"  GPU util ({u['source']}, {u['samples']} samples): mean {u['util_mean']} %, p10 {u['util_p10']}, "
                f"median {u['util_median']}, p90 {u['util_p90']}, samples at 0 %: {u['share_samples_util_0']:.0%}, "
                f">= 90 %: {u['share_samples_util_ge_90']:.0%}; memory max {u['memory_max_mib']:.0f} MiB"
            )
        else:
            print(
                f"  GPU util: no samples ({u.get('source', 'none')}: no NVIDIA driver on this machine)"
            )
        print(
            f"  {'model':<22}{'runs':>5}{'s/run':>9}{'s/epoch':>9}{'1st ep s':>9}{'stall':>8}{'test acc':>9}{'TFLOP/run':>10}"
        )
        for m, r in sw["per_model"].items():
            stall = (
                f"{100 * r['host_data_stall']:.1f}%" if r["host_data_stall"] is not None else "-"
            )
            print(
                f"  {m:<22}{r['runs']:>5}{r['run_seconds_median']:>9.1f}{(r['median_epoch_seconds'] or 0):>9.2f}"
                f"{(r['first_epoch_seconds'] or 0):>9.2f}{stall:>8}{(r['test_acc_mean'] or 0):>9.3f}{r['tflop_per_run']:>10.2f}"
            )
    b = s.get("baseline", {})
    if "ratio_concurrent_to_sequential" in b:
        seq, par = b["baseline_sequential"], b["baseline_concurrent"]
        eq = b["metrics_equal"]["identical"]
        print(
            f"BASELINE {st['baseline']['model']} x 2 seeds x {st['baseline']['epochs']} epochs: sequential "
            f"{seq['wall_seconds']:.1f} s, concurrent (2 jobs) {par['wall_seconds']:.1f} s -> "
            f"ratio concurrent/sequential {b['ratio_concurrent_to_sequential']:.3f}; "
            f"metrics identical: {sum(eq)}/{len(eq)}"
        )
    elif b:
        print(f"BASELINE: {b.get('skipped')}")
    print(f"total: {s.get('total_seconds')} s")


if __name__ == "__main__":
    main()
