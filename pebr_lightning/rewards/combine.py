"""Call the configured rewards on a rollout batch and sum them with their weights.

`load_rewards(specs)` builds a `RewardSet` from a config's reward list; calling the
set runs each reward once per batch and returns a `RewardResult`: the weighted
total per sample, every reward's own scores, every logged component, and how many
values the fault policy turned into None. The paper's Stage 1 sum is
0.4 clip + 0.4 keyword + 0.1 format + 0.1 length, Stage 2 is 0.9 accuracy + 0.1 format
(docs/paper.md); both are plain weighted sums, which this reproduces exactly when
every reward returns a number.

Where we depart from a plain sum: a reward may return None ("not applicable to this
sample"), and such a reward is left out of that sample's sum with the remaining
weights scaled back up to the full weight (see `RewardSet.__call__`), so a sample
is not penalised for a reward that does not apply to it. Pure Python: the GRPO
module turns the totals into tensors.
"""

from __future__ import annotations

import copy
import math
import numbers
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pebr_lightning.errors import PebrError
from pebr_lightning.rewards.protocol import Reward, RewardOutput
from pebr_lightning.rewards.registry import RewardSpec, build_reward

MAX_LISTED_IDS = 5
FLOAT32_MAX = 3.4028234663852886e38
"""The largest |score| accepted: totals are kept in float32 (group statistics are
computed in float64, so scores up to this limit still give finite advantages)."""


class RewardError(PebrError):
    """A reward failed on a batch (raised, or returned something that is not a score)."""


@dataclass
class WeightedReward:
    """A constructed reward with its weight and fault policy."""

    reward: Reward
    """The reward instance (has `name`, called once per batch)."""
    weight: float = 1.0
    """Weight in the total; 0 computes and logs the reward without summing it."""
    on_error: Literal["raise", "none"] = "raise"
    """`raise`: a fault raises RewardError; `none`: faulty values become None and are counted."""
    spec: RewardSpec | None = None
    """The config entry it was built from, if any (recorded in checkpoints)."""
    timeout_s: float | None = None
    """Seconds one call may take before it is a fault; None = no limit (see `_call`)."""


@dataclass
class RewardResult:
    """The rewards of one batch, everything aligned with the completions."""

    total: list[float | None]
    """Weighted sum per sample, renormalised over the rewards that applied; None if none did."""
    per_reward: dict[str, list[float | None]]
    """Each reward's scores (after the fault policy)."""
    components: dict[str, list[float | None]] = field(default_factory=dict)
    """`reward/component` -> per-sample values from RewardOutput.components, for logging."""
    faults: dict[str, int] = field(default_factory=dict)
    """Per reward, how many values the `none` policy turned into None in this batch."""

    def select(self, rows: Sequence[int]) -> RewardResult:
        """These rows, in this order (fault counts stay the batch's: they are not per row)."""
        return RewardResult(
            total=[self.total[i] for i in rows],
            per_reward={name: [v[i] for i in rows] for name, v in self.per_reward.items()},
            components={name: [v[i] for i in rows] for name, v in self.components.items()},
            faults=dict(self.faults),
        )

    @staticmethod
    def concat(results: Sequence[RewardResult]) -> RewardResult:
        """The rows of several results, one after another; fault counts add up."""
        first = results[0]
        return RewardResult(
            total=[t for r in results for t in r.total],
            per_reward={
                name: [v for r in results for v in r.per_reward[name]] for name in first.per_reward
            },
            components={
                name: [v for r in results for v in r.components[name]] for name in first.components
            },
            faults={name: sum(r.faults.get(name, 0) for r in results) for name in first.faults},
        )


