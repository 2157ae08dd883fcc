"""CPU fast path: training-step throughput by memory format and precision.

    python experiments/bench/cpu_fastpath.py [--models resnet18 seresnext26d_32x4d] [--sizes 64 128]
                                             [--batch-size 16] [--rounds 5] [--threads N]

Why: on CPU the memory format and the precision decide the speed. oneDNN runs grouped
convolutions (ResNeXt, SE-ResNeXt: the paper's best model family) far faster in channels_last than
in NCHW, and on CPUs with AVX512-BF16/AMX a bf16 autocast roughly doubles the matrix throughput
again. The CPU trainer (conf/trainer/cpu.yaml) and the demo must use whichever wins; this prints
the evidence, per model and image size:

    NCHW fp32 | channels_last fp32 | channels_last + bf16 autocast

as images/s of a full training step (LungNet forward, cross-entropy, backward, AdamW step), with
each mode's ratio to NCHW fp32. The modes are interleaved step by step (the order rotates each
round) and medians are reported, so a shared machine's load hits all modes alike. One warm-up
step per mode is not timed. Two tables: images/s by the wall clock, and images per CPU-second
(process CPU time, all threads). On a loaded machine the wall clock mostly measures the other
processes; the CPU-time table is the stable measure of each mode's cost. ``--threads 1`` gives
the cleanest comparison; with several threads under load, OpenMP's default spin-waiting can make
every step several times slower (``OMP_WAIT_POLICY=PASSIVE`` avoids that).

    python experiments/bench/cpu_fastpath.py --compile [--compile-size 64] [--precision bf16]

measures what ``model.compile=true`` costs and brings on CPU, for ResNet-18 at 64 px with the
demo's epoch (708 training images in batches of 32, then 40 validation images): the first epoch
(which pays for compiling the training graph, the short last batch and the eval graph) and the
median of the later epochs, eager against compiled, each in a fresh process with an empty
inductor cache ("cold"), plus the compiled run again on the cache the first one left ("warm", what
the later seeds of a sweep see). It prints the break-even epoch count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from lung_cls.models.backbone import LungNet, create_backbone
from lung_cls.utils.hydra import cpu_bf16_supported

MODES = ("nchw_fp32", "cl_fp32", "cl_bf16")


def build(backbone: str, channels_last: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net, _ = create_backbone(backbone, pretrained=False, num_classes=2, in_chans=3)
    model = LungNet(net, 3).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def train_step(model, opt, x, y, channels_last: bool, bf16: bool) -> tuple[float, float]:
    """One training step; returns (wall seconds, process CPU seconds)."""
    t0, c0 = time.perf_counter(), time.process_time()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0, time.process_time() - c0


def measure(
    backbone: str, size: int, batch: int, rounds: int, modes: tuple[str, ...]
) -> dict[str, dict[str, float]]:
    """Per mode: images/s by wall clock and images per CPU-second (medians over rounds)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, size, size, generator=g)
    y = torch.randint(0, 2, (batch,), generator=g)
    setups = {m: build(backbone, channels_last=m.startswith("cl")) for m in modes}
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    for m in modes:  # warm-up: oneDNN primitive creation, allocator
        model, opt = setups[m]
        train_step(model, opt, x, y, m.startswith("cl"), m.endswith("bf16"))
    for r in range(rounds):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        for m in order:
            model, opt = setups[m]
            times[m].append(train_step(model, opt, x, y, m.startswith("cl"), m.endswith("bf16")))
    return {
        m: {
            "wall": batch / statistics.median(w for w, _ in t),
            "cpu": batch / statistics.median(c for _, c in t),
        }
        for m, t in times.items()
    }


