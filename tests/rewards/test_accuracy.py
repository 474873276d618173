"""The accuracy reward: answer extraction, mathruler's verdicts, multiple choice, robustness."""

from __future__ import annotations

import pickle
import threading
import time

import pytest

from pebr_lightning.rewards.accuracy import AccuracyReward

# The checker comparison behind choosing mathruler (AccuracyReward's docstring):
# (given, reference, mathruler's verdict, math-verify 0.9.0's verdict with default
# parse/verify). Only mathruler is installed, so only its column is checked here.
CHECKER_TABLE = [
    # plain numbers
    ("3", "3", True, True),
    ("3.0", "3", True, True),
    ("3.00", "3", True, True),
    ("1,000", "1000", True, True),
    ("three", "3", False, False),
    # fractions and LaTeX
    ("1/2", "0.5", True, True),
    ("0.5", "1/2", True, True),
    ("\\frac{1}{2}", "1/2", True, True),
    ("\\frac{1}{2}", "0.5", True, True),
    ("$\\frac{3}{4}$", "3/4", True, True),
    ("$\\frac{3}{4}$", "0.75", True, True),
    ("\\boxed{5}", "5", True, True),
    ("$5$", "5", True, True),
    ("\\sqrt{2}", "\\sqrt{2}", True, False),
    # units and expressions
    ("5 cm", "5", True, True),
    ("5cm", "5", True, True),
    ("5 apples", "5", False, True),
    ("x = 3", "3", True, True),
    ("2 + 1", "3", False, True),
    # option letters
    ("B", "B", True, False),
    ("(B)", "B", True, False),
    ("b", "B", True, False),
    ("B.", "B", False, False),
    ("B. 3", "B", False, False),
    ("B) 3", "B", False, False),
    # words
    ("yes", "Yes", True, False),
    ("Yes", "yes", True, False),
    ("red", "red", True, False),
    ("Red", "red", True, False),
    ("blue square", "blue square", True, False),
    # wrong answers: neither may accept these
    ("4", "3", False, False),
    ("3.5", "3", False, False),
    ("30", "3", False, False),
    ("13", "3", False, False),
    ("-3", "3", False, False),
    ("", "3", False, False),
    ("2/3", "1/2", False, False),
    ("\\frac{1}{3}", "0.5", False, False),
    ("C", "B", False, False),
    ("(C)", "B", False, False),
    ("blue", "red", False, False),
    ("no", "yes", False, False),
    ("square", "blue square", False, False),
    ("left", "right", False, False),
]


@pytest.fixture(scope="module")
def reward() -> AccuracyReward:
    """The default reward: checks run in a child process with a 5 s limit each."""
    return AccuracyReward()


def answer(text: str) -> str:
    return f"### Step 1: done.\n### The final answer is: {text}"


@pytest.mark.parametrize(("given", "gold", "mathruler", "_math_verify"), CHECKER_TABLE)
def test_checker_table(given: str, gold: str, mathruler: bool, _math_verify: bool) -> None:
    from mathruler.grader import grade_answer

    assert grade_answer(given, gold) is mathruler


def test_reward_agrees_with_checker_table(reward: AccuracyReward) -> None:
    """Through the child process, rows whose answer survives `_clean` unchanged."""
    rows = [row for row in CHECKER_TABLE if not row[0].endswith(".")]
    out = reward(
        completions=[answer(given) for given, *_ in rows],
        samples=[{"answer": gold} for _, gold, *_ in rows],
    )
    assert out == [1.0 if mathruler else 0.0 for _, _, mathruler, _ in rows]


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        (answer("3"), "3", 1.0),
        (answer("4"), "3", 0.0),
        ("### The final answer is: 4\n(it was 3)", "3", 0.0),  # up to the line end
        ("The final answer is: 2\n### The final answer is: 3", "3", 1.0),  # the last one
        ("### THE FINAL ANSWER IS:3", "3", 1.0),
        ("<think>so 3</think><answer> 3 </answer>", "3", 1.0),
        ("<answer>4</answer><answer>3</answer>", "3", 1.0),  # the last tag
        (" 3 ", "3", 1.0),  # no marker: the whole response
        ("I think it is 3", "3", 0.0),  # ... which is then all graded
        (answer("Yes."), "yes", 1.0),  # one trailing full stop removed
        (answer("**7**"), "7", 1.0),  # markdown bold removed
        (answer("$\\frac{1}{2}$"), "0.5", 1.0),
        (answer("3"), " 3\n", 1.0),  # the reference is stripped
    ],
)
def test_extraction_and_cleaning(completion: str, gold: str, expected: float) -> None:
    reward = AccuracyReward(timeout_s=None)
    assert reward(completions=[completion], samples=[{"answer": gold}]) == [expected]


