"""The PeBR prompt and response format.

The paper's prompt puts an instruction before the question (describe the image as
the question needs, give a rationale, reason step by step, end with only the final
result); the response is a sequence of `###` sections (docs/paper.md, "Response
format"). The SFT target is rendered from a manifest record's `description`,
`rationale`, `reasoning` and `answer`, and the same headers are what the format
reward (a later issue) checks for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pebr_lightning.data.images import image_paths

DESCRIPTION_HEADER = "### Image Description:"
RATIONALE_HEADER = "### Rationales:"
THINK_HEADER = "### Let's think step by step."
STEP_HEADER = "### Step {n}:"
ANSWER_HEADER = "### The final answer is:"
IMAGE_PLACEHOLDER = "<image>"
"""Where an image goes in a question or a conversation turn (LLaMA-Factory's mark)."""

# Our own wording of the paper's instruction (same content, same order of demands).
PEBR_INSTRUCTION = (
    "First describe the image as the question needs, then give the rationale, "
    "then think step by step, and end with only the final result after "
    '"The final answer is:".'
)


@dataclass(frozen=True)
class PromptConfig:
    """How a manifest record becomes a chat prompt."""

    instruction: str = PEBR_INSTRUCTION
    """Text put before the question in the user turn; empty for none."""
    system_prompt: str | None = None
    """System message; None leaves the chat template's default."""


def build_messages(record: dict[str, Any], prompt: PromptConfig) -> list[dict[str, Any]]:
    """Chat messages for one record: optional system turn, then the images, the
    instruction and the question.

    A record with several `images` gets one image part each, in order, before the
    text; where its question holds `<image>` placeholders (one per image, checked when
    the manifest is loaded), each image goes where its placeholder is instead.
    """
    count = max(len(image_paths(record)), 1)
    question = record["question"]
    marks = question.count(IMAGE_PLACEHOLDER)
    messages: list[dict[str, Any]] = []
    if prompt.system_prompt is not None:
        messages.append({"role": "system", "content": prompt.system_prompt})
    if marks and marks == count:
        head = f"{prompt.instruction}\n" if prompt.instruction else ""
        content: list[dict[str, Any]] = []
        for index, text in enumerate((head + question).split(IMAGE_PLACEHOLDER)):
            if index:
                content.append({"type": "image"})
            if text:
                content.append({"type": "text", "text": text})
    else:
        text = f"{prompt.instruction}\n{question}" if prompt.instruction else question
        content = [*({"type": "image"} for _ in range(count)), {"type": "text", "text": text}]
    messages.append({"role": "user", "content": content})
    return messages


def render_response(
    answer: str,
    description: str = "",
    rationale: str = "",
    steps: list[str] | str | None = None,
) -> str:
    """The PeBR response: description, rationale, numbered steps, final answer.

    With no steps, one step restating the answer is written so that the
    `### Step 1:` header the format reward requires is always present.
    """
    if steps is None or steps == []:
        steps = [f"The answer is {answer}."]
    elif isinstance(steps, str):
        steps = [steps]
    lines = [
        f"{DESCRIPTION_HEADER} {description}".rstrip(),
        f"{RATIONALE_HEADER} {rationale}".rstrip(),
        THINK_HEADER,
    ]
    lines += [f"{STEP_HEADER.format(n=i)} {step}" for i, step in enumerate(steps, start=1)]
    lines.append(f"{ANSWER_HEADER} {answer}")
    return "\n".join(lines)


def record_response(record: dict[str, Any]) -> str:
    """The SFT target of a manifest record (missing optional fields render as empty sections)."""
    return render_response(
        answer=record["answer"],
        description=record.get("description", ""),
        rationale=record.get("rationale", ""),
        steps=record.get("reasoning"),
    )
