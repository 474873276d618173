"""The accuracy reward: is the final answer right?

As the paper (docs/paper.md, "Stage 1 reward" and "Stage 2 reward"): the text after
the last "The final answer is:" up to the line end (else the last `<answer>...</answer>`,
else the whole response) is graded against `sample["answer"]` with mathruler's
`grade_answer`. Departures: surrounding markdown bold and one trailing full stop are
removed from the answer first, and multiple-choice samples (a `choices` list and a
letter as the answer) also accept a decorated letter ("(B)", "B.", "B) 3") or the text
of the right choice. Why mathruler and not math-verify: see the class docstring.

mathruler has no timeout, and a few inputs make sympy run for ever ("9**9**9**9"
against "x"), so by default the check runs in a child Python process that is killed
and restarted when one answer takes longer than `timeout_s`. It works from any
thread; math-verify's SIGALRM timeouts only work in the main thread.

Try it on real samples: `pebr rewards check accuracy`.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
import time
import weakref
from typing import Any

from pebr_lightning.rewards.answers import extract_final_answer

# A reference answer that is an option letter: "B", "(B)".
_GOLD_LETTER = re.compile(r"\(?([A-Z])\)?", re.IGNORECASE)
# An answer that names an option: "B", "(B)", "B.", "B) 3", "Option B: red", "\boxed{B}".
_CHOSEN_LETTER = re.compile(
    r"(?:option\s+)?\(?([A-Z])\)?(?:\s*[.):].*)?", re.IGNORECASE | re.DOTALL
)
_WRAPPERS = (("**", "**"), ("$", "$"), ("\\boxed{", "}"), ("\\text{", "}"))
_STARTUP_TIMEOUT_S = 120.0

# The child process: a line [given, gold] in, "1" or "0" out; "ready" once imported.
_WORKER_SOURCE = """
import json, sys
from mathruler.grader import grade_answer
sys.stdout.write("ready\\n")
sys.stdout.flush()
try:
    for line in sys.stdin:
        given, gold = json.loads(line)
        try:
            ok = bool(grade_answer(given, gold))
        except Exception:
            ok = False
        sys.stdout.write("1\\n" if ok else "0\\n")
        sys.stdout.flush()
except KeyboardInterrupt:
    pass
