"""Load on the QA node: concurrent storescu senders -> node -> Orthanc, torch and ONNX backends.

    python experiments/bench/node.py [--studies 60] [--senders 4] [--size 224] [--backends torch onnx]
        [--rate STUDIES_PER_S] [--check-processes N] [--forward-workers N] [--no-report]

Each study is a V/Q pair as a camera sends it: a ventilation and a perfusion series of two
instances each (ANTERIOR, POSTERIOR), one storescu association per study, ``--senders`` senders
at once. The node (`python -m lung_cls.node`, its own process) checks every series on its anterior
image with a scratch resnet18 (speed does not depend on the weights) and forwards to a local
Orthanc (`lung_cls.node.orthanc`). ``hold=[]`` so every instance is forwarded and timed.

Printed per backend, from the node's own audit log:

* sustained rate: instances and studies per second, first receive to last forward;
* receive-to-forward latency per instance (received_at -> forwarded_at), p50 and p95;
* the same from the moment the series was complete (its last instance received), which leaves out
  the wait for the rest of the series;

and the targets: >= 20 studies/s sustained, p95 < 2 s. Then, measured alone on this process after
the load: the CPU of one series check (QA gate, model, SR) and of the model's pass, and from them
how many cores the goal would need. ``--rate`` paces the sends (study k at k / rate seconds), for
the latency at a sustained load rather than the backlog of a burst. The checkpoint carries an OOD
reference, as a trained one does (``--no-ood``: without), so the check runs the image gate.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _bench_predict():
    spec = importlib.util.spec_from_file_location(
        "bench_predict", Path(__file__).with_name("predict.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_studies(folder: Path, n: int, seed: int) -> list[list[Path]]:
    """``n`` V/Q studies: per study the files of its two series (2 instances each)."""
    from pydicom.uid import generate_uid

    from lung_cls.data.dicomio import write_nm_dicom
    from lung_cls.data.phantom import simulate_cohort

    cases = simulate_cohort({}, n, n, seed)
    perf = [c for c in cases if c.label == 1]
    vent = [c for c in cases if c.label == 0]
    studies = []
    for i in range(n):
        study_uid, files = generate_uid(), []
        for case, desc in ((vent[i], "LUNG VENT"), (perf[i], "LUNG PERFUSION")):
            series_uid = generate_uid()
            for view in ("ANTERIOR", "POSTERIOR"):
                p = folder / f"s{i:04d}_{case.label}_{view}.dcm"
                write_nm_dicom(
                    p, case.image, patient_id=f"B{i:04d}", series_description=f"{desc} {view[:3]}",
                    view=view, study_uid=study_uid, series_uid=series_uid,
                    StudyDescription="NM LUNG V/Q",
                )  # fmt: skip
                files.append(p)
        studies.append(files)
    return studies


def storescu(port: int, files: list[Path]) -> int:
    return subprocess.run(
        ["storescu", "-aet", "CAMERA", "-aec", "LUNG_QA", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
    ).returncode


def rows_of(spool: Path) -> list[dict]:
    db = sqlite3.connect(str(spool / "audit.sqlite"), timeout=30)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM instances")]
    finally:
        db.close()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (the node's check
    processes), all threads, from /proc."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += cpu_s(int(child))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def run_backend(name: str, model_arg: str, args, pacs, work: Path) -> dict:
    from lung_cls.node.orthanc import free_port

    spool = work / f"spool-{name}"
    port = free_port()
    log = open(work / f"node-{name}.log", "wb")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "lung_cls.node", model_arg, f"spool={spool}", f"listen.port={port}",
        f"forward.port={pacs.dicom_port}", "forward.ae_title=ORTHANC", "hold=[]",
        f"series.quiet_s={args.quiet}", f"threads={args.threads}", f"report={not args.no_report}",
        f"forward.workers={args.forward_workers}", f"check.processes={args.check_processes}",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while "ready:" not in (work / f"node-{name}.log").read_text(errors="replace"):
            if proc.poll() is not None:
                raise SystemExit((work / f"node-{name}.log").read_text()[-3000:])
            time.sleep(0.2)
        warm = write_studies(work / f"warm-{name}", 1, seed=99)
        storescu(port, warm[0])
        wait_all(spool, 4 + (0 if args.no_report else 2))
        studies = write_studies(work / f"in-{name}", args.studies, seed=args.seed)
        queue = list(enumerate(studies))[::-1]
        lock = threading.Lock()
        failures = []

        def sender():
            while True:
                with lock:
                    if not queue:
                        return
                    k, files = queue.pop()
                if args.rate:  # study k is sent at t0 + k / rate (if a sender is free by then)
                    time.sleep(max(0.0, t0 + k / args.rate - time.time()))
                if storescu(port, files) != 0:
                    failures.append(files[0])

        t0 = time.time()
        cpu0 = cpu_s(proc.pid), cpu_s(pacs.proc.pid)
        threads = [threading.Thread(target=sender) for _ in range(args.senders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_sent = time.time()
        per_study = 4 + (0 if args.no_report else 2)  # instances + one report per checked series
        n_expected = 4 + (0 if args.no_report else 2) + args.studies * per_study
        rows = wait_all(spool, n_expected)
        cpu = cpu_s(proc.pid) - cpu0[0], cpu_s(pacs.proc.pid) - cpu0[1]
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    bench = [r for r in rows if r["received_at"] and ts(r["received_at"]) >= t0]
    received = [r for r in bench if r["status"] != "report"]
    first = min(ts(r["received_at"]) for r in received)
    last = max(ts(r["forwarded_at"]) for r in bench)
    lat = [ts(r["forwarded_at"]) - ts(r["received_at"]) for r in received]
    series_done = {}
    for r in received:
        s = r["series_instance_uid"]
        series_done[s] = max(series_done.get(s, 0.0), ts(r["received_at"]))
    lat_complete = [ts(r["forwarded_at"]) - series_done[r["series_instance_uid"]] for r in received]
    span = last - first
    return {
        "backend": name,
        "instances": len(received),
        "failures": len(failures),
        "span_s": span,
        "send_s": t_sent - t0,
        "inst_per_s": len(received) / span,
        "studies_per_s": args.studies / span,
        "p50": float(np.percentile(lat, 50)),
        "p95": float(np.percentile(lat, 95)),
        "p50_complete": float(np.percentile(lat_complete, 50)),
        "p95_complete": float(np.percentile(lat_complete, 95)),
        "statuses": sorted({r["status"] for r in bench}),
        "cpu": cpu,
    }


def check_cost(name: str, model_path: Path, series: list[Path], args, repeats: int = 10) -> dict:
    """CPU seconds of one series check as a check process does it (`check_and_report`: headers,
    QA gate, model, SR) and of the model's forward pass alone, on this process, 1 thread."""
    from lung_cls.node.check import LungRule
    from lung_cls.node.workers import CheckContext, check_and_report
    from lung_cls.qa.backends import load_onnx_ensemble, load_torch_ensemble
    from lung_cls.qa.batch import PredictOptions

    if name == "onnx":
        ens = load_onnx_ensemble([model_path], threads=args.threads)
    else:
        import torch

        torch.set_num_threads(args.threads)
        ens = load_torch_ensemble([model_path])
    ctx = CheckContext(LungRule(), PredictOptions(batch_size=1), not args.no_report, "LUNG_QA", "b")
    files = [(str(k), p) for k, p in enumerate(series)]
    x = np.zeros((1, args.size, args.size), np.uint8)

    def cpu(fn) -> float:
        fn()  # warm
        t = time.process_time()
        for _ in range(repeats):
            fn()
        return (time.process_time() - t) / repeats

    return {
        "check": cpu(lambda: check_and_report(ens, files, ctx)),
        "model": cpu(lambda: ens.probs_and_ood(x, 1)),
        "two_pass": cpu(lambda: (ens.member_probs(x, 1), ens.ood_scores(x, 1))),
        "ood": ens.has_ood,
    }


