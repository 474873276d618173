"""`pebr schedule`'s closing table: one column per held-out figure, a dash where a stage's
evaluation did not measure it, the escaped "|" of a title kept inside its cell."""

from __future__ import annotations

import re

from pebr_lightning.schedule.report import format_table


def cells(line: str) -> list[str]:
    """A Markdown table line's cells, split on the "|" that are not escaped."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def test_table_shows_accuracy_given_a_right_and_a_wrong_description():
    """sft: 1 description in 4 right, accuracy 0.8 given one and 0.5 given a wrong one.
    perception: no description right, so its evaluation has no accuracy/desc_right:
    a dash there, not "nan"."""
    rows = [
        {
            "stage": "sft",
            "metric": "train/loss",
            "start": 1.2,
            "end": 0.1,
            "heldout_accuracy": 0.575,
            "heldout": {
                "accuracy": 0.575,
                "perception/shapes": 0.25,
                "perception/shapes_ordered": 0.125,
                "accuracy/desc_right": 0.8,
                "accuracy/desc_wrong": 0.5,
            },
        },
        {
            "stage": "perception",
            "metric": "reward/total/mean",
            "start": 0.5,
            "end": 0.6,
            "heldout_accuracy": 0.4,
            "heldout": {"accuracy": 0.4, "perception/shapes": 0.0, "accuracy/desc_wrong": 0.4},
        },
    ]
    lines = format_table(rows, baseline=0.355).splitlines()
    header = cells(lines[0])
    assert header[4:] == [
        "greedy",
        "sampled T=1",
        "pass@8",
        "desc. count",
        "desc. colours",
        "desc. shapes right",
        "desc. shapes in order",
        r"acc. \| desc. right",
        r"acc. \| desc. wrong",
    ]
    assert all(len(cells(line)) == len(header) for line in lines)  # every row lines up
    table = {cells(line)[0]: dict(zip(header, cells(line), strict=True)) for line in lines[2:]}
    sft, perception = table["sft"], table["perception"]
    assert (sft["desc. shapes right"], sft[r"acc. \| desc. right"]) == ("0.250", "0.800")
    assert sft[r"acc. \| desc. wrong"] == "0.500"
    assert (sft["desc. shapes in order"], perception["desc. shapes in order"]) == ("0.125", "—")
    assert perception[r"acc. \| desc. right"] == "—"
    assert perception[r"acc. \| desc. wrong"] == "0.400"
    assert table["(majority answer per type)"]["greedy"] == "0.355"