"""


class AccuracyReward:
    """Scores the final answer: 1.0 if mathruler's `grade_answer` accepts it, else 0.0.

    score = 1 if grade_answer(final answer, sample["answer"]) (or, for a
    multiple-choice sample, the chosen letter or the right choice's text matches),
    else 0; None for a sample without a reference answer. A checker error or a check
    over `timeout_s` scores 0.

    Checker choice (mathruler 0.1.0 vs math-verify 0.9.0 with its default
    `parse`/`verify`, same cases; tests/rewards/test_accuracy.py holds mathruler's rows):
    both accept "3.0" = "3", "1/2" = "0.5" = "\\frac{1}{2}", "$\\frac{3}{4}$" = "0.75",
    "\\boxed{5}" = "5", "5 cm" = "5", "1,000" = "1000", "x = 3" = "3", and both reject
    "three" = "3", "B." / "B. 3" / "B) 3" = "B" and all 14 wrong answers tried ("4",
    "3.5", "30", "13", "-3", "" for "3"; "C", "(C)" for "B"; "blue" for "red"; "no" for
    "yes"; ...). Only mathruler accepts "B" / "(B)" / "b" = "B", "yes" = "Yes",
    "Red" = "red" and "\\sqrt{2}" without `$`: math-verify's default parse extracts no
    letters, words or undelimited LaTeX, and VQA answers (counts, colours, yes/no,
    option letters) are mostly those. Only math-verify accepts "2 + 1" = "3" and
    "5 apples" = "5". mathruler is also the paper's checker, so difficulty sampling and
    rewards grade alike. Against it: no timeout (handled here with a child process),
    and it does not declare its `pylatexenc` dependency (pyproject.toml does).
    """

    name = "accuracy"

    def __init__(self, timeout_s: float | None = 5.0) -> None:
        """
        Args:
            timeout_s: seconds one answer check may take before it scores 0; checks then
                run in a child process (started on first use) that is restarted after a
                timeout. None checks in this process with no time limit: faster, but a
                pathological answer can hang training.
        """
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"accuracy reward: timeout_s must be > 0 or None, got {timeout_s}")
        self.timeout_s = timeout_s
        self._grader: _GraderProcess | None = None
        self._lock = threading.Lock()

    def __call__(
        self, *, completions: list[str], samples: list[dict[str, Any]], **context: Any
    ) -> list[float | None]:
        with self._lock:
            return [
                self._score(text, sample) for text, sample in zip(completions, samples, strict=True)
            ]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_grader"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _score(self, text: str, sample: dict[str, Any]) -> float | None:
        gold = sample.get("answer")
        if not isinstance(gold, str) or not gold.strip():
            return None
        gold = gold.strip()
        answer = _clean(extract_final_answer(text))
        choices = sample.get("choices")
        gold_letter = _GOLD_LETTER.fullmatch(gold)
        if isinstance(choices, list) and gold_letter is not None:
            letter = gold_letter.group(1).upper()
            chosen = _chosen_letter(answer)
            if chosen is not None:
                return float(chosen == letter)
            index = ord(letter) - ord("A")
            if index < len(choices) and self._grade(answer, str(choices[index]).strip()):
                return 1.0
        return float(self._grade(answer, gold))

    def _grade(self, given: str, gold: str) -> bool:
        if self.timeout_s is None:
            from mathruler.grader import grade_answer

            try:
                return bool(grade_answer(given, gold))
            except Exception:
                return False
        if self._grader is None:
            self._grader = _GraderProcess()
        verdict = self._grader.grade(given, gold, self.timeout_s)
        if verdict is None:  # timed out or died: the next check starts a new process
            self._grader.close()
            self._grader = None
            return False
        return verdict


def _clean(answer: str) -> str:
    """The answer without surrounding markdown bold and one trailing full stop."""
    answer = answer.strip()
    if len(answer) > 4 and answer.startswith("**") and answer.endswith("**"):
        answer = answer[2:-2].strip()
    if len(answer) > 1 and answer.endswith("."):
        answer = answer[:-1].rstrip()
    return answer


def _chosen_letter(answer: str) -> str | None:
    """The option letter (upper case) the answer names, if it names one."""
    for opening, closing in _WRAPPERS:
        if answer.startswith(opening) and answer.endswith(closing) and len(answer) > 2:
            answer = answer[len(opening) : -len(closing)].strip()
    match = _CHOSEN_LETTER.fullmatch(answer)
    return None if match is None else match.group(1).upper()


class _GraderProcess:
    """A child Python that runs mathruler's `grade_answer`, so a hung check can be killed."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_SOURCE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        self._finalizer = weakref.finalize(self, _stop, self._proc)
        if self._read_line(_STARTUP_TIMEOUT_S) != b"ready\n":
            self.close()
            raise RuntimeError(
                "accuracy reward: the answer-checking process did not start "
                "(is mathruler installed? its error is printed above)"
            )

    def grade(self, given: str, gold: str, timeout_s: float) -> bool | None:
        """Whether `given` matches `gold`; None when the check timed out or the process died."""
        data = (json.dumps([given, gold]) + "\n").encode()
        try:
            while data:
                data = data[os.write(self._proc.stdin.fileno(), data) :]
        except OSError:
            return None
        reply = self._read_line(timeout_s)
        return None if reply is None else reply == b"1\n"

    def close(self) -> None:
        self._finalizer()

    def _read_line(self, timeout_s: float) -> bytes | None:
        """One reply line, or None at timeout or end of output."""
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        reply = b""
        while not reply.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 64)
            if not chunk:
                return None
            reply += chunk
        return reply


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()