def compile_worker(compiled: bool, size: int, precision: str, epochs: int) -> dict:
    """Epoch times of the demo-sized loop (eager or compiled), in this process."""
    from lung_cls.models.classifier import LungClassifier

    torch.manual_seed(0)
    module = LungClassifier(backbone="resnet18", pretrained=False, compile=compiled)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    bf16 = precision == "bf16"
    g = torch.Generator().manual_seed(0)
    train = [torch.rand(32, 1, size, size, generator=g) for _ in range(22)]
    train.append(torch.rand(4, 1, size, size, generator=g))  # 708 = 22 x 32 + 4
    val = [torch.rand(32, 1, size, size, generator=g), torch.rand(8, 1, size, size, generator=g)]
    out = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        module.train()
        for x in train:
            y = (torch.arange(len(x)) % 2).long()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = module(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        t1 = time.perf_counter()
        module.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for x in val:
                module(x)
        out.append({"train": t1 - t0, "val": time.perf_counter() - t1})
    return {"epochs": out}


def compile_check(size: int, precision: str, epochs: int) -> None:
    """Eager vs compiled (cold cache) vs compiled (warm cache), each in its own process."""
    cache = tempfile.mkdtemp(prefix="inductor_cache_")
    results = {}
    for name, compiled in (("eager", False), ("compiled_cold", True), ("compiled_warm", True)):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        cmd = [sys.executable, __file__, "--_compile-worker", "1" if compiled else "0",
               "--compile-size", str(size), "--precision", precision, "--compile-epochs", str(epochs)]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-2000:]}")
            return
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        results[name]["process_seconds"] = time.perf_counter() - t0
    print(
        f"resnet18 {size} px, precision {precision}, threads {torch.get_num_threads()}, "
        f"load avg (1 min) {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, inductor cache {cache}"
    )
    print(f"{'variant':<15}{'1st epoch s':>12}{'later epochs s (median)':>25}{'process s':>11}")
    rows = {}
    for name, r in results.items():
        eps = [e["train"] + e["val"] for e in r["epochs"]]
        rows[name] = (eps[0], statistics.median(eps[1:]))
        print(f"{name:<15}{eps[0]:>12.1f}{rows[name][1]:>25.2f}{r['process_seconds']:>11.1f}")
    e_first, e_steady = rows["eager"]
    for name in ("compiled_cold", "compiled_warm"):
        c_first, c_steady = rows[name]
        extra = c_first - e_first
        gain = e_steady - c_steady
        be = f"{1 + extra / gain:.0f} epochs" if gain > 0 else "never (compiled is not faster)"
        print(
            f"{name}: first-epoch extra {extra:+.1f} s, steady gain {gain:+.2f} s/epoch "
            f"({e_steady / c_steady:.2f}x) -> break-even after {be}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["resnet18", "seresnext26d_32x4d"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--compile", action="store_true", help="measure torch.compile instead")
    parser.add_argument("--compile-size", type=int, default=64)
    parser.add_argument("--compile-epochs", type=int, default=3)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                        help="for --compile; default bf16 where the CPU supports it")  # fmt: skip
    parser.add_argument(
        "--_compile-worker", dest="compile_worker", default=None, help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    precision = args.precision or ("bf16" if cpu_bf16_supported() else "fp32")
    if args.compile_worker is not None:
        r = compile_worker(
            args.compile_worker == "1", args.compile_size, precision, args.compile_epochs
        )
        print(json.dumps(r))
        return
    if args.compile:
        compile_check(args.compile_size, precision, args.compile_epochs)
        return
    modes = tuple(args.modes)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpu_bf16_supported():
        print("note: this CPU has no AVX512-BF16/AMX: bf16 autocast is emulated and slow here")
    load0 = os.getloadavg()
    results = []
    for backbone in args.models:
        for size in args.sizes:
            r = measure(backbone, size, args.batch_size, args.rounds, modes)
            results.append((backbone, size, r))
    load1 = os.getloadavg()
    print(
        f"batch={args.batch_size} rounds={args.rounds} threads={torch.get_num_threads()} "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')} "
        f"bf16 hardware={cpu_bf16_supported()} load avg (1 min) {load0[0]:.1f} -> {load1[0]:.1f} "
        f"on {os.cpu_count()} cores"
    )
    for key, title in (("wall", "images/s (wall clock)"), ("cpu", "images per CPU-second")):
        print(f"-- {title}")
        head = "".join(f"{m:>12}" for m in modes)
        ratios = "".join(f"{m + '/nchw':>16}" for m in modes if m != "nchw_fp32")
        print(f"{'model':<22}{'size':>5}{head}{ratios}  fastest")
        for backbone, size, r in results:
            vals = {m: r[m][key] for m in modes}
            cells = "".join(f"{vals[m]:>12.1f}" for m in modes)
            base = vals.get("nchw_fp32")
            rat = "".join(
                f"{(vals[m] / base if base else float('nan')):>16.2f}"
                for m in modes
                if m != "nchw_fp32"
            )
            print(f"{backbone:<22}{size:>5}{cells}{rat}  {max(vals, key=vals.get)}")


if __name__ == "__main__":
    main()
