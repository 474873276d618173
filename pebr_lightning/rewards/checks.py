"""Contract checks for reward plugins, to call from a plugin's own pytest suite.

    from pebr_lightning.testing import check_reward
    from my_pkg.rewards import MyReward

    def test_my_reward_follows_the_contract():
        check_reward(MyReward())

`check_reward` builds a batch of synthetic samples (images on disk, the reference
PeBR response of each, plus an empty, a section-less and a very long completion),
the context the trainer passes (images, the embedded tiny tokenizer, step 0, CPU),
and raises AssertionError listing every contract rule the reward breaks. Each rule
is also a function of its own (`check_lengths`, `check_values`, `check_no_mutation`,
`check_context_keys`, `check_pickle`, `check_deterministic`). `pebr rewards check
NAME` runs the same checks from the command line.
"""

from __future__ import annotations

import atexit
import copy
import functools
import math
import pickle
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pebr_lightning.data.images import image_paths, load_image
from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.data.prompts import record_response
from pebr_lightning.data.synthetic import load_synthetic
from pebr_lightning.rewards.combine import unpack_output, value_problem

TINY_MODEL = "tiny-qwen2.5-vl"
UNKNOWN_CONTEXT_KEY = "pebr_check_unknown_key"
LONG_COMPLETION_CHARS = 20_000
EDGE_CASES = ("empty", "no sections", "very long")
RTOL, ATOL = 1e-6, 1e-9
Samples = list[dict[str, Any]]

# The contract rules, in the order `run_checks` reports them.
RULES = (
    "call",
    "returns a list or RewardOutput of the right length",
    "values are None or finite numbers",
    "does not mutate samples or completions",
    "accepts and ignores unknown context keys",
    "pickle round trip gives the same scores",
    "deterministic",
)


@dataclass
class CheckResult:
    """The outcome of one contract rule."""

    name: str
    """What was checked, in words."""
    status: str
    """PASS, FAIL, or SKIP (not run because the reward could not be called)."""
    message: str = ""
    """Why it failed or was skipped."""

    def __str__(self) -> str:
        return f"{self.status}  {self.name}" + (f": {self.message}" if self.message else "")


@dataclass
class RewardCheckReport:
    """Every contract rule run on one reward, and the scores of its first call."""

    reward: str
    """The reward's name."""
    results: list[CheckResult] = field(default_factory=list)
    """One entry per rule, in the order they ran."""
    output: Any = None
    """What the reward returned on the batch (None if it raised)."""

    @property
    def passed(self) -> list[str]:
        """Names of the rules that passed."""
        return [r.name for r in self.results if r.status == "PASS"]

    @property
    def failures(self) -> list[CheckResult]:
        """Rules that failed or could not run."""
        return [r for r in self.results if r.status != "PASS"]

    @property
    def ok(self) -> bool:
        """True when every rule passed."""
        return not self.failures

    def __str__(self) -> str:
        return "\n".join([f"reward {self.reward!r}:"] + [f"  {r}" for r in self.results])


@dataclass
class Batch:
    """Aligned completions and samples, with a label saying what each completion is."""

    completions: list[str]
    samples: list[dict[str, Any]]
    labels: list[str]
    """`reference`, or which edge case the completion is."""
    sources: list[int]
    """Index of each entry's sample in the list `make_batch` was given."""


def make_samples(n: int = 4, seed: int = 0, root: str | Path | None = None) -> list[dict]:
    """Synthetic manifest records with their images written under `root` (`image` absolute):
    the `shapes` dataset (data/synthetic.py), whose records carry every field a reward reads.

    Without `root`, a temporary folder is used and removed when the process exits.
    """
    if root is None:
        root = tempfile.mkdtemp(prefix="pebr-reward-check-")
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    manifest = load_synthetic().write(root, n=n, seed=seed)
    return load_manifest(manifest).records


