import math

import torch

from pebr_lightning.algorithms.logprobs import IGNORE_INDEX, shifted_targets, token_logprobs


def test_token_logprobs_hand_computed():
    """Identity head, so hidden rows are the logits.

    Row 0: logits [0, ln 2, 0], target 1 -> softmax denominator 1 + 2 + 1 = 4,
           log p = ln 2 - ln 4 = -ln 2.
    Row 1: logits [0, 0, 0], target 2 -> log p = -ln 3.
    """
    hidden = torch.tensor([[0.0, math.log(2.0), 0.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([1, 2])
    logp = token_logprobs(hidden, torch.nn.Identity(), targets, chunk_size=1)
    torch.testing.assert_close(logp, torch.tensor([-math.log(2.0), -math.log(3.0)]))


def test_token_logprobs_temperature_divides_logits():
    """Temperature 2 halves the logits: [0, ln 4, 0] becomes [0, ln 2, 0] -> -ln 2 for target 1."""
    hidden = torch.tensor([[0.0, math.log(4.0), 0.0]])
    logp = token_logprobs(hidden, torch.nn.Identity(), torch.tensor([1]), temperature=2.0)
    torch.testing.assert_close(logp, torch.tensor([-math.log(2.0)]))


def test_chunked_gradients_match_unchunked():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(13, 8, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    full = torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None]).squeeze(-1)
    (g_full,) = torch.autograd.grad(full.sum(), hidden)
    chunked = token_logprobs(hidden, head, targets, chunk_size=4)
    (g_chunk,) = torch.autograd.grad(chunked.sum(), hidden)
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(g_chunk, g_full)


def test_shifted_targets_keeps_only_labelled_next_tokens():
    """Position t predicts label t+1: labels [-100, -100, 5, 6] keep hidden rows 1 and 2."""
    hidden = torch.arange(4.0).view(1, 4, 1)  # row value = position
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6]])
    rows, targets = shifted_targets(hidden, labels)
    assert rows.flatten().tolist() == [1.0, 2.0]
    assert targets.tolist() == [5, 6]


def test_sft_loss_on_hand_built_batch_masks_the_prompt():
    """A 2-sequence batch, vocabulary 3, identity head (hidden rows are logits).

    Sequence 0: prompt tokens at 0-1 (masked), response tokens 1 then 2 at 2-3.
      hidden[0,1] = [0, ln 2, 0] predicts label 1 -> -ln 2
      hidden[0,2] = [0, 0, 0]    predicts label 2 -> -ln 3
    Sequence 1: all prompt, one response token 0 at position 3, padded nowhere.
      hidden[1,2] = [ln 3, 0, 0] predicts label 0 -> ln 3 - ln 5
    Everything on masked positions is set to huge values that would dominate the
    loss if it leaked in. Loss = mean(ln 2, ln 3, ln 5 - ln 3) = ln(10) / 3.
    """
    big = [50.0, -50.0, 0.0]
    hidden = torch.tensor(
        [
            [big, [0.0, math.log(2.0), 0.0], [0.0, 0.0, 0.0], big],
            [big, big, [math.log(3.0), 0.0, 0.0], big],
        ]
    )
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 1, 2], [IGNORE_INDEX] * 3 + [0]])
    rows, targets = shifted_targets(hidden, labels)
    loss = -token_logprobs(rows, torch.nn.Identity(), targets).mean()
    assert math.isclose(loss.item(), math.log(10.0) / 3, rel_tol=1e-6)
