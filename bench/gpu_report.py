"""The GPU suite's figures from its parts' rows: a summary (goals measured vs target) and a markdown page.

Works on whatever rows a part left, so a part stopped at its cap still gives the figures it measured
(a median over the runs it finished, say), marked with the part's status.
"""
from __future__ import annotations

import statistics

# goal -> (target, how to read it); the goals for one H100
GOALS = {
    "sampling_ratio": (1.5, "ours / DiTPipeline images/s, DiT-XL/2 256 px, DDIM 50, guidance 4, batch 32, bf16"),
    "sampling_images_per_s": (16.0, "our sampler's images/s, same setting"),
    "driveditfit_images_per_s": (300.0, "driveditfit training images/s per GPU, DiT-XL/2 256 px, bf16"),
    "driveditfit_vs_full": (1.5, "driveditfit step rate / full's"),
    "encode_vs_codec": (0.9, "Ray Data encode pipeline after its start-up / codec alone on preloaded tensors "
                             "(images/s; end to end in the encode section)"),
    "serve_ratio": (3.0, "batched / unbatched throughput at 32 concurrent requests"),
}


def _rows(part: dict, kind: str) -> list[dict]:
    return [r for r in part.get("rows", []) if r.get("kind") == kind]


def _config(part: dict) -> dict:
    return next(iter(_rows(part, "config")), {})


def _sampling(part: dict) -> dict:
    cfg, out = _config(part), {}
    for side in sorted({r["side"] for r in _rows(part, "run")}):
        times = [r["seconds"] for r in _rows(part, "run") if r["side"] == side]
        med = statistics.median(times)
        row = {"runs": len(times), "median_s": med, "images_per_s": cfg.get("batch", 0) / med}
        if cfg.get("flop_per_call"):
            row["dit_tflops"] = cfg["flop_per_call"] / med / 1e12
            if cfg.get("peak_tflops"):
                row["percent_of_bf16_peak"] = 100 * row["dit_tflops"] / cfg["peak_tflops"]
        out[side] = row
    warm = {r["side"]: r["seconds"] for r in _rows(part, "warmup")}
    return {"sides": out, "first_call_s": warm}


def _finetune(part: dict) -> list[dict]:
    rows = [r for r in _rows(part, "method") if "error" not in r]
    full = {r["compile"]: r["step_s"] for r in rows if r["method"] == "full"}
    eager = {r["method"]: r["step_s"] for r in rows if r["compile"] == "off"}
    for r in rows:
        if r["compile"] in full:
            r["speedup_vs_full"] = full[r["compile"]] / r["step_s"]
        if r["compile"] != "off" and r["method"] in eager:
            r["speedup_vs_eager"] = eager[r["method"]] / r["step_s"]
    return rows + [r for r in _rows(part, "method") if "error" in r]


