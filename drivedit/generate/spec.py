"""What a generation job makes: counts per scenario, the item list, shards, and the spec hash.

Three ways to ask (see `SpecSection`): explicit counts, fractions of a total (rounded by largest
remainder so the counts add up exactly), or `balance`, which counts an existing dataset's
scenarios and asks for what each one lacks to reach the same count.

Items are interleaved by scenario (item k of a scenario with c items sits at (k + 0.5) / c of the
way through the list), so any prefix of the dataset, and every shard, is close to the requested
mix. Item i always has seed base_seed + i. The spec hash covers everything that decides the
images (model digest, counts, order, seeds, shard layout, sampler settings, size, codec) and
nothing that does not (batch size, actors), so a resumed run on a different cluster shape is
still the same dataset.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass

import numpy as np

SPEC_FORMAT = 1


class SpecError(ValueError):
    """A spec that cannot be generated; the message lists every problem, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid generation spec ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{lines}")


# ----------------------------------------------------------------------------- counts


def counts_for_fractions(total: int, fractions: dict[str, float], order: list[str]) -> dict[str, int]:
    """Split `total` by `fractions` with the largest-remainder rule; ties go to the earlier scenario in `order`."""
    names = [s for s in order if s in fractions]
    exact = np.array([total * fractions[s] for s in names], dtype=np.float64)
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    # stable sort on the negated remainder: the largest remainders first, earlier scenarios on ties
    for i in np.argsort(-(exact - counts), kind="stable")[:short]:
        counts[i] += 1
    return {s: int(c) for s, c in zip(names, counts)}


def counts_for_balance(existing: dict[str, int], scenarios: list[str], target: int | None = None) -> dict[str, int]:
    """What each scenario lacks to reach `target` (default: the count of the most common scenario).

    `existing` counts every scenario of the source dataset; scenarios not in it have 0 frames.
    """
    if target is None:
        target = max(existing.values(), default=0)
    return {s: max(0, target - existing.get(s, 0)) for s in scenarios}


def scenario_counts_from_labels(uri: str, vocabulary: list[str]) -> dict[str, int]:
    """Per-scenario frame counts of a BDD100K-format label file (local or s3://).

    Frames map to scenarios by the BDD100K rule the encode job applies (night wins over weather;
    undefined, foggy and weathers outside `vocabulary` are dropped).
    """
    from drivedit.data.bdd100k import ScenarioVocabulary, load_label_file

    vocab = ScenarioVocabulary(vocabulary, night="night" if "night" in vocabulary else None)
    kept, _ = vocab.split(load_label_file(uri))
    counts = Counter(vocab.names[sid] for _, sid in kept)
    return dict(counts)


def scenario_counts_from_shards(uri: str, vocabulary: list[str]) -> dict[str, int]:
    """Per-scenario row counts of a directory of latent shards, matched by name (the shards carry their
    own vocabulary, whose ids need not be the model's); scenarios outside `vocabulary` are left out."""
    from drivedit.data.shards import scenario_counts

    return {name: c for name, c in scenario_counts(uri).items() if name in vocabulary and c > 0}


def existing_scenario_counts(source: str, vocabulary: list[str]) -> dict[str, int]:
    """Frames per scenario of the model's `vocabulary` in a balance source: a label file (.json) or a
    directory / URI of latent shards. Scenarios the model cannot generate do not set the target."""
    if source.rstrip("/").endswith(".json"):
        return scenario_counts_from_labels(source, vocabulary)
    return scenario_counts_from_shards(source, vocabulary)