def make_batch(samples: list[dict[str, Any]]) -> Batch:
    """The reference response of every sample, then the edge cases on the first samples.

    The edge cases (an empty completion, one with no `###` sections, a very long one)
    are paired with copies of samples 0, 1, 2 (cycling when there are fewer).
    """
    if not samples:
        raise ValueError("make_batch needs at least one sample")
    completions = [record_response(s) for s in samples]
    batch_samples = [copy.deepcopy(s) for s in samples]
    labels = ["reference"] * len(samples)
    sources = list(range(len(samples)))
    for k, kind in enumerate(EDGE_CASES):
        sample = samples[k % len(samples)]
        if kind == "empty":
            text = ""
        elif kind == "no sections":
            text = f"I think the answer is {sample['answer']}."
        else:
            reference = record_response(sample)
            text = (reference + "\n") * (LONG_COMPLETION_CHARS // (len(reference) + 1) + 1)
        completions.append(text)
        batch_samples.append(copy.deepcopy(sample))
        labels.append(kind)
        sources.append(k % len(samples))
    return Batch(completions, batch_samples, labels, sources)


def make_context(samples: list[dict[str, Any]], tokenizer: Any = None) -> dict[str, Any]:
    """The trainer's context (every CONTEXT_KEYS key): images, the tiny model's processor
    and tokenizer (or `tokenizer`), step 0, CPU."""
    import torch

    lists = [[load_image(path) for path in image_paths(s)] for s in samples]
    return {
        "images": [own[0] for own in lists],
        "image_lists": lists,
        "tokenizer": tokenizer if tokenizer is not None else tiny_processor().tokenizer,
        "processor": tiny_processor(),
        "global_step": 0,
        "device": torch.device("cpu"),
    }


@functools.lru_cache(maxsize=1)
def tiny_processor() -> Any:
    """The embedded tiny model's processor (built on first use, then cached)."""
    from pebr_lightning.models.policy import load_processor

    return load_processor(TINY_MODEL)


def tiny_tokenizer() -> Any:
    """The embedded tiny model's tokenizer."""
    return tiny_processor().tokenizer


def check_reward(
    reward: Any,
    samples: list[dict[str, Any]] | None = None,
    completions: list[str] | None = None,
    context: dict[str, Any] | None = None,
) -> RewardCheckReport:
    """Run every contract rule; AssertionError listing the broken ones, else the report.

    Defaults: `make_samples()`, then `make_batch` for completions (reference
    responses plus edge cases), then `make_context`. A context made for the given
    samples (no completions) has its `images` extended to the edge cases.
    """
    report = run_checks(reward, samples, completions, context)
    if not report.ok:
        raise AssertionError(
            f"reward {report.reward!r} breaks the reward contract:\n"
            + "\n".join(f"  {r}" for r in report.failures)
        )
    return report


def run_checks(
    reward: Any,
    samples: list[dict[str, Any]] | None = None,
    completions: list[str] | None = None,
    context: dict[str, Any] | None = None,
) -> RewardCheckReport:
    """Run every contract rule and report each as PASS/FAIL/SKIP; never raises for a rule."""
    samples, completions, context = _prepare(samples, completions, context)
    report = RewardCheckReport(reward=str(getattr(reward, "name", type(reward).__name__)))
    results = report.results

    # Pickle before the first call: rewards load heavy models lazily on first use.
    try:
        clone = _round_trip(reward)
    except AssertionError as err:
        clone, pickle_error = None, str(err)
    else:
        pickle_error = None

    try:
        output, mutation = _guarded_call(reward, completions, samples, context)
    except Exception as err:
        results.append(CheckResult("call", "FAIL", f"raised {type(err).__name__}: {err}"))
        for name in RULES[1:]:
            results.append(CheckResult(name, "SKIP", "the reward raised"))
        return report
    report.output = output
    results.append(CheckResult("call", "PASS"))
    results.append(_result(RULES[1], _length_problems(output, len(completions))))
    results.append(_result(RULES[2], _all_value_problems(output)))
    results.append(_result(RULES[3], mutation))

    def compare(name: str, call: Any) -> None:
        try:
            again = call()
        except Exception as err:
            results.append(CheckResult(name, "FAIL", f"raised {type(err).__name__}: {err}"))
            return
        results.append(_result(name, _difference(output, again)))

    def with_unknown_key() -> Any:
        extra = {**context, UNKNOWN_CONTEXT_KEY: object()}
        return reward(completions=completions, samples=samples, **extra)

    compare(RULES[4], with_unknown_key)
    if clone is None:
        results.append(CheckResult(RULES[5], "FAIL", pickle_error or ""))
    else:
        compare(RULES[5], lambda: clone(completions=completions, samples=samples, **context))
    compare(RULES[6], lambda: reward(completions=completions, samples=samples, **context))
    return report


def check_lengths(
    reward: Any,
    samples: Samples | None = None,
    completions: list[str] | None = None,
    context: dict[str, Any] | None = None,
) -> Any:
    """A list or RewardOutput with one score (and one value per component) per completion."""
    samples, completions, context = _prepare(samples, completions, context)
    output = reward(completions=completions, samples=samples, **context)
    _assert(RULES[1], _length_problems(output, len(completions)))
    return output


def check_values(
    reward: Any,
    samples: Samples | None = None,
    completions: list[str] | None = None,
    context: dict[str, Any] | None = None,
) -> Any:
    """Every score and component value is None or a finite int/float (not bool)."""
    samples, completions, context = _prepare(samples, completions, context)
    output = check_lengths(reward, samples, completions, context)
    _assert(RULES[2], _all_value_problems(output))
    return output


def check_no_mutation(
    reward: Any,
    samples: Samples | None = None,
    completions: list[str] | None = None,
    context: dict[str, Any] | None = None,
) -> Any:
    """The call leaves `samples` and `completions` as they were."""
    samples, completions, context = _prepare(samples, completions, context)
    output, problem = _guarded_call(reward, completions, samples, context)
    _assert(RULES[3], problem)
    return output


def check_context_keys(
    reward: Any,
    samples: Samples | None = None,
    completions: list[str] | None = None,
    context: dict[str, Any] | None = None,
) -> None:
    """An unknown context key is accepted and changes nothing."""
    samples, completions, context = _prepare(samples, completions, context)
    first = reward(completions=completions, samples=samples, **context)
    extra = {**context, UNKNOWN_CONTEXT_KEY: object()}
    try:
        second = reward(completions=completions, samples=samples, **extra)
    except TypeError as err:
        raise AssertionError(f"{RULES[4]}: raised TypeError: {err}") from err
    _assert(RULES[4], _difference(first, second))


def check_pickle(
    reward: Any,
    samples: Samples | None = None,
    completions: list[str] | None = None,
    context: dict[str, Any] | None = None,
) -> Any:
    """The reward survives a pickle round trip and the copy scores the batch the same."""
    samples, completions, context = _prepare(samples, completions, context)
    clone = _round_trip(reward)
    first = reward(completions=completions, samples=samples, **context)
    second = clone(completions=completions, samples=samples, **context)
    _assert(RULES[5], _difference(first, second))
    return clone


def check_deterministic(
    reward: Any,
    samples: Samples | None = None,
    completions: list[str] | None = None,
    context: dict[str, Any] | None = None,
) -> None:
    """Two calls on the same batch return the same scores and components."""
    samples, completions, context = _prepare(samples, completions, context)
    first = reward(completions=completions, samples=samples, **context)
    second = reward(completions=completions, samples=samples, **context)
    _assert(RULES[6], _difference(first, second))


def _prepare(
    samples: Samples | None, completions: list[str] | None, context: dict[str, Any] | None
) -> tuple[Samples, list[str], dict[str, Any]]:
    """Fill in the default batch and context."""
    if samples is None:
        if completions is not None:
            raise ValueError("completions given without samples: pass both")
        samples = make_samples()
    if completions is None:
        batch = make_batch(samples)
        images = (context or {}).get("images")
        if isinstance(images, list) and len(images) == len(samples):
            # A context made for the given samples: give the edge cases their images too.
            context = {**context, "images": [images[i] for i in batch.sources]}
            lists = context.get("image_lists")
            if isinstance(lists, list) and len(lists) == len(images):
                context["image_lists"] = [lists[i] for i in batch.sources]
        samples, completions = batch.samples, batch.completions
    if len(samples) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(samples)} samples")
    if context is None:
        context = make_context(samples)
    return samples, completions, context


