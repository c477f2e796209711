"""bench/harness.py: counts on the command line, timing that honours its limits, figures as printed."""
import argparse
import time

import pytest
import torch

from tests.helpers.bench_scripts import bench_script

harness = bench_script("harness")


@pytest.mark.parametrize("text,count", [
    ("10M", 10_000_000), ("1.5M", 1_500_000), ("100K", 100_000), ("1e7", 10_000_000),
    ("10000000", 10_000_000), ("1G", 10**9), ("10m", 10_000_000), ("2.5e3", 2500), (".5K", 500),
    ("1.1M", 1_100_000)])
def test_parse_count(text, count):
    assert harness.parse_count(text) == count


@pytest.mark.parametrize("text", ["0", "-5", "abc", "1.5", "", "1e-3", "10X", "1e999999999", "2e12"])
def test_parse_count_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        harness.parse_count(text)


def test_elapsed_ms_times_every_call():
    calls = []
    ms = harness.elapsed_ms(lambda: (calls.append(1), time.sleep(0.01)), "cpu", calls=3)
    assert len(calls) == 3 and ms >= 30


def test_times_ms_stops_at_repeats_or_max_seconds():
    assert len(harness.times_ms(lambda: None, "cpu", repeats=4)) == 4
    times = harness.times_ms(lambda: time.sleep(0.02), "cpu", repeats=100, max_seconds=0.05)
    assert 2 <= len(times) <= 4 and all(t >= 20 for t in times)


def test_formatting():
    assert [harness.format_count(n) for n in (512, 1500, 10**7, 2 * 10**9)] == ["512", "1.5K", "10M", "2G"]
    assert harness.format_si(1.57e13, "FLOP") == "15.7 TFLOP" and harness.format_si(None, "B") == "-"


@pytest.mark.parametrize("num_ids,block", [(None, 7), (None, 1000), (50, 7), (45, 4)])
def test_brute_force_topk_against_one_product(num_ids, block):
    generator = torch.Generator().manual_seed(0)
    features, vectors = torch.randn(9, 5, generator=generator), torch.randn(20, 5, generator=generator)
    rows = torch.arange(num_ids or 20) % 20  # rows past the vectors reuse them from the start
    expected = (features @ vectors[rows].T).topk(5, dim=1)
    ids = harness.brute_force_topk(features, vectors, 5, num_ids, block)
    torch.testing.assert_close(torch.gather(features @ vectors[rows].T, 1, ids), expected.values)
