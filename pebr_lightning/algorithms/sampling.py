"""Next-token sampling: temperature, top-k and nucleus (top-p) filtering.

Two sources of randomness: a torch generator (`torch.multinomial`), or keyed noise
(`keyed_uniform`): the uniform drawn for token v of a row at decode step t is a
hash of (row key, t, v), and the token is the Gumbel-max over the filtered logits,
an exact draw from the same distribution. A completion then depends on its key
and the logits only, not on which other rows share the batch or the process: GRPO
keys rows by (seed, step, sample id, group member), so a run on 1 or N processes,
or one resumed mid-epoch, samples the same completions.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k / top-p nucleus to -inf (always keeps the best token).

    logits [N, V] -> [N, V]. top_k 0 and top_p 1.0 disable each filter. The nucleus
    is the smallest set of most likely tokens whose probability reaches top_p.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))  # [N, V]
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [N, V]
        probs = sorted_logits.softmax(-1)  # [N, V]
        # mass of the tokens strictly before each one: drop a token once that mass is >= top_p
        before = probs.cumsum(-1) - probs  # [N, V]
        drop_sorted = before >= top_p  # [N, V]; position 0 has mass 0, so it is never dropped
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # [N, V] back in vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for int64 tensors holding 32-bit values.

    The product can pass 2**63, and the low 32 bits of a wrapped int64 product are
    those of the true one, so one multiply and a mask suffice where the device's int64
    multiply wraps (CPU and CUDA do; checked once per device type). Elsewhere: split x
    into 16-bit halves, x*c = lo*c + (hi*c << 16), each product below 2**48.
    """
    if _wrapping_multiply(x.device.type):
        return (x * c) & _MASK32
    return _mul32_split(x, c)


def _mul32_split(x: Tensor, c: int) -> Tensor:
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _MASK32


@functools.cache
def _wrapping_multiply(device_type: str) -> bool:
    """Whether int64 products on `device_type` keep their low 32 bits when they overflow."""
    x = torch.tensor([0xFFFFFFFF, 0x80000000, 0x9E3779B9, 12345], device=device_type)
    c = 0x846CA68B
    return bool(torch.equal((x * c) & _MASK32, _mul32_split(x, c)))


def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (the "lowbias32" xor-shift-multiply finaliser), elementwise.

    int64 tensor of values in [0, 2**32) -> same shape and range.
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def token_hash(vocab: int, device: torch.device | str | None = None) -> Tensor:
    """The per-token half of the keyed hash -> [V] int64 (the same for every row and step)."""
    return mix32(torch.arange(vocab, device=device, dtype=torch.long) * 0x9E3779B9)


def keyed_uniform_steps(keys: Tensor, steps: Tensor, tokens: Tensor) -> Tensor:
    """Uniforms in (0, 1) for several decode steps at once.

    keys [N] int64 (32-bit values), steps [S] int64, tokens [V] = token_hash(V)
    -> [S, N, V] float32. Three hash rounds chain the inputs so that nearby keys,
    steps and tokens give unrelated values.
    """
    step = mix32(steps.long() & _MASK32)  # [S]
    row = mix32(mix32(keys.long())[None, :] ^ step[:, None])  # [S, N]
    return hash_to_unit(mix32(row[..., None] ^ tokens))  # [S, N, V]


def hash_to_unit(bits: Tensor) -> Tensor:
    """32-bit hashes -> float32 uniforms strictly inside (0, 1).

    The top 24 bits plus a half fill float32's mantissa. The largest value,
    (2**24 - 0.5) / 2**24, rounds to exactly 1.0 in float32, whose Gumbel noise
    -log(-log(1)) is +inf: that token would win even where filtering set its logit
    to -inf (inf - inf is NaN, and argmax takes NaN). One draw in 2**24 does this;
    a 152k vocabulary makes millions per decode step, so it is clamped below 1.
    """
    return (((bits >> 8).float() + 0.5) / 2**24).clamp_(max=1.0 - 2**-24)


def keyed_uniform(keys: Tensor, step: int, vocab: int) -> Tensor:
    """Uniforms in (0, 1), a pure function of (key, step, token index).

    keys [N] int64 (32-bit values) -> [N, V] float32.
    """
    steps = torch.tensor([step], dtype=torch.long, device=keys.device)
    return keyed_uniform_steps(keys, steps, token_hash(vocab, keys.device))[0]


class KeyedGumbel:
    """The Gumbel noise -log(-log(keyed_uniform(keys, t, V))) of decode steps t = 0, 1, ...

    Made for a block of steps at a time and served step by step: the hash is ~25
    elementwise ops, and at a rollout's batch x vocabulary their fixed cost per call
    (CPU) or per kernel launch (GPU) dominates, so one call per block instead of one
    per token saves most of it. The token half of the hash is computed once. Blocks
    hold at most `budget_bytes` of int64 hash intermediates (one step when a single
    step is larger) and never reach past step `steps` - 1. The budget is small on
    purpose: on CPU, temporaries above glibc's mmap threshold (up to 32 MiB) are
    fresh pages each time, and at 64 MiB blocks were 4x slower than one step at a
    time (docs/BENCHMARKS.md).
    """

    def __init__(
        self, keys: Tensor, vocab: int, steps: int, budget_bytes: int = 16 * 2**20
    ) -> None:
        self.keys = keys  # [N]
        self.steps = steps
        self.tokens = token_hash(vocab, keys.device)  # [V]
        self.block = max(1, budget_bytes // (8 * keys.numel() * vocab))
        self._start = 0
        self._noise: Tensor | None = None  # [S, N, V] for steps _start ... _start + S - 1

    def __call__(self, step: int) -> Tensor:
        """Noise of decode step `step` -> [N, V] float32."""
        held = self._noise is not None and self._start <= step < self._start + len(self._noise)
        if not held:
            end = max(min(step + self.block, self.steps), step + 1)
            steps = torch.arange(step, end, device=self.keys.device)  # [S]
            self._noise = -torch.log(-torch.log(keyed_uniform_steps(self.keys, steps, self.tokens)))
            self._start = step
        return self._noise[step - self._start]


def sample_tokens(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    banned: Tensor | None = None,
    keys: Tensor | None = None,
    step: int = 0,
    gumbel: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample one token per row; returns (tokens [N], their log-probs [N]).

    The log-prob is that of the temperature-scaled, unfiltered distribution: the
    distribution the policy-gradient loss evaluates (it scales logits by the same
    temperature), so rollout and training log-probs agree. `banned` token ids are
    never drawn but stay in that distribution. With `keys` ([N] int64), the draw is
    the Gumbel-max over keyed noise for decode step `step` (`generator` is unused);
    `gumbel` ([N, V], from KeyedGumbel) is that noise already made.
    """
    if temperature <= 0:
        tokens = logits.argmax(-1)  # [N]
        return tokens, logits.float().log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    scaled = logits.float() / temperature  # [N, V]
    filtered = filter_logits(scaled, top_k, top_p)  # [N, V]
    if banned is not None and banned.numel():
        filtered = filtered.index_fill(-1, banned, float("-inf"))  # [N, V]
    if gumbel is None and keys is not None:
        gumbel = -torch.log(-torch.log(keyed_uniform(keys, step, filtered.shape[-1])))  # [N, V]
    if gumbel is not None:
        tokens = (filtered + gumbel.to(filtered.device)).argmax(-1)  # [N]
    else:
        tokens = torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(-1)
    logp = scaled.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)  # [N]
    return tokens, logp