def resolve_counts(spec, vocabulary: list[str], existing: dict[str, int] | None = None) -> dict[str, int]:
    """Counts per scenario, in vocabulary order, for a validated `SpecSection`.

    `existing` is the balance source's per-scenario counts (read by the caller, so this stays
    pure). Raises SpecError naming every unknown scenario before anything is sampled.
    """
    known = set(vocabulary)
    vocab_text = ", ".join(vocabulary)
    problems = []

    def check(names, where: str) -> None:
        unknown = [n for n in names if n not in known]
        if unknown:
            problems.append(f"{where}: unknown scenario{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; "
                            f"the model's vocabulary is: {vocab_text}")

    if spec.counts is not None:
        check(spec.counts, "spec.counts")
        wanted = dict(spec.counts)
    elif spec.fractions is not None:
        check(spec.fractions, "spec.fractions")
        wanted = counts_for_fractions(spec.total, spec.fractions, vocabulary) if not problems else {}
    else:
        if existing is None:
            raise ValueError("resolve_counts: a balance spec needs the source's scenario counts (`existing`)")
        scenarios = spec.balance.scenarios if spec.balance.scenarios is not None else list(vocabulary)
        check(scenarios, "spec.balance.scenarios")
        wanted = counts_for_balance(existing, scenarios, spec.balance.target)
        if not problems and sum(wanted.values()) == 0:
            have = ", ".join(f"{s}={existing.get(s, 0)}" for s in scenarios)
            problems.append(f"spec.balance: {spec.balance.source} is already balanced at the target "
                            f"({have}); nothing to generate. Raise spec.balance.target to add more")
    if problems:
        raise SpecError(problems)
    return {s: int(wanted[s]) for s in vocabulary if wanted.get(s, 0) > 0}


# ----------------------------------------------------------------------------- items and shards


class ShardedItems:
    """Items 0..num_items-1 cut into shards of shard_size, in order (ItemPlan, transfer's TransferPlan)."""

    num_items: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_items // self.shard_size)

    def shard_range(self, shard: int) -> range:
        start = shard * self.shard_size
        return range(start, min(start + self.shard_size, self.num_items))


@dataclass(frozen=True)
class ItemPlan(ShardedItems):
    """Every item of a spec: index i has seed base_seed + i and scenario `scenarios[scenario_pos[i]]`."""

    scenarios: list[str]  # the scenarios with a count > 0, in vocabulary order
    scenario_pos: np.ndarray  # (N,) int32, position in `scenarios`
    base_seed: int
    shard_size: int
    extras: tuple = ()  # empty, or per item a dict merged into its item (generate/layouts.py: frame, boxes)

    @property
    def num_items(self) -> int:
        return int(self.scenario_pos.shape[0])

    def shard_items(self, shard: int) -> list[dict]:
        """The items of one shard as plain dicts {index, seed, scenario}."""
        return [{"index": i, "seed": self.base_seed + i, "scenario": self.scenarios[self.scenario_pos[i]],
                 **(self.extras[i] if self.extras else {})} for i in self.shard_range(shard)]

    def counts(self) -> dict[str, int]:
        per = np.bincount(self.scenario_pos, minlength=len(self.scenarios))
        return {s: int(c) for s, c in zip(self.scenarios, per)}


def plan_items(counts: dict[str, int], base_seed: int, shard_size: int) -> ItemPlan:
    """Interleave the scenarios (in the order of `counts`) into one item list."""
    scenarios = [s for s, c in counts.items() if c > 0]
    keys, pos = [], []
    for p, s in enumerate(scenarios):
        c = counts[s]
        keys.append((np.arange(c, dtype=np.float64) + 0.5) / c)  # (c,) spread evenly over [0, 1)
        pos.append(np.full(c, p, dtype=np.int32))
    keys_all = np.concatenate(keys) if keys else np.zeros(0)
    pos_all = np.concatenate(pos) if pos else np.zeros(0, dtype=np.int32)
    order = np.lexsort((pos_all, keys_all))  # by key, then by scenario position on ties
    return ItemPlan(scenarios=scenarios, scenario_pos=pos_all[order], base_seed=base_seed, shard_size=shard_size)


# ----------------------------------------------------------------------------- spec hash


def spec_document(plan: ItemPlan, *, model_digest: str, sampler: dict, image_size: int, codec: str,
                  layouts: dict | None = None) -> dict:
    """The canonical description of a dataset; its hash names the dataset in spec.json.

    The model enters by content (its files' digest), not by path or registry name: moving a bundle
    or registering it again does not make its dataset a different one.
    """
    document = {
        "format": SPEC_FORMAT,
        "model_digest": model_digest,
        "counts": plan.counts(),
        "scenario_order": plan.scenarios,
        "num_items": plan.num_items,
        "base_seed": plan.base_seed,
        "shard_size": plan.shard_size,
        "sampler": dict(sorted(sampler.items())),
        "image_size": int(image_size),
        "codec": codec,
    }
    if layouts is not None:  # only then: the hashes of datasets made without layouts stay what they were
        document["layouts"] = dict(sorted(layouts.items()))
    return document


def spec_hash(document: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace) of a spec document."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()
