"""The downstream comparison's numbers: per-arm means and spreads over seeds, paired differences with a
t-interval, the goal verdict and the markdown table (bench/downstream.py).

Input: one record per detector run, {"arm": "real" | "mixed" | "control-<kind>", "seed": int, "metrics": the
run's scores/metrics.json, "steps": int, "real_epochs": float, "images_per_step": {dataset: n}}. Every value
in the table is in AP points (x 100). The difference of a metric is arm - base per seed (every arm of a
seed starts from the same weights and draws the same real frames), summarised as its mean and the 95 %
t-interval of that mean over the paired seeds (n - 1 degrees of freedom; none with a single seed). The main
comparison is mixed - real; a control arm (more real frames per step instead of synthetic ones) is compared
with both, so a gain of the mixed arm can be told from the gain of a larger batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ARMS = ("real", "mixed")
CONTROL_PREFIX = "control-"
SIZES = ("small", "medium", "large")


def metric_value(metrics: dict, key: str) -> float:
    """One number of a run in AP points: `AP50`, `scenario/<name>/AP50`, `size/<small>/AP`, `group/<a,b>/AP50`
    (the mean over those scenarios); NaN where COCO has no ground truth for it."""
    kind, _, rest = key.partition("/")
    if kind == "group":
        names, _, what = rest.rpartition("/")
        values = [metric_value(metrics, f"scenario/{n}/{what}") for n in names.split(",")]
        return float(np.mean(values)) if not any(math.isnan(v) for v in values) else math.nan
    if kind == "scenario":
        name, _, what = rest.rpartition("/")
        v = metrics["per_scenario"].get(name, {}).get("mAP" if what == "AP" else what)
    elif kind == "size":
        size, _, what = rest.partition("/")
        v = metrics.get(f"AP_{size}" if what == "AP" else f"AP50_{size}")
    else:
        v = metrics.get("mAP" if key == "AP" else key)
    return math.nan if v is None else 100.0 * float(v)


@dataclass
class Comparison:
    """One metric over two arms (`arm` against `base`, mixed against real by default): per-seed values, their
    mean and spread, the paired difference."""

    key: str
    base: list[float]
    arm: list[float]
    base_name: str = "real"
    arm_name: str = "mixed"

    @staticmethod
    def _mean_sd(v: list[float]) -> tuple[float, float]:
        a = np.asarray(v, float)
        return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else math.nan

    @property
    def diffs(self) -> np.ndarray:
        return np.asarray(self.arm, float) - np.asarray(self.base, float)

    def difference(self) -> tuple[float, float, float]:
        """(mean of arm - base over paired seeds, 95 % t-interval low, high); NaN bounds with one seed."""
        from scipy import stats

        d = self.diffs
        mean = float(d.mean())
        if len(d) < 2:
            return mean, math.nan, math.nan
        half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
        return mean, mean - half, mean + half

    def as_dict(self) -> dict:
        """Values, mean and sd under each arm's name (`real`, `mixed_mean`, ...), the difference and its interval."""
        (bm, bs), (am, as_) = self._mean_sd(self.base), self._mean_sd(self.arm)
        diff, lo, hi = self.difference()
        b, a = self.base_name, self.arm_name
        return {"key": self.key, "base_name": b, "arm_name": a, b: self.base, a: self.arm, f"{b}_mean": bm,
                f"{b}_sd": bs, f"{a}_mean": am, f"{a}_sd": as_, "diff": diff, "diff_ci95": [lo, hi]}


def compare(runs: list[dict], keys: list[str], base: str = "real", arm: str = "mixed") -> list[Comparison]:
    """Pair two arms' runs by seed; every seed must have both."""
    seeds = sorted({r["seed"] for r in runs})
    by = {(r["arm"], r["seed"]): r for r in runs}
    missing = [f"{a} seed {s}" for s in seeds for a in (base, arm) if (a, s) not in by]
    if missing:
        raise ValueError(f"runs missing for the paired comparison: {', '.join(missing)}")
    return [Comparison(k, [metric_value(by[base, s]["metrics"], k) for s in seeds],
                       [metric_value(by[arm, s]["metrics"], k) for s in seeds], base, arm) for k in keys]


def control_arms(runs: list[dict]) -> list[str]:
    """The control arms among the runs, in the order they first appear."""
    return list(dict.fromkeys(r["arm"] for r in runs if r["arm"].startswith(CONTROL_PREFIX)))