def summarise(parts: list[dict], env: dict) -> dict:
    """Goal figures found in the parts' rows: {goal: {"value", "target", "met"}} plus each part's figures."""
    by = {p["part"]: p for p in parts}
    figures, goals = {}, {}

    def goal(name: str, value: float | None) -> None:
        if value is not None:
            target = GOALS[name][0]
            goals[name] = {"value": value, "target": target, "met": None if env.get("dry_run") else value >= target}

    if "sampling" in by:
        s = figures["sampling"] = _sampling(by["sampling"])
        ours, theirs = s["sides"].get("ours"), s["sides"].get("diffusers")
        goal("sampling_images_per_s", ours and ours["images_per_s"])
        goal("sampling_ratio", ours and theirs and ours["images_per_s"] / theirs["images_per_s"])
    if "sampling_compiled" in by:
        s = figures["sampling_compiled"] = _sampling(by["sampling_compiled"])
        a, b = s["sides"].get("ours"), s["sides"].get("ours eager")
        if a and b:
            s["compiled_vs_eager"] = a["images_per_s"] / b["images_per_s"]
    for name in ("finetune", "finetune_compiled"):
        if name in by:
            figures[name] = _finetune(by[name])
    eager = {r["method"]: r for r in figures.get("finetune", []) if r.get("compile") == "off" and "step_s" in r}
    if "driveditfit" in eager:
        goal("driveditfit_images_per_s", eager["driveditfit"]["images_per_s"])
        goal("driveditfit_vs_full", eager["driveditfit"].get("speedup_vs_full"))
    if "encode" in by:
        pipe = next(iter(_rows(by["encode"], "pipeline")), None)
        alone = {r["layout"]: r["images_per_s"] for r in _rows(by["encode"], "codec_alone")}
        figures["encode"] = {"pipeline": pipe, "codec_alone": alone}
        if pipe and alone:
            best = max(alone.values())  # the faster layout: the ceiling the pipeline is held to
            figures["encode"]["end_to_end_vs_codec"] = pipe["images_per_s"] / best
            goal("encode_vs_codec", pipe["after_startup_images_per_s"] / best)
    if "serve" in by:
        rows = _rows(by["serve"], "load")
        figures["serve"] = rows
        if rows:
            top = max(r["concurrency"] for r in rows)
            on = [r for r in rows if r["mode"] == "batched" and r["concurrency"] == top]
            off = [r for r in rows if r["mode"] == "unbatched" and r["concurrency"] == top]
            if on and off:
                goal("serve_ratio", on[0]["img_per_s"] / off[0]["img_per_s"])
    if "detect" in by:
        figures["detect"] = {"throughput": _rows(by["detect"], "throughput"), "ap": _rows(by["detect"], "ap"),
                             "plan": next(iter(_rows(by["detect"], "plan")), None)}
    if "checks" in by:
        figures["checks"] = {"attention": _rows(by["checks"], "attention"),
                             "host_sync": _rows(by["checks"], "host_sync")}
    return {"goals": goals, "figures": figures}