class RewardSet:
    """The rewards of one training stage, summed with their weights."""

    def __init__(self, rewards: Sequence[WeightedReward]) -> None:
        """Args:
        rewards: the rewards in config order; their `name`s must be distinct and at
            least one weight must be positive.
        """
        self.rewards = list(rewards)
        if not self.rewards:
            raise PebrError("no rewards configured: name at least one under `rewards`")
        seen: dict[str, str] = {}
        for item in self.rewards:
            # compared in any case: metric keys and reports that differ only in case
            # are easily read as one another
            twin = seen.get(item.reward.name.casefold())
            if twin is not None:
                raise PebrError(
                    f"two configured rewards are named {twin!r} and {item.reward.name!r}; "
                    "give one a different name through its init_args if it supports that"
                )
            seen[item.reward.name.casefold()] = item.reward.name
            if not math.isfinite(item.weight) or item.weight < 0:
                raise PebrError(
                    f"reward {item.reward.name!r}: weight must be finite and >= 0, "
                    f"got {item.weight}"
                )
            if item.on_error not in ("raise", "none"):
                raise PebrError(f"reward {item.reward.name!r}: unknown on_error {item.on_error!r}")
            if item.timeout_s is not None and not item.timeout_s > 0:
                raise PebrError(
                    f"reward {item.reward.name!r}: timeout_s must be > 0, got {item.timeout_s}"
                )
        self.total_weight = sum(item.weight for item in self.rewards)
        if self.total_weight <= 0:
            raise PebrError("every reward weight is 0: at least one must be positive")

    @property
    def names(self) -> list[str]:
        """The rewards' names, in config order."""
        return [item.reward.name for item in self.rewards]

    @property
    def weights(self) -> dict[str, float]:
        """Name -> weight."""
        return {item.reward.name: item.weight for item in self.rewards}

    def to_config(self) -> list[dict[str, Any]]:
        """The reward list as plain data for a checkpoint (registry names, not import paths)."""
        return [item.spec.to_dict() for item in self.rewards if item.spec is not None]

    def __call__(
        self, completions: list[str], samples: list[dict[str, Any]], **context: Any
    ) -> RewardResult:
        """Score a batch: each reward once, then the weighted total per sample.

        A None score leaves that reward out of that sample's sum, and the weights of
        the rewards that did apply are scaled up to the total weight, so the total
        keeps the scale of the full sum (it is not counted as a 0):

            total_i = (sum_{j applicable to i} w_j r_ij) * (sum_all w_j) / (sum_{j applicable} w_j)

        Example: weights clip 0.4, keyword 0.4, format 0.1, length 0.1 and scores
        0.5, None, 1, 1 (the sample has no keywords). The applicable weights sum to
        0.6, their weighted sum is 0.4*0.5 + 0.1*1 + 0.1*1 = 0.4, so
        total = 0.4 * 1.0 / 0.6 = 0.667; the plain sum counting None as 0 would be 0.4.
        A reward of weight 0 is computed and logged but never applies. A sample to
        which no reward applies gets total None.

        Raises:
            RewardError: a reward with `on_error: raise` raised, returned the wrong
                number of scores or components, or returned NaN, inf or a non-number;
                the message names the reward and the sample ids.
        """
        n = len(completions)
        if len(samples) != n:
            raise ValueError(f"{n} completions but {len(samples)} samples")
        ids = [_sample_id(s, i) for i, s in enumerate(samples)]
        result = RewardResult(total=[], per_reward={}, components={}, faults={})
        for item in self.rewards:
            # Each reward reads its own copy: one that edits a sample (an answer
            # normalised in place, say) cannot change what the rewards after it grade.
            own = copy.deepcopy(samples)
            scores, components, faults = _run_one(
                item, list(completions), own, _own_context(context), ids
            )
            name = item.reward.name
            result.per_reward[name] = scores
            result.faults[name] = faults
            for key, values in components.items():
                result.components[f"{name}/{key}"] = values
        for i in range(n):
            applied = [
                (item.weight, result.per_reward[item.reward.name][i])
                for item in self.rewards
                if item.weight > 0 and result.per_reward[item.reward.name][i] is not None
            ]
            applied_weight = sum(w for w, _ in applied)
            if not applied:
                result.total.append(None)
            else:
                weighted = sum(w * r for w, r in applied)
                result.total.append(weighted * self.total_weight / applied_weight)
        return result

    def __repr__(self) -> str:
        parts = ", ".join(f"{item.weight:g} * {item.reward.name}" for item in self.rewards)
        return f"RewardSet({parts})"


