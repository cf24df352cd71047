"""Per-job cost of selection + dispatch of the four hooks, against calling the implementations directly.

    python benchmarks/dispatch.py [--jobs 20000] [--repeat 5]

The hook implementations are trivial (they return prebuilt results), so what is
measured is the machinery: the policy's plan for the job (with a canary ratio, so a
hash per job is included), four dispatcher calls with telemetry, against four plain
function calls. Target: under 50 microseconds per job for the four hooks together.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from contentdownload import hookimpl
from contentdownload.machinery.config import parse_config
from contentdownload.machinery.flags import FlagLayer
from contentdownload.hooks.model import (
    FinalizeContext,
    FinalizeResult,
    Job,
    JobKey,
    JobKeyContext,
    ResumeContext,
    ResumeDecision,
    StagePaths,
    StreamContext,
    StreamResult,
)
from contentdownload.machinery.runtime import Runtime

TARGET_US = 50.0

JOB = Job("http://example.com/a.pdf")
KEY = JobKey(key="0" * 64, scheme="bench")
PATHS = StagePaths.for_key(Path("/tmp/out/a.pdf"), Path("/tmp/out/.staging"), KEY.key)
DECISION = ResumeDecision(mode="fresh", reason="bench")
STREAM = StreamResult(status="complete", sha256="0" * 64, total_size=1)
FINAL = FinalizeResult(ok=True, path=PATHS.final, size=1, sha256="0" * 64)


class BenchPlugin:
    @hookimpl
    def job_key(self, ctx):
        return KEY

    @hookimpl
    def resume_decision(self, ctx):
        return DECISION

    @hookimpl
    def stream_io(self, ctx):
        return STREAM

    @hookimpl
    def finalize(self, ctx):
        return FINAL


def contexts():
    return (
        JobKeyContext(job=JOB, relative_path="a.pdf"),
        ResumeContext(job=JOB, job_key=KEY, url=JOB.url, paths=PATHS),
        StreamContext(job=JOB, job_key=KEY, url=JOB.url, paths=PATHS, decision=DECISION, http=None),  # type: ignore[arg-type]
        FinalizeContext(job=JOB, job_key=KEY, paths=PATHS, stream=STREAM),
    )


def run_direct(n: int, plugin: BenchPlugin) -> float:
    k, r, s, f = contexts()
    started = time.perf_counter()
    for _ in range(n):
        plugin.job_key(k)
        plugin.resume_decision(r)
        plugin.stream_io(s)
        plugin.finalize(f)
    return (time.perf_counter() - started) / n * 1e6


def run_dispatched(n: int, runtime: Runtime, keys: list[str]) -> float:
    k, r, s, f = contexts()
    call, plan = runtime.dispatcher.call, runtime.policy.plan
    started = time.perf_counter()
    for i in range(n):
        selections = plan(keys[i])
        call(selections["job_key"], k)
        call(selections["resume_decision"], r)
        call(selections["stream_io"], s)
        call(selections["finalize"], f)
    return (time.perf_counter() - started) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    plugin = BenchPlugin()
    pins = {h: "bench" for h in ("job_key", "resume_decision", "stream_io", "finalize")}
    # Pinned with fallback allowed: every chain is [bench, streaming, legacy]; the ratio makes
    # the config layer canary-aware, so plan() hashes each job key.
    runtime = Runtime(
        cli=FlagLayer(source="cli", pins=pins, allow_fallback=True),
        config=parse_config({"streaming_ratio": 0.5}, "bench"),
        environ={},
        extra_plugins={"bench": plugin},
    )
    canary = Runtime(config=parse_config({"streaming_ratio": 0.5}, "bench"), environ={})
    keys = [f"{i:064x}" for i in range(args.jobs)]

    direct, dispatched, planning = [], [], []
    for _ in range(args.repeat):
        direct.append(run_direct(args.jobs, plugin))
        dispatched.append(run_dispatched(args.jobs, runtime, keys))
        started = time.perf_counter()
        for key in keys:
            canary.policy.plan(key)
        planning.append((time.perf_counter() - started) / args.jobs * 1e6)
    d, x, p = statistics.median(direct), statistics.median(dispatched), statistics.median(planning)
    total = x + p
    print(f"{'variant':<34} {'us/job':>9} {'ratio':>8}")
    print(f"{'direct calls (4 hooks)':<34} {d:>9.2f} {1.0:>8.1f}")
    print(f"{'plan + dispatch (4 hooks)':<34} {x:>9.2f} {x / d:>8.1f}")
    print(f"{'canary plan (hash per job)':<34} {p:>9.2f} {'':>8}")
    verdict = "PASS" if total < TARGET_US else "FAIL"
    print(f"policy + dispatch per job: {total:.2f} us (target < {TARGET_US:.0f} us): {verdict}  [{args.jobs} jobs x {args.repeat}, medians]")
    return 0 if total < TARGET_US else 1


if __name__ == "__main__":
    sys.exit(main())
