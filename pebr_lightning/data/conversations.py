"""Conversation records: SFT data in the ShareGPT and OpenAI `messages` layouts.

Distilled SFT data usually comes as conversations, not as our question / answer
records: the paper's warm-up ran with LLaMA-Factory, whose ShareGPT layout is

    {"conversations": [{"from": "human", "value": "<image>What is x?"},
                       {"from": "gpt", "value": "### Image Description: ..."}],
     "images": ["geo/0001.png"], "system": "optional system prompt"}

and the OpenAI layout is the same with `messages`, `role` and `content` (a string with
`<image>` placeholders, or a list of `{"type": "text", "text": ...}` and
`{"type": "image"}` parts). Such a record trains on its assistant turns exactly as
written (no PeBR sections rendered around them); in a multi-turn conversation every
assistant turn is trained and every other token (system, user turns, images, the chat
template's headers) is masked. The i-th image placeholder is the i-th entry of
`images` (a single `image` string also works). They are SFT data only: GRPO and
evaluation need a question and a gradable answer.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from pebr_lightning.data.images import image_paths
from pebr_lightning.data.prompts import IMAGE_PLACEHOLDER

LAYOUTS = {"conversations": ("from", "value"), "messages": ("role", "content")}
"""Record key -> (the turn's role key, its text key); LLaMA-Factory's ShareGPT may
also hold role/content turns under `conversations`, and those are read too."""
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
"""Role names of both layouts -> the chat template's."""


def conversation_key(record: dict[str, Any]) -> str | None:
    """`conversations` or `messages` when `record` is a conversation record, else None."""
    for key in LAYOUTS:
        if key in record:
            return key
    return None


def conversation_problems(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, what is wrong) for each problem of a conversation record; [] when it is
    fine. Fields are named as a user finds them: `conversations[2].from`."""
    key = conversation_key(record)
    assert key is not None
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        return [(key, "expected a non-empty list of turns")]
    problems: list[tuple[str, str]] = []
    roles: list[str] = []
    placeholders = 0
    for index, turn in enumerate(turns):
        where = f"{key}[{index}]"
        if not isinstance(turn, dict):
            problems.append((where, "expected an object with a role and a text"))
            continue
        role_key, text_key = _keys(turn, key)
        role = ROLES.get(turn.get(role_key)) if isinstance(turn.get(role_key), str) else None
        if role is None:
            known = ", ".join(sorted(ROLES))
            problems.append(
                (f"{where}.{role_key}", f"expected one of {known}, got {turn.get(role_key)!r}")
            )
            continue
        roles.append(role)
        count, problem = _count_images(turn.get(text_key))
        if problem is not None:
            problems.append((f"{where}.{text_key}", problem))
        elif role == "assistant" and count:
            problems.append((f"{where}.{text_key}", "an assistant turn cannot hold an image"))
        placeholders += count
    if problems:
        return problems
    if "system" in record and not isinstance(record["system"], str):
        problems.append(("system", "expected a string"))
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        problems.append((key, "a system turn may only come first"))
    elif not body or body[0] != "user":
        problems.append((key, "the conversation must start with a user turn"))
    elif any(a == b for a, b in pairwise(body)):
        problems.append((key, "user and assistant turns must alternate"))
    elif body[-1] != "assistant":
        problems.append((key, "the last turn must be the assistant's (it is what is trained)"))
    images = record.get("images", record.get("image"))
    paths = image_paths(record)
    if images is not None and (not paths or any(not isinstance(p, str) or not p for p in paths)):
        name = "images" if "images" in record else "image"
        problems.append((name, "expected a list of image paths (non-empty strings)"))
    elif len(paths) != placeholders:
        problems.append(
            (
                "images",
                f"the turns hold {placeholders} image placeholder(s) ({IMAGE_PLACEHOLDER} or an "
                f"image part) but the record lists {len(paths)} image(s)",
            )
        )
    return problems


def chat_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The record's turns as chat-template messages; `<image>` placeholders become image
    parts, in order. Assumes `conversation_problems(record)` is empty."""
    key = conversation_key(record)
    assert key is not None
    messages: list[dict[str, Any]] = []
    if isinstance(record.get("system"), str):
        messages.append({"role": "system", "content": record["system"]})
    for turn in record[key]:
        role_key, text_key = _keys(turn, key)
        role = ROLES[turn[role_key]]
        content = turn[text_key]
        if role == "user":
            messages.append({"role": role, "content": _parts(content)})
        else:
            text = content if isinstance(content, str) else "".join(p["text"] for p in content)
            messages.append({"role": role, "content": text})
    return messages


def _keys(turn: dict[str, Any], key: str) -> tuple[str, str]:
    """The role and text keys a turn uses (either layout's, whatever the record key)."""
    if "role" in turn or "content" in turn:
        return "role", "content"
    if "from" in turn or "value" in turn:
        return "from", "value"
    return LAYOUTS[key]


def _count_images(content: Any) -> tuple[int, str | None]:
    """How many images a turn's content holds, or what is wrong with it."""
    if isinstance(content, str):
        return content.count(IMAGE_PLACEHOLDER), None
    if isinstance(content, list) and all(
        isinstance(p, dict)
        and (
            p.get("type") == "image" or (p.get("type") == "text" and isinstance(p.get("text"), str))
        )
        for p in content
    ):
        return sum(p["type"] == "image" for p in content), None
    return 0, "expected a string, or a list of text and image parts"


def _parts(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Content parts for the chat template: text split at the image placeholders."""
    if isinstance(content, list):
        return [
            {"type": "image"} if p["type"] == "image" else {"type": "text", "text": p["text"]}
            for p in content
        ]
    parts: list[dict[str, Any]] = []
    for index, text in enumerate(content.split(IMAGE_PLACEHOLDER)):
        if index:
            parts.append({"type": "image"})
        if text:
            parts.append({"type": "text", "text": text})
    return parts