def score_groups(
    rewards: Callable[..., RewardResult],
    completions: list[str],
    records: Sequence[dict[str, Any]],
    images: Sequence[list[Any]],
    group_size: int,
    processor: Any,
    **context: Any,
) -> RewardResult:
    """Score `group_size` completions per record (group members contiguous) with a
    reward set, as a GRPO step does: `images` holds each record's images; every reward
    gets each sample's first as `images` and all of them as `image_lists`, and the
    policy's tokenizer and processor. `context` adds the rest (global_step, device)."""
    g = group_size
    return rewards(
        completions=list(completions),
        samples=[r for r in records for _ in range(g)],
        images=[own[0] for own in images for _ in range(g)],
        image_lists=[own for own in images for _ in range(g)],
        tokenizer=processor.tokenizer,
        processor=processor,
        **context,
    )


def load_rewards(specs: Sequence[RewardSpec | dict[str, Any]]) -> RewardSet:
    """Import, check and construct the rewards a config lists (only those)."""
    items = []
    for raw in specs:
        spec = RewardSpec.from_dict(raw)
        items.append(
            WeightedReward(
                reward=build_reward(spec),
                weight=spec.weight,
                on_error=spec.on_error,
                spec=spec,
                timeout_s=spec.timeout_s,
            )
        )
    return RewardSet(items)


def unpack_output(output: Any) -> tuple[Any, Any]:
    """(scores, components) of a reward's return value; TypeError if it is neither form."""
    if isinstance(output, RewardOutput):
        return output.scores, output.components
    if isinstance(output, (list, tuple)):
        return output, {}
    raise TypeError(
        f"returned a {type(output).__name__}; expected a list of scores or a RewardOutput"
    )