def table_keys(rare: list[str], common: list[str]) -> list[tuple[str, str]]:
    """(label, key) rows of the table: the rare and common groups, each scenario, overall and by object size."""
    rows = [(f"rare ({', '.join(rare)})", f"group/{','.join(rare)}/AP50"),
            (f"common ({', '.join(common)})", f"group/{','.join(common)}/AP50")]
    rows += [(f"{s}", f"scenario/{s}/AP50") for s in [*rare, *common]]
    rows += [("all", "AP50")] + [(f"all, {z} objects", f"size/{z}/AP50") for z in SIZES]
    return [(f"{label} AP50", key) for label, key in rows] + \
        [(f"{label} AP", key.replace("AP50", "AP")) for label, key in rows]


def verdict(rare: Comparison, common: Comparison, gain: float, cost: float) -> dict:
    """The goal: rare AP50 up by >= `gain` points with the whole 95 % interval above zero (beyond the seed
    spread), common AP50 down by no more than `cost` points (its mean difference)."""
    r_mean, r_lo, _ = rare.difference()
    c_mean, _, _ = common.difference()
    rare_ok = r_mean >= gain and not math.isnan(r_lo) and r_lo > 0
    common_ok = c_mean >= -cost
    return {"rare_gain": r_mean, "rare_gain_ci_low": r_lo, "common_change": c_mean, "rare_goal_met": rare_ok,
            "common_goal_met": common_ok, "met": rare_ok and common_ok}


def _fmt(mean: float, sd: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.1f}" if math.isnan(sd) else f"{mean:.1f} ± {sd:.1f}"


def _fmt_diff(d: dict) -> str:
    lo, hi = d["diff_ci95"]
    if math.isnan(d["diff"]):
        return "–"
    return f"{d['diff']:+.1f}" + ("" if math.isnan(lo) else f" [{lo:+.1f}, {hi:+.1f}]")


def markdown_table(rows: list[tuple[str, Comparison]], n_seeds: int) -> str:
    """The comparison as a markdown table: arm means ± sd over seeds and the paired difference with its CI."""
    head = [f"| metric (AP points, {n_seeds} seed{'s' * (n_seeds > 1)}) | real only | real + synthetic | "
            "mixed − real [95 % t-interval] |", "|---|---|---|---|"]
    body = []
    for label, c in rows:
        d = c.as_dict()
        body.append(f"| {label} | {_fmt(d['real_mean'], d['real_sd'])} | {_fmt(d['mixed_mean'], d['mixed_sd'])} | "
                    f"{_fmt_diff(d)} |")
    return "\n".join(head + body)


def control_table(rows: list[tuple[str, Comparison, Comparison]], control: str, n_seeds: int) -> str:
    """One control arm against both others: its mean ± sd, control - real and mixed - control per metric, each
    paired over the seeds with its 95 % t-interval. rows: (label, control against real, mixed against control)."""
    head = [f"| metric (AP points, {n_seeds} seed{'s' * (n_seeds > 1)}) | {control} | {control} − real | "
            f"mixed − {control} |", "|---|---|---|---|"]
    body = []
    for label, vs_real, vs_mixed in rows:
        d, m = vs_real.as_dict(), vs_mixed.as_dict()
        body.append(f"| {label} | {_fmt(d[f'{control}_mean'], d[f'{control}_sd'])} | {_fmt_diff(d)} | "
                    f"{_fmt_diff(m)} |")
    return "\n".join(head + body)


def fairness_table(runs: list[dict]) -> str:
    """What each detector run recorded: optimizer steps, images per step by dataset, epochs of the real stream
    every arm shares (a control arm's extra real frames come from a stream of their own, not counted there)."""
    rows = ["| arm | seed | optimizer steps | images per step (real + extra) | real epochs (shared stream) |",
            "|---|---|---|---|---|"]
    order = [*ARMS, *control_arms(runs)]
    for r in sorted(runs, key=lambda r: (r["seed"], order.index(r["arm"]))):
        per = " + ".join(str(n) for n in r["images_per_step"])
        rows.append(f"| {r['arm']} | {r['seed']} | {r['steps']} | {per} | {r['real_epochs']:.3f} |")
    return "\n".join(rows)