CHOICE = {"answer": "B", "choices": ["1", "2", "5", "7"]}


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("B", 1.0),
        ("b", 1.0),
        ("(B)", 1.0),
        ("B.", 1.0),
        ("B) 2", 1.0),
        ("B. 2", 1.0),
        ("B: 2", 1.0),
        ("Option B", 1.0),
        ("\\boxed{B}", 1.0),
        ("$B$", 1.0),
        ("**B**", 1.0),
        ("2", 1.0),  # the text of the right choice
        ("2.0", 1.0),
        ("C", 0.0),
        ("(A)", 0.0),
        ("C. 2", 0.0),  # a wrong letter wins over the right text
        ("5", 0.0),  # the text of a wrong choice
        ("B or C", 0.0),
        ("", 0.0),
    ],
)
def test_multiple_choice(given: str, expected: float) -> None:
    reward = AccuracyReward(timeout_s=None)
    assert reward(completions=[answer(given)], samples=[CHOICE]) == [expected]


def test_choice_text_needs_choices_and_a_letter_reference() -> None:
    reward = AccuracyReward(timeout_s=None)
    samples = [
        {"answer": "B"},  # no choices: "2" is just wrong
        {"answer": "2", "choices": ["1", "2"]},  # the reference is the text itself
        {"answer": "B", "choices": ["1"]},  # letter past the choices: letters only
    ]
    out = reward(completions=[answer("2"), answer("B) 2"), answer("1")], samples=samples)
    assert out == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("sample", [{}, {"answer": ""}, {"answer": "  "}, {"answer": None}])
def test_no_reference_is_not_applicable(sample: dict) -> None:
    assert AccuracyReward(timeout_s=None)(completions=[answer("3")], samples=[sample]) == [None]


WEIRD = [
    "",
    "\\frac{",
    "}{",
    "$$$",
    "\\boxed{",
    "\x00\x01",
    "((((((((((",
    "1/0",
    "nan",
    "\\sqrt{-1}^{\\infty}",
    "é ∑ 🙂",
    "The final answer is: " + "9" * 5000,
]


@pytest.mark.parametrize("timeout_s", [None, 5.0])
def test_weird_output_never_raises(reward: AccuracyReward, timeout_s: float | None) -> None:
    scorer = reward if timeout_s else AccuracyReward(timeout_s=None)
    out = scorer(completions=WEIRD, samples=[{"answer": "3"}] * len(WEIRD))
    assert out == [0.0] * len(WEIRD)


def test_hung_check_times_out_and_the_next_check_works() -> None:
    """mathruler alone never returns on this pair (sympy evaluates 9^(9^(9^9)))."""
    reward = AccuracyReward(timeout_s=1.0)
    start = time.monotonic()
    out = reward(
        completions=[answer("9**9**9**9"), answer("3.0")],
        samples=[{"answer": "x"}, {"answer": "3"}],
    )
    assert out == [0.0, 1.0]
    assert time.monotonic() - start < 30


def test_works_outside_the_main_thread(reward: AccuracyReward) -> None:
    result = []
    thread = threading.Thread(
        target=lambda: result.append(
            reward(completions=[answer("0.5")], samples=[{"answer": "1/2"}])
        )
    )
    thread.start()
    thread.join(timeout=60)
    assert result == [[1.0]]


@pytest.mark.parametrize("timeout_s", [None, 5.0])
def test_pickle_round_trip(timeout_s: float | None) -> None:
    reward = AccuracyReward(timeout_s=timeout_s)
    completions = [answer("3"), answer("(B)"), answer("no")]
    samples = [{"answer": "3"}, CHOICE, {"answer": "yes"}]
    expected = [1.0, 1.0, 0.0]
    assert reward(completions=completions, samples=samples) == expected  # starts its process
    copy = pickle.loads(pickle.dumps(reward))
    assert copy.name == "accuracy"
    assert copy.timeout_s == timeout_s
    assert copy(completions=completions, samples=samples, tokenizer=None, unknown=1) == expected


def test_bad_timeout() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        AccuracyReward(timeout_s=0)