def value_problem(value: Any) -> str | None:
    """Why a score is not None or a finite number, or None when it is fine."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        text = repr(value)
        text = text if len(text) <= 40 else text[:37] + "..."
        return f"{type(value).__name__} {text} is not a number"
    try:
        number = float(value)
    except (OverflowError, ValueError, TypeError) as err:
        return f"{value!r} cannot be converted to float ({err})"
    if not math.isfinite(number):
        return f"{number} is not finite"
    if abs(number) > FLOAT32_MAX:
        # finite here, but inf in the float32 tensors rewards become: NaN advantages
        return f"{number:g} is outside the float32 range (|score| <= {FLOAT32_MAX:.4g})"
    return None


def _run_one(
    item: WeightedReward,
    completions: list[str],
    samples: list[dict[str, Any]],
    context: dict[str, Any],
    ids: list[str],
) -> tuple[list[float | None], dict[str, list[float | None]], int]:
    """One reward on the batch, after the fault policy: (scores, components, fault count)."""
    name, n = item.reward.name, len(completions)

    def whole_batch(problem: str, cause: Exception | None = None):
        if item.on_error == "raise":
            message = (
                f"reward {name!r} {problem} (batch of {n} samples, ids {_list_ids(ids)}); "
                "fix the reward, or set `on_error: none` for it to score such samples None"
            )
            raise RewardError(message) from cause
        return [None] * n, {}, n

    try:
        output = _call(item, completions, samples, context)
    except RewardTimeout as err:
        return whole_batch(str(err))
    except Exception as err:
        return whole_batch(f"raised {type(err).__name__}: {err}", err)
    try:
        raw_scores, raw_components = unpack_output(output)
    except TypeError as err:
        return whole_batch(str(err))
    if not isinstance(raw_scores, (list, tuple)):
        return whole_batch(f"returned RewardOutput.scores of type {type(raw_scores).__name__}")
    if len(raw_scores) != n:
        return whole_batch(f"returned {len(raw_scores)} scores for {n} completions")
    if not isinstance(raw_components, dict):
        return whole_batch(
            f"returned RewardOutput.components of type {type(raw_components).__name__}, not a dict"
        )

    faults = 0
    problems: list[str] = []
    scores, bad = _clean(raw_scores)
    for i, problem in bad:
        problems.append(f"id {ids[i]}: {problem}")
    components: dict[str, list[float | None]] = {}
    for key, values in raw_components.items():
        if not isinstance(values, (list, tuple)) or len(values) != n:
            size = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            problems.append(f"component {key!r} has {size} values for {n} completions")
            components[str(key)] = [None] * n
            faults += n
            continue
        components[str(key)], bad_component = _clean(values)
        for i, problem in bad_component:
            problems.append(f"component {key!r}, id {ids[i]}: {problem}")
        faults += len(bad_component)
    faults += len(bad)
    if problems and item.on_error == "raise":
        shown = "; ".join(problems[:MAX_LISTED_IDS])
        hidden = len(problems) - MAX_LISTED_IDS
        more = f"; and {hidden} more" if hidden > 0 else ""
        raise RewardError(
            f"reward {name!r} returned invalid values: {shown}{more}. Fix the reward, or set "
            "`on_error: none` for it to score such samples None"
        )
    return scores, components, faults


class RewardTimeout(Exception):
    """A reward call ran past its `timeout_s` (internal: becomes a RewardError or None scores)."""


def _call(
    item: WeightedReward,
    completions: list[str],
    samples: list[dict[str, Any]],
    context: dict[str, Any],
) -> Any:
    """The reward's output; with `timeout_s`, from a worker thread waited on that long.

    A thread, not a child process: rewards hold models on the GPU and the tokenizer,
    processor and device of the context, which a process would have to pickle and
    reload. The price is that Python cannot stop a thread: one that overruns is
    abandoned (a daemon, so it does not keep the program alive) and keeps its CPU, GPU
    and memory until it returns. A reward whose own work can hang for good (the
    accuracy reward's sympy) should bound it itself, as AccuracyReward does with a
    child process it can kill.
    """
    if item.timeout_s is None:
        try:
            return item.reward(completions=completions, samples=samples, **context)
        except SystemExit as err:
            raise _exited(item, err) from None
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["output"] = item.reward(completions=completions, samples=samples, **context)
        except BaseException as err:  # handed to the caller's thread
            box["error"] = err

    name = item.reward.name
    worker = threading.Thread(target=work, name=f"reward-{name}", daemon=True)
    worker.start()
    worker.join(item.timeout_s)
    if worker.is_alive():
        raise RewardTimeout(
            f"did not return within timeout_s={item.timeout_s:g} s (its call was abandoned "
            "and may still be running); raise `timeout_s` in its reward entry if it is "
            "only slow"
        )
    if "error" in box:
        if isinstance(box["error"], SystemExit):
            raise _exited(item, box["error"])
        raise box["error"]
    return box["output"]


def _own_context(context: dict[str, Any]) -> dict[str, Any]:
    """The context with its lists copied and the images in them too (each distinct
    image once: a group's members share one), so a reward that draws on an image or
    reorders a list changes nothing for the rewards after it, nor for the trainer.
    The tokenizer, processor and device are shared as they are."""
    from PIL import Image

    copies: dict[int, Any] = {}

    def own(value: Any) -> Any:
        if isinstance(value, Image.Image):
            if id(value) not in copies:
                copies[id(value)] = value.copy()
            return copies[id(value)]
        if isinstance(value, list | tuple):  # image_lists: a list per sample
            return [own(v) for v in value]
        return value

    return {
        key: [own(v) for v in value] if isinstance(value, list | tuple) else value
        for key, value in context.items()
    }


def _exited(item: WeightedReward, err: SystemExit) -> RewardError:
    """A reward (or a library under it) called sys.exit: left alone, the run would end
    with that code, 0 included, as if it had finished."""
    return RewardError(
        f"reward {item.reward.name!r} called sys.exit({err.code!r}) instead of returning "
        "scores (it, or a library it calls, ends the process); the run stops here: fix "
        "the reward"
    )


def _clean(values: Sequence[Any]) -> tuple[list[float | None], list[tuple[int, str]]]:
    """Values as floats (faulty ones as None) and the (index, problem) of each faulty one."""
    cleaned: list[float | None] = []
    bad: list[tuple[int, str]] = []
    for i, value in enumerate(values):
        problem = value_problem(value)
        if problem is not None:
            bad.append((i, problem))
            cleaned.append(None)
        else:
            cleaned.append(None if value is None else float(value))
    return cleaned, bad


def _sample_id(sample: Any, index: int) -> str:
    """The record's `id` for messages; `#index` for a record without one."""
    if isinstance(sample, dict) and "id" in sample:
        return str(sample["id"])
    return f"#{index}"


def _list_ids(ids: list[str]) -> str:
    shown = ", ".join(ids[:MAX_LISTED_IDS])
    return shown + (", ..." if len(ids) > MAX_LISTED_IDS else "")
