"""PhaseMeter: seconds add up over re-entries, peaks follow what a phase allocates."""

from __future__ import annotations

import time

import torch

from pebr_lightning.metrics import phases
from pebr_lightning.metrics.phases import PhaseMeter

MB = 10**6


def test_seconds_add_up_over_re_entries_in_first_entry_order():
    """b, a, b, c: b's two 50 ms sleeps add up to >= 100 ms; keys in first-entry order.
    Sleep only guarantees a lower bound, so no upper bound is checked."""
    meter = PhaseMeter(torch.device("cpu"))
    for name in ("b", "a", "b", "c"):
        with meter.phase(name):
            time.sleep(0.05)
    results = meter.results
    assert list(results) == ["b", "a", "c"]
    assert results["b"]["seconds"] >= 0.1
    assert results["a"]["seconds"] >= 0.05 and results["c"]["seconds"] >= 0.05
    assert set(results["a"]) == {"seconds", "peak_bytes"}


def test_cpu_peak_grows_by_a_big_tensor_and_falls_in_a_later_phase():
    """400 MB of ones (pages written) inside "alloc": its peak is >= 300 MB above the RSS
    at entry. The tensor is freed before "idle", whose peak must be lower."""
    meter = PhaseMeter(torch.device("cpu"))
    _, entry_rss = phases._cpu_memory()
    with meter.phase("alloc"):
        big = torch.ones(400 * MB // 4, dtype=torch.float32)
        del big
    with meter.phase("idle"):
        pass
    peaks = {name: figures["peak_bytes"] for name, figures in meter.results.items()}
    assert peaks["alloc"] is not None and peaks["idle"] is not None
    assert peaks["alloc"] >= entry_rss + 300 * MB
    assert peaks["idle"] < peaks["alloc"] - 300 * MB


def test_peak_is_the_max_over_entries():
    """Entries of one phase: a small one, a 400 MB one, a small one -> the 400 MB peak."""
    meter = PhaseMeter("cpu")
    _, entry_rss = phases._cpu_memory()
    for size in (1, 400 * MB // 4, 1):
        with meter.phase("step"):
            torch.ones(size)
    assert meter.results["step"]["peak_bytes"] >= entry_rss + 300 * MB


def test_nested_phase_peak_counts_for_the_outer_phase():
    """The inner phase resets the mark; the outer phase still sees the inner 400 MB."""
    meter = PhaseMeter("cpu")
    _, entry_rss = phases._cpu_memory()
    with meter.phase("outer"):
        with meter.phase("inner"):
            torch.ones(400 * MB // 4)
        time.sleep(0.01)
    results = meter.results
    assert list(results) == ["outer", "inner"]  # first-entry order, though "inner" ended first
    assert results["outer"]["peak_bytes"] >= entry_rss + 300 * MB
    assert results["outer"]["seconds"] >= results["inner"]["seconds"]


def test_reset_forgets_the_last_step():
    meter = PhaseMeter("cpu")
    with meter.phase("rollout"):
        time.sleep(0.05)
    meter.reset()
    assert meter.results == {}
    with meter.phase("score"):
        pass
    assert list(meter.results) == ["score"]
    assert meter.results["score"]["seconds"] < 0.05


def test_results_are_a_copy():
    meter = PhaseMeter("cpu")
    with meter.phase("a"):
        pass
    meter.results["a"]["seconds"] = 99.0
    assert meter.results["a"]["seconds"] < 99.0


def test_cpu_peak_is_none_where_the_reset_is_not_permitted(tmp_path, monkeypatch):
    """A high-water mark that never resets would mislead: report None instead."""
    monkeypatch.setattr(phases, "_CLEAR_REFS", str(tmp_path / "missing" / "clear_refs"))
    meter = PhaseMeter("cpu")
    with meter.phase("a"):
        time.sleep(0.01)
    assert meter.results["a"]["peak_bytes"] is None
    assert meter.results["a"]["seconds"] >= 0.01


def test_cpu_peak_is_none_where_the_kernel_ignores_the_reset(tmp_path, monkeypatch):
    """The write is accepted (a plain file here) but the mark stays high: None."""
    monkeypatch.setattr(phases, "_CLEAR_REFS", str(tmp_path / "clear_refs"))
    monkeypatch.setattr(phases, "_cpu_memory", lambda: (10 * 2**30, 2**30))
    meter = PhaseMeter("cpu")
    with meter.phase("a"):
        pass
    assert meter.results["a"]["peak_bytes"] is None


def test_other_devices_report_no_peak():
    meter = PhaseMeter("meta")
    with meter.phase("a"):
        pass
    assert meter.results["a"]["peak_bytes"] is None