def _f(x, fmt: str = "{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def markdown(results: dict) -> str:
    env, parts, summary = results["environment"], results["parts"], results["summary"]
    figs, dry = summary["figures"], env.get("dry_run")
    lines = ["# GPU suite results", ""]
    if dry:
        lines += ["**CPU DRY RUN: tiny shapes on the CPU. These numbers check that the suite runs; they are not "
                  "performance figures and meet no goal.**", ""]
    lines += [f"Machine: {env.get('gpu') or 'no GPU'}; {env.get('cpu_cores')} CPU cores, load average "
              f"{env.get('load_average_1m')} at start; torch {env.get('torch')}, CUDA {env.get('cuda') or '—'}; "
              f"commit {env.get('commit') or '?'}; started {env.get('started_utc')} UTC; wall "
              f"{env.get('wall_s', '(running)')} s.", f"Command: `{env.get('command')}`", "",
              "| part | status | seconds | cap s | note |", "|---|---|---|---|---|"]
    for p in parts:
        note = "; ".join(r.get("reason") or r.get("text") for r in p.get("rows", []) if r["kind"] in ("skip", "note"))
        lines.append(f"| {p['part']} | {p['status']} | {p['seconds']} | {p['cap_s']:.0f} | "
                     f"{note or p.get('reason', '')} |")
    lines += ["", "## Goals", "", "| goal | measured | target | met |", "|---|---|---|---|"]
    for name, (target, what) in GOALS.items():
        g = summary["goals"].get(name)
        met = "dry run" if dry else ("not measured" if g is None else ("yes" if g["met"] else "no"))
        lines.append(f"| {what} | {_f(g and g['value'])} | ≥ {target:g} | {met} |")
    if "sampling" in figs or "sampling_compiled" in figs:
        lines += ["", "## Sampling", "", "| part | side | runs | median s | images/s | DiT TFLOP/s | % bf16 peak | "
                  "first call s |", "|---|---|---|---|---|---|---|---|"]
        for part in ("sampling", "sampling_compiled"):
            for side, r in figs.get(part, {}).get("sides", {}).items():
                lines.append(f"| {part} | {side} | {r['runs']} | {r['median_s']:.3f} | {r['images_per_s']:.2f} | "
                             f"{_f(r.get('dit_tflops'), '{:.1f}')} | {_f(r.get('percent_of_bf16_peak'), '{:.1f}')} | "
                             f"{_f(figs[part]['first_call_s'].get(side), '{:.1f}')} |")
    if "finetune" in figs or "finetune_compiled" in figs:
        lines += ["", "## Fine-tuning step", "", "| part | method | compile | batch | step ms | images/s | vs full | "
                  "vs eager | peak GiB | trainable | warm-up s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for part in ("finetune", "finetune_compiled"):
            for r in figs.get(part, []):
                if "error" in r:
                    lines.append(f"| {part} | {r['method']} | {r['compile']} | {r['error']} ||||||||")
                    continue
                peak = r.get("peak_bytes") and r["peak_bytes"] / 2**30
                lines.append(f"| {part} | {r['method']} | {r['compile']} | {r['batch']} | {1000 * r['step_s']:.1f} | "
                             f"{r['images_per_s']:.1f} | {_f(r.get('speedup_vs_full'), '{:.2f}×')} | "
                             f"{_f(r.get('speedup_vs_eager'), '{:.2f}×')} | {_f(peak, '{:.1f}')} | "
                             f"{r['trainable']:,} | {r['warmup_s']:.1f} |")
    if "encode" in figs and figs["encode"]["pipeline"]:
        e = figs["encode"]
        lines += ["", "## VAE encode", "", f"Pipeline {e['pipeline']['images_per_s']:.1f} images/s end to end "
                  f"({e['pipeline']['frames']} frames in {e['pipeline']['seconds']:.1f} s, first rows after "
                  f"{e['pipeline']['first_rows_s']:.1f} s; {e['pipeline']['after_startup_images_per_s']:.1f} "
                  "images/s after start-up); codec alone: "
                  + ", ".join(f"{k} {v:.1f} images/s" for k, v in e["codec_alone"].items())
                  + f"; end to end / codec alone {_f(e.get('end_to_end_vs_codec'))}."]
    if figs.get("serve"):
        lines += ["", "## Serve", "", "| mode | concurrency | images/s | p50 ms | p99 ms | mean batch |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['mode']} | {r['concurrency']} | {r['img_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
                  f"| {r['mean_batch']:.1f} |" for r in figs["serve"]]
    if figs.get("detect") and figs["detect"]["throughput"]:
        d, ap = figs["detect"], {r["backbone"]: r for r in figs["detect"]["ap"]}
        base = d["throughput"][0]["images_per_s_per_worker"]
        steps = d["plan"]["steps"] if d["plan"] else None
        lines += ["", "## Detector training", "", f"Training images/s per worker (batch {d['throughput'][0]['batch']}) "
                  f"and validation AP50 after {_f(steps, '{}')} steps each, vs {d['throughput'][0]['backbone']}.", "",
                  "| backbone | images/s | vs first | peak GiB | trainable | AP50 | mAP |", "|---|---|---|---|---|---|---|"]
        for r in d["throughput"]:
            a = ap.get(r["backbone"], {})
            lines.append(f"| {r['backbone']} | {r['images_per_s_per_worker']:.1f} | "
                         f"{r['images_per_s_per_worker'] / base:.2f}× | {r['peak_mem_gib']:.1f} | {r['trainable']:,} | "
                         f"{_f(a.get('AP50'), '{:.3f}')} | {_f(a.get('mAP'), '{:.3f}')} |")
    if "checks" in figs:
        c = figs["checks"]
        lines += ["", "## Checks", "", "| check | result | detail |", "|---|---|---|"]
        for r in c["attention"]:
            detail = r.get("error") or f"{r['sdpa_calls']} SDPA calls for {r['blocks']} blocks, kernels {r['kernels']}"
            lines.append(f"| attention: {r['path']} | {'ok' if r['ok'] else 'FAIL'} | {detail} |")
        for r in c["host_sync"]:
            detail = "; ".join(r["in_loop"][:2]) or f"none in the loop ({len(r['per_call'])} per call, set-up)"
            if "cuda_sync_warnings" in r:
                detail += f"; torch sync-debug warnings at 2 / 4 steps: {r['cuda_sync_warnings']}"
            lines.append(f"| host syncs: {r['loop']} ({r['device']}) | {'ok' if r['ok'] else 'FAIL'} | {detail} |")
    return "\n".join(lines) + "\n"