def _round_trip(reward: Any) -> Any:
    try:
        return pickle.loads(pickle.dumps(reward))
    except Exception as err:
        raise AssertionError(
            f"{RULES[5]}: pickling failed with {type(err).__name__}: {err} (rewards are "
            "pickled into worker processes: keep lambdas, open files and loaded models out "
            "of the instance, or drop them in __getstate__)"
        ) from err


def _guarded_call(
    reward: Any, completions: list[str], samples: Samples, context: dict[str, Any]
) -> tuple[Any, str | None]:
    """Call the reward once: (its output, what it changed in its inputs or None)."""
    samples_before = copy.deepcopy(samples)
    completions_before = list(completions)
    output = reward(completions=completions, samples=samples, **context)
    if completions != completions_before:
        return output, "the reward changed `completions`"
    if len(samples) != len(samples_before):
        return output, "the reward changed the length of `samples`"
    for i, (before, after) in enumerate(zip(samples_before, samples, strict=True)):
        if before != after:
            changed = sorted(
                k
                for k in set(before) | set(after)
                if k not in before or k not in after or before[k] != after[k]
            )
            return output, f"the reward changed samples[{i}] (keys {', '.join(changed)})"
    return output, None


def _length_problems(output: Any, n: int) -> str | None:
    try:
        scores, components = unpack_output(output)
    except TypeError as err:
        return str(err)
    if not isinstance(scores, list):
        return f"the scores are a {type(scores).__name__}, not a list"
    if len(scores) != n:
        return f"returned {len(scores)} scores for {n} completions"
    if not isinstance(components, dict):
        return f"RewardOutput.components is a {type(components).__name__}, not a dict"
    for key, values in components.items():
        if not isinstance(key, str):
            return f"component key {key!r} is not a str"
        if not isinstance(values, list) or len(values) != n:
            size = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            return f"component {key!r} has {size} values for {n} completions"
    return None