def attach_reference(ckpt: Path, size: int, seed: int) -> None:
    """Give the scratch checkpoint the image gate's OOD reference, fitted on phantom studies, as
    training gives a real one: the check then runs the gate's features, as in deployment."""
    import torch

    from lung_cls.data.phantom import simulate_cohort
    from lung_cls.data.preprocess import prep_config, preprocess_set
    from lung_cls.models.classifier import load_lung_net
    from lung_cls.qa.ood import (
        REFERENCE_KEY,
        build_reference,
        net_features,
        pixel_vectors,
        to_storable,
    )

    cases = simulate_cohort({}, 40, 40, seed + 7)
    images, _ = preprocess_set([c.image for c in cases], prep_config({"size": size}))
    net, _ = load_lung_net(str(ckpt))
    feats = net_features(net, torch.from_numpy(images).float()[:, None] / 255.0)
    pix = pixel_vectors(images)
    ref = build_reference(
        {"features": feats[:60], "pixels": pix[:60]}, {"features": feats[60:], "pixels": pix[60:]}
    )
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)
    stored[REFERENCE_KEY] = to_storable(ref)
    torch.save(stored, ckpt)


def wait_all(spool: Path, n: int, timeout: float = 900) -> list[dict]:
    end = time.time() + timeout
    while time.time() < end:
        if (spool / "audit.sqlite").exists():
            rows = rows_of(spool)
            if len(rows) >= n and all(r["state"] == "forwarded" for r in rows):
                return rows
        time.sleep(0.2)
    raise SystemExit(f"{spool}: not everything forwarded in {timeout:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--studies", type=int, default=60)
    p.add_argument("--senders", type=int, default=4)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--quiet", type=float, default=3.0, help="series.quiet_s of the node")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backends", nargs="+", default=["torch", "onnx"])
    p.add_argument("--no-report", action="store_true", help="report=false: no SR per series")
    p.add_argument(
        "--no-ood", action="store_true",
        help="a checkpoint without the image gate's OOD reference (no feature scores)",
    )  # fmt: skip
    p.add_argument(
        "--forward-workers", type=int, default=2, help="forward.workers: associations to the PACS"
    )
    p.add_argument(
        "--check-processes", type=int, default=1,
        help="check.processes: worker processes the check runs in (0: in the node's process)",
    )  # fmt: skip
    p.add_argument(
        "--rate", type=float, default=None,
        help="studies per second offered (paced sends); default: as fast as the senders go",
    )  # fmt: skip
    p.add_argument("--work", type=Path, default=None, help="keep spools and logs here")
    args = p.parse_args()
    if shutil.which("Orthanc") is None or shutil.which("storescu") is None:
        raise SystemExit("needs Orthanc and storescu on PATH (apt-get install -y orthanc dcmtk)")
    from lung_cls.node.orthanc import OrthancPacs
    from lung_cls.qa.onnx import export_checkpoint

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench-node-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt = work / "scratch.ckpt"
        _bench_predict().save_scratch_checkpoint(ckpt, "resnet18", args.size)
        if not args.no_ood:
            attach_reference(ckpt, args.size, args.seed)
        models = {"torch": f"ckpt={ckpt}"}
        if "onnx" in args.backends:
            export_checkpoint(ckpt, work / "onnx")
            models["onnx"] = f"onnx={work / 'onnx'}"
        pacs = OrthancPacs(work / "pacs").start()
        try:
            results = [run_backend(b, models[b], args, pacs, work) for b in args.backends]
        finally:
            pacs.stop()
        one_series = write_studies(work / "cost", 1, seed=98)[0][:2]
        paths = {"torch": ckpt, "onnx": work / "onnx"}
        for r in results:  # measured after the load, alone on this process
            r["cost"] = check_cost(r["backend"], paths[r["backend"]], one_series, args)
    print(
        f"{args.studies} V/Q studies x 2 series x 2 instances, {args.senders} concurrent storescu, "
        f"resnet18 at {args.size} px, series.quiet_s={args.quiet}, complete_on_release=true, "
        f"forward.workers={args.forward_workers}, check.processes={args.check_processes}, "
        f"report={not args.no_report}, offered "
        f"{f'{args.rate:g} studies/s' if args.rate else 'as fast as the senders go'}"
    )
    for r in results:
        print(
            f"{r['backend']:5s}  {r['instances']} instances in {r['span_s']:.1f} s "
            f"(sent in {r['send_s']:.1f} s, {r['failures']} failed sends): "
            f"{r['inst_per_s']:.1f} instances/s = {r['studies_per_s']:.2f} studies/s "
            f"(target >= 20, ratio {r['studies_per_s'] / 20:.2f})"
        )
        print(
            f"       receive->forward latency p50 {r['p50']:.2f} s  p95 {r['p95']:.2f} s "
            f"(target < 2 s, ratio {r['p95'] / 2:.2f});  from series complete p50 "
            f"{r['p50_complete']:.2f} s  p95 {r['p95_complete']:.2f} s;  statuses {r['statuses']}"
        )
        node_cpu, pacs_cpu = (c / args.studies for c in r["cpu"])
        print(
            f"       CPU per study: node {node_cpu:.3f} s, Orthanc {pacs_cpu:.3f} s -> two free "
            f"cores would carry ~{2 / (node_cpu + pacs_cpu):.1f} studies/s (node alone "
            f"{2 / node_cpu:.1f}); a projection from CPU time, not a measured rate"
        )
        c = r["cost"]
        rest = node_cpu - 2 * c["check"]
        print(
            f"       of which: 2 series checks x {c['check']:.3f} s (the model's pass "
            f"{c['model']:.3f} s of each{', with the gate features' if c['ood'] else ''}; "
            f"probabilities and features in two passes: {c['two_pass']:.3f} s) + "
            f"{rest:.3f} s DICOM in/out, spool and audit (measured alone, 1 thread)"
        )
        print(
            f"       floor at the goal (20 studies/s = 40 checks/s): the model alone needs "
            f"{40 * c['model']:.2f} cores, the checks {40 * c['check']:.2f}, checks + DICOM + "
            f"Orthanc {20 * (node_cpu + pacs_cpu):.2f}; this machine has {os.cpu_count()}"
        )


if __name__ == "__main__":
    main()
