"""Which completion tokens a stage trains: the whole response, or one side of a marker.

A PeBR response is a description followed by rationale, steps and answer. Each stage's
reward scores one part of it: Stage 1's perception rewards read the description, Stage
2's accuracy reward reads the final answer. With the whole completion in the loss,
every token shares one advantage, so a perception reward also pushes the reasoning
tokens around and an answer reward also rewrites the description: on the embedded demo
reasoning RL lowered held-out shape counts this way (docs/RESULTS.md). Training only the
part a reward scores gives each stage its own job; the paper trains every token.

`section_mask` works on the text of each completion token, so it is tokenizer-agnostic:
the caller passes each token's decoded piece. A completion without the marker keeps
every token (it has no sections to tell apart, and the format reward still needs to
reach it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Side = Literal["before", "after"]


def section_mask(
    pieces: Sequence[Sequence[str]], completion_mask: Tensor, marker: str, side: Side
) -> Tensor:
    """completion_mask [B, T] restricted to the tokens before or from `marker` on.

    pieces[b][t] is the text of token t of completion b (one per real token, padding
    left out or present, only the first `completion_mask[b].sum()` are read). A token
    belongs to the part before the marker when it starts before the marker's first
    character; "after" keeps the others (the marker's own tokens included). Rows
    without the marker keep their whole mask.
    """
    out = completion_mask.clone()  # [B, T]
    for b, row in enumerate(pieces):
        n = int(completion_mask[b].sum())
        text = "".join(row[:n])
        at = text.find(marker)
        if at < 0:
            continue
        starts, pos = [], 0
        for piece in row[:n]:
            starts.append(pos)
            pos += len(piece)
        before = torch.tensor([s < at for s in starts], dtype=torch.bool)  # [n]
        keep = before if side == "before" else ~before
        out[b, :n] = out[b, :n] * keep.to(out.dtype).to(out.device)
    return out
