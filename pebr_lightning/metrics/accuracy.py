"""Answer accuracy, overall and per question type, summed across processes.

Each process grades its own share of the questions. Averaging per-process
accuracies is wrong whenever processes hold different numbers of questions of a
type, so the metric keeps counts (right answers and questions per type), which
torchmetrics adds up across processes before dividing.

An answer the accuracy reward could not grade (it returned None: the record has no
reference answer) counts as a question answered wrongly, so that accuracy is always
over every question asked, and it is also counted in `ungraded`, so that a reader
can tell a wrong model from a manifest without answers.

    pebr eval --model M --manifest FILE --out DIR
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


class AccuracyByType(Metric):
    """Share of right answers overall and for each question type.

    `update(correct [N], type_index [N])`, where `type_index` points into the `types`
    given at construction. `compute()` -> {"accuracy": overall, "accuracy/<type>": per
    type}, types with no question on any process left out; `counts()` -> the matching
    question counts and the number of ungraded answers.
    """

    full_state_update = False

    def __init__(self, types: Sequence[str], **kwargs) -> None:
        """
        Args:
            types: the question types, in the order `type_index` refers to them.
            kwargs: torchmetrics `Metric` options (process group, sync settings...).
        """
        super().__init__(**kwargs)
        self.types = list(types)
        if not self.types:
            raise ValueError("AccuracyByType needs at least one question type")
        if len(set(self.types)) != len(self.types):
            raise ValueError(f"AccuracyByType: question types repeat: {self.types}")
        n = len(self.types)
        # float64: counts stay exact far beyond float32's 2**24.
        self.add_state("correct", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ungraded", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, correct: Tensor, type_index: Tensor, ungraded: Tensor | None = None) -> None:
        """Add N graded answers.

        Args:
            correct: [N] 1/0 floats or bools; an ungraded answer must be 0 here.
            type_index: [N] long, each answer's position in `types`.
            ungraded: [N] bools, True where the reward returned None; None for none.
        """
        correct = correct.detach().to(self.correct.device, torch.float64)  # [N]
        index = type_index.to(self.correct.device, torch.long)  # [N]
        if correct.shape != index.shape:
            raise ValueError(f"correct {tuple(correct.shape)} vs type_index {tuple(index.shape)}")
        if index.numel() and (index.min() < 0 or index.max() >= len(self.types)):
            raise ValueError(f"type_index out of range for {len(self.types)} types")
        self.correct += torch.bincount(index, weights=correct, minlength=len(self.types))  # [n]
        self.total += torch.bincount(index, minlength=len(self.types)).double()  # [n]
        if ungraded is not None:
            self.ungraded += ungraded.to(self.correct.device).sum()

    def compute(self) -> dict[str, Tensor]:
        # NaN overall when nothing was seen anywhere: no accuracy is not accuracy 0.
        out = {"accuracy": self.correct.sum() / self.total.sum()}
        for name, right, seen in zip(self.types, self.correct, self.total, strict=True):
            if seen > 0:
                out[f"accuracy/{name}"] = right / seen
        return out

    def counts(self) -> dict[str, int]:
        """{"n": questions, "n/<type>": per type (seen ones), "ungraded": ...}, all processes."""
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            should_sync=self._to_sync,
            should_unsync=self._should_unsync,
        ):
            out = {"n": int(self.total.sum()), "ungraded": int(self.ungraded)}
            for name, seen in zip(self.types, self.total, strict=True):
                if seen > 0:
                    out[f"n/{name}"] = int(seen)
        return out
