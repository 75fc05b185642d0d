"""The GPU suite: every GPU goal measured in one command of about six minutes, each against its baseline.

    python bench/gpu_suite.py --out runs/bench-gpu            # on a CUDA machine (make bench-gpu)
    python bench/gpu_suite.py --out /tmp/suite --dry-run      # the same code on the CPU, tiny shapes

Parts, in this order (each its own process, so a crash, an out-of-memory or a cap stops only that part):
checks (attention kernel of every DiT path, host syncs inside the sampling and training loops),
sampling (ours vs diffusers DiTPipeline), finetune (each method: step time, images/s, peak memory),
encode (Ray Data pipeline vs the codec alone), serve (batched vs unbatched at 32 concurrent), detect
(when drivedit.detect exists), finetune_compiled (driveditfit and full, eager vs torch.compile),
sampling_compiled (ours compiled vs eager). A part is stopped at its cap, and the whole suite at
--total-cap; every figure measured before that is kept: parts append rows to --out/rows.jsonl as they
measure them, and the suite rewrites results.json and results.md every few seconds. --out holds those
three files only (a GPU machine gives back few files).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu_report import markdown, summarise  # noqa: E402

# the goals first, the compiled variants (minutes of compilation on a GPU) last
ORDER = ("checks", "sampling", "finetune", "encode", "serve", "detect", "finetune_compiled", "sampling_compiled")
CAPS = {"checks": 40, "sampling": 75, "finetune": 75, "encode": 60, "serve": 75, "detect": 30,
        "finetune_compiled": 120, "sampling_compiled": 90}  # seconds; --total-cap bounds their sum
TICK_S = 10  # how often results are rewritten while a part runs
GRACE_S = 15  # after SIGTERM, before SIGKILL: time for a part to shut Ray down


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory for results.json, results.md, rows.jsonl")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the code, measures nothing")
    p.add_argument("--parts", nargs="+", choices=ORDER, default=list(ORDER), help="parts to run (default: all)")
    p.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS",
                   help=f"a part's time cap (defaults: {', '.join(f'{k} {v}' for k, v in CAPS.items())})")
    p.add_argument("--total-cap", type=float, default=None,
                   help="seconds for the whole suite (default 360; dry run 1800): parts that would start later "
                        "are reported as not run")
    args = p.parse_args(argv)
    # a dry run measures nothing, so a busy shared CPU should not stop it: five times the caps
    problems, caps = [], {k: v * (5 if args.dry_run else 1) for k, v in CAPS.items()}
    if args.total_cap is None:
        args.total_cap = 1800.0 if args.dry_run else 360.0
    for item in args.cap:
        part, _, seconds = item.partition("=")
        try:
            if part not in CAPS or float(seconds) <= 0:
                raise ValueError
            caps[part] = float(seconds)
        except ValueError:
            problems.append(f"--cap {item!r}: expected PART=SECONDS with PART one of {', '.join(ORDER)} and "
                            "SECONDS > 0")
    if args.total_cap <= 0:
        problems.append("--total-cap must be > 0 seconds")
    if problems:
        p.error("; ".join(problems))
    args.caps = caps
    args.parts = [part for part in ORDER if part in args.parts]  # always in the suite's order
    return args


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the part's process group (the part shuts Ray down), SIGKILL after GRACE_S."""
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _part_rows(rows_path: Path, part: str) -> list[dict]:
    rows = []
    for line in rows_path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short when its part was killed
            continue
        if row.get("part") == part:
            rows.append(row)
    return rows


