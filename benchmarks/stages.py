"""Where a real-mode audit's time goes, stage by stage, next to one eager forward.

    python benchmarks/stages.py [--model resnet50] [--batch 1] [--size 224] [--repeats 7]

Runs each stage of ``nhwc_audit.audit`` on its own (interleaved rounds, median) with the same
internals the audit uses, so the stage times add up to roughly the audit's time. No
assertions: a table to read.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torchvision.models as tvm

import nhwc_audit
from nhwc_audit.analyze.analysis import analyze
from nhwc_audit.capture.fx import trace
from nhwc_audit.prepare.copy import prepare_audit_copy, prepare_inputs
from nhwc_audit.propagate.chain import replay_check
from nhwc_audit.propagate.interpreter import propagate
from nhwc_audit.propagate.runner import Runner
from nhwc_audit.propagate.skeleton import Skeleton


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    torch.manual_seed(0)
    model = getattr(tvm, a.model)(weights=None).eval()
    x = torch.randn(a.batch, 3, a.size, a.size)
    cl_model, cl_x = nhwc_audit.convert(model), x.contiguous(memory_format=torch.channels_last)
    cp = prepare_audit_copy(model)
    cap = trace(cp.module)
    (sample,), _ = prepare_inputs((x,), {}, dtype=None, device=torch.device("cpu"))

    class Plain(torch.fx.Interpreter):
        pass

    def forward() -> None:
        with torch.no_grad():
            cl_model(cl_x)

    def interp() -> None:
        with torch.no_grad():
            Plain(cap.root, graph=cap.graph, garbage_collect_values=True).run(sample.clone())

    def prop(record_hidden: bool, shared: bool, outline: bool) -> Callable[[], Any]:
        def run() -> Any:
            skeleton = Skeleton() if outline else None
            recs, out = propagate(
                cap.root,
                (sample.clone(),),
                {},
                graph=cap.graph,
                record_hidden=record_hidden,
                shared=cp.shared if shared else frozenset(),
                skeleton=skeleton,
            )
            return recs, out, skeleton

        return run

    recs, out, skeleton = prop(True, True, True)()

    def replay() -> None:
        t = time.perf_counter()
        why = replay_check(cap, skeleton, (sample,), {}, Runner(shared=cp.shared))
        replay_times.append(time.perf_counter() - t)
        assert why is None, why

    replay_times: list[float] = []
    stages: dict[str, Callable[[], Any]] = {
        "eager channels_last forward": forward,
        "audit() end to end": lambda: nhwc_audit.audit(model, x, bandwidth=1e10),
        "private copy (prepare_audit_copy)": lambda: prepare_audit_copy(model),
        "fx trace": lambda: trace(cp.module),
        "graph run, plain fx.Interpreter": interp,
        "+ per-node records": prop(False, False, False),
        "+ dispatch-level recorder (hidden copies, weight guard)": prop(True, True, False),
        "+ the run's outline for the replay (no activation kept)": prop(True, True, True),
        "analysis (findings, fixes, regions)": lambda: analyze(recs, bandwidth=1e10, device="cpu"),
    }
    times: dict[str, list[float]] = {k: [] for k in stages}
    faults: dict[str, list[int]] = {k: [] for k in stages}
    for fn in stages.values():
        fn()  # warm-up
    # the audit pauses Python's cyclic collector (nhwc_audit.collector): so do the stages,
    # or a full collection set off inside one stage (~400k objects of torch's) is charged to it
    gc.disable()
    try:
        for _ in range(a.repeats):
            for k, fn in stages.items():
                before = _minor_faults()
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
                faults[k].append(_minor_faults() - before)
            replay()
            gc.collect()
    finally:
        gc.enable()
    med = {k: statistics.median(v) for k, v in times.items()}
    med["replay check (after the propagation)"] = statistics.median(replay_times)
    f = med["eager channels_last forward"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.model} {a.batch}x3x{a.size}x{a.size}")
    print("| stage | median | x forward | page faults (median) |")
    print("|---|---|---|---|")
    for k, v in med.items():
        fl = f"{statistics.median(faults[k]):,.0f}" if k in faults else ""
        print(f"| {k} | {v * 1e3:.1f} ms | {v / f:.2f} | {fl} |")
    print(
        "\nPage faults: the process's minor faults during the stage (getrusage). At larger batches a run's"
        "\ntime follows them: glibc's malloc gives large freed blocks back to the kernel and every fresh page"
        "\nfaults again, as many times as the allocation order dictates."
    )


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


if __name__ == "__main__":
    main()