def _all_value_problems(output: Any) -> str | None:
    try:
        scores, components = unpack_output(output)
    except TypeError as err:
        return str(err)
    named = [("score", scores)] + [(f"component {k!r}", v) for k, v in dict(components).items()]
    problems = [
        f"{what} {i}: {problem}"
        for what, values in named
        for i, value in enumerate(values)
        if (problem := value_problem(value)) is not None
    ]
    if not problems:
        return None
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def _difference(first: Any, second: Any) -> str | None:
    """How two outputs of the same batch differ, or None when they agree."""
    try:
        a_scores, a_components = unpack_output(first)
        b_scores, b_components = unpack_output(second)
    except TypeError as err:
        return str(err)
    pairs = [("score", a_scores, b_scores)]
    if set(a_components) != set(b_components):
        return f"component names differ: {sorted(a_components)} vs {sorted(b_components)}"
    pairs += [(f"component {k!r}", a_components[k], b_components[k]) for k in a_components]
    for what, a, b in pairs:
        if len(a) != len(b):
            return f"{what}s: {len(a)} values, then {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if not _same(x, y):
                return f"{what} {i}: {x!r}, then {y!r}"
    return None


def _same(x: Any, y: Any) -> bool:
    if value_problem(x) is None and value_problem(y) is None and None not in (x, y):
        return math.isclose(float(x), float(y), rel_tol=RTOL, abs_tol=ATOL)
    return x is y or x == y or (x != x and y != y)  # NaN equals NaN here: same output


def _result(name: str, problem: str | None) -> CheckResult:
    return CheckResult(name, "PASS") if problem is None else CheckResult(name, "FAIL", problem)


def _assert(name: str, problem: str | None) -> None:
    if problem is not None:
        raise AssertionError(f"{name}: {problem}")