def run_part(part: str, cap: float, rows_path: Path, dry_run: bool, on_tick=None) -> dict:
    """Run one part in its own process group under `cap` seconds; its rows are its lines of `rows_path`.
    `on_tick(partial)` gets the part's state every TICK_S seconds while it runs."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")]
                                                                      if p]), PYTHONUNBUFFERED="1",
               DRIVEDIT_PART_CAP_S=str(cap))  # a part may size itself to its cap
    env.pop("RAY_ADDRESS", None)  # a part starts its own local Ray, never joins another one
    cmd = [sys.executable, "-m", "bench.gpu_parts", part, "--rows", str(rows_path)] + (["--dry-run"] * dry_run)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)

    def state(status: str, rc=None) -> dict:
        rows = _part_rows(rows_path, part)
        if status == "ok" and any(r["kind"] == "skip" for r in rows):
            status = "skipped"
        return {"part": part, "status": status, "returncode": rc, "seconds": round(time.perf_counter() - t0, 1),
                "cap_s": cap, "rows": rows}

    try:
        while True:
            try:
                rc = proc.wait(timeout=max(0.1, min(TICK_S, cap - (time.perf_counter() - t0))))
                return state("ok" if rc == 0 else "failed", rc)
            except subprocess.TimeoutExpired:
                if time.perf_counter() - t0 >= cap:
                    _stop(proc)
                    return state("timed out", proc.returncode)
                if on_tick is not None:
                    on_tick(state("running"))
    except BaseException:  # Ctrl-C or SIGTERM on the suite: stop the part too, then let it through
        _stop(proc)
        raise


def environment(dry_run: bool) -> dict:
    import torch

    env = {"started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "dry_run": dry_run,
           "command": " ".join([Path(sys.executable).name] + sys.argv), "python": platform.python_version(),
           "torch": torch.__version__, "cpu_cores": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
           "host": platform.node()}
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env["commit"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def write_results(out: Path, env: dict, parts: list[dict]) -> None:
    from drivedit.storage import write_text_atomic

    results = {"environment": env, "parts": parts, "summary": summarise(parts, env)}
    write_text_atomic(str(out / "results.json"), json.dumps(results, indent=1, default=str))
    write_text_atomic(str(out / "results.md"), markdown(results))


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device is visible. Run it on a GPU machine, or pass --dry-run to check the "
              "code on the CPU with tiny shapes.", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "rows.jsonl"
    rows_path.write_text("")
    # the device's own time limit stops the suite with SIGTERM: unwind (stopping the running part) so
    # the results written so far stay whole
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = environment(args.dry_run)
    env["total_cap_s"] = args.total_cap
    print(f"gpu_suite: {'DRY RUN (CPU, tiny shapes)' if args.dry_run else env.get('gpu')}; parts "
          f"{', '.join(args.parts)}; total cap {args.total_cap:.0f} s; results in {args.out}", flush=True)
    start, done, running = time.perf_counter(), [], {}

    def tick(partial: dict) -> None:
        running["now"] = partial
        write_results(args.out, env, done + [partial])

    for part in args.parts:
        left = args.total_cap - (time.perf_counter() - start)
        if left < 5:
            done.append({"part": part, "status": "not run", "reason": "the suite's --total-cap was reached",
                         "seconds": 0.0, "cap_s": 0.0, "rows": []})
        else:
            print(f"\n== {part} (cap {min(args.caps[part], left):.0f} s)", flush=True)
            running["now"] = {"part": part, "status": "running", "seconds": 0.0, "cap_s": min(args.caps[part], left),
                              "rows": []}
            try:
                done.append(run_part(part, min(args.caps[part], left), rows_path, args.dry_run, on_tick=tick))
            except (KeyboardInterrupt, SystemExit):  # the suite was stopped: keep what the part measured
                stopped = dict(running["now"], status="stopped with the suite",
                               rows=_part_rows(rows_path, part))
                write_results(args.out, env, done + [stopped])
                raise
            print(f"== {part}: {done[-1]['status']} after {done[-1]['seconds']} s", flush=True)
        write_results(args.out, env, done)
    env["wall_s"] = round(time.perf_counter() - start, 1)
    write_results(args.out, env, done)
    print("\n" + (args.out / "results.md").read_text(), flush=True)
    return 1 if any(p["status"] == "failed" for p in done) else 0


if __name__ == "__main__":
    sys.exit(main())
