"""bench/scale_ids.py: argument parsing, the analytic FLOP and byte model against a hand count, and
tiny end-to-end runs that write JSON, CSV and PNG."""
import csv
import json
import re

import pytest
import torch

from tests.helpers.bench_scripts import bench_script

scale_ids = bench_script("scale_ids")

TINY = ["--ids", "1000,5000", "--batch", "8", "--dim", "16", "--vocab", "4", "--device", "cpu",
        "--repeats", "2"]


def test_ids_list_is_sorted_and_deduplicated():
    assert scale_ids.parse_args(["--ids", "10M,1M,1e6,100M"]).ids == [10**6, 10**7, 10**8]


@pytest.mark.parametrize("text", ["0", "-5", "abc", "1.5", "", "1e-3", "10X", "1M,,10M", "1e999999999", "2e12"])
def test_bad_ids_are_rejected_naming_the_option(text, capsys):
    with pytest.raises(SystemExit):
        scale_ids.parse_args(["--ids", text])
    assert "argument --ids" in capsys.readouterr().err


def test_sample_rates():
    assert scale_ids.parse_args(["--sample-rate", "0.1,0.3,1"]).sample_rate == [0.1, 0.3, 1.0]


@pytest.mark.parametrize("text", ["0", "1.5", "-0.1", "x", "nan"])
def test_bad_sample_rates_are_rejected(text, capsys):
    with pytest.raises(SystemExit):
        scale_ids.parse_args(["--sample-rate", text])
    assert "argument --sample-rate" in capsys.readouterr().err


@pytest.mark.parametrize("argv,option", [
    (["--ids", "10M", "--vocab", "16", "--length", "5"], "--length"),  # 16^5 < 10M
    (["--vocab", "1"], "--vocab"), (["--batch", "0"], "--batch"), (["--methods", "full,magic"], "--methods"),
    (["--dtype", "fp64"], "--dtype")])
def test_bad_options_are_rejected(argv, option, capsys):
    with pytest.raises(SystemExit):
        scale_ids.parse_args(argv)
    assert f"argument {option}" in capsys.readouterr().err


def test_device_dependent_defaults():
    args = scale_ids.parse_args(["--device", "cpu"])
    assert args.dtype == "fp32" and args.ids == [10**6, 10**7, 10**8]
    assert scale_ids.parse_args(["--ids", "10M", "--length", "6"]).length == 6


def test_analytic_model_against_a_hand_count():
    # B = 4, D = 8, N = 100, V = 4 -> L = 4 (4^4 = 256 >= 100), float32.
    args = scale_ids.parse_args(["--ids", "100", "--batch", "4", "--dim", "8", "--vocab", "4",
                                 "--sample-rate", "0.1,0.01", "--device", "cpu"])
    rows = {row["method"]: row for row in
            (scale_ids.analytic_row(method, 100, args) for method in scale_ids.methods_for(args))}
    full, pfc10, pfc1, code = (rows["full softmax"], rows["partial fc 10%"], rows["partial fc 1%"],
                               rows["fused cpu"])
    # Logits 4x8 @ 8x100, grad of x 4x100 @ 100x8, grad of W 100x4 @ 4x8: 2*4*8*100 FLOPs each.
    assert full["head_flops"] == 3 * 2 * 4 * 8 * 100 == 19200
    assert full["param_bytes"] == full["grad_bytes"] == full["optimizer_bytes"] == 100 * 8 * 4 == 3200
    assert full["state_bytes"] == 9600 and full["flops_ratio_vs_full"] == 1
    # Partial FC 10%: int(0.1 * 100) = 10 classes (>= the 4 positives); all N rows stay in memory.
    assert pfc10["classes"] == 10 and pfc10["head_flops"] == 1920 and pfc10["param_bytes"] == 3200
    assert pfc10["flops_ratio_vs_full"] == 10
    # Partial FC 1%: int(1.0) = 1 class, fewer than the (up to) 4 positives, which are all kept.
    assert pfc1["classes"] == 4 and pfc1["head_flops"] == 768
    # Code head: L*V = 16 classes, weight (4, 4, 8).
    assert code["length"] == 4 and code["classes"] == 16 and code["head_flops"] == 3072
    assert code["param_bytes"] == code["grad_bytes"] == code["optimizer_bytes"] == 4 * 4 * 8 * 4 == 512
    assert code["flops_ratio_vs_full"] == 100 / 16
    assert rows["code head eager"]["head_flops"] == rows["code head compile"]["head_flops"] == 3072


def test_ten_million_ids_flop_ratio():
    args = scale_ids.parse_args(["--ids", "10M", "--device", "cpu"])
    row = scale_ids.analytic_row(scale_ids.Method("fused cpu", "fused", backend="cpu"), 10**7, args)
    assert row["length"] == 6 and row["flops_ratio_vs_full"] == 10**7 / 96


def test_tiny_run_writes_json_csv_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    paths = {kind: tmp_path / f"out.{kind}" for kind in ("json", "csv", "png")}
    scale_ids.main(TINY + ["--methods", "full,partial,eager,fused", "--json", str(paths["json"]),
                           "--csv", str(paths["csv"]), "--plot", str(paths["png"])])
    table = capsys.readouterr().out
    assert "full softmax" in table and "fused cpu" in table and "speedup" in table

    report = json.loads(paths["json"].read_text())
    assert set(report) >= {"device", "config", "results"}
    results = report["results"]
    methods = ["full softmax", "partial fc 10%", "partial fc 30%", "code head eager", "fused cpu"]
    assert [(row["ids"], row["method"]) for row in results] == [(n, m) for n in (1000, 5000) for m in methods]
    for row in results:
        assert set(row) == set(scale_ids.RESULT_FIELDS)
        assert row["skipped"] is None and row["time_ms"] > 0 and row["head_flops"] > 0
        assert row["param_bytes"] > 0 and row["peak_extra_bytes"] is None  # not measured on the CPU
        assert row["speedup_baseline"] == "full softmax"
        assert row["speedup"] == pytest.approx(
            next(r["time_ms"] for r in results if r["ids"] == row["ids"] and r["method"] == "full softmax")
            / row["time_ms"])

    with open(paths["csv"], newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == scale_ids.RESULT_FIELDS
        assert [row["method"] for row in reader] == [row["method"] for row in results]

    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speedup_against_the_strongest_baseline_that_ran():
    methods = [scale_ids.Method("full softmax", "full"), scale_ids.Method("partial fc 10%", "partial", rate=0.1),
               scale_ids.Method("partial fc 30%", "partial", rate=0.3), scale_ids.Method("code head eager", "eager"),
               scale_ids.Method("code head compile", "compile"), scale_ids.Method("fused cpu", "fused")]

    def speedups(times):
        results = [{"method": name, "ids": 10**7, "time_ms": ms, "speedup": None, "speedup_baseline": None}
                   for name, ms in times.items()]
        scale_ids.add_speedups(results, methods)
        return [(row["speedup"], row["speedup_baseline"]) for row in results]

    # Full softmax skipped: the fastest Partial FC.
    assert speedups({"full softmax": None, "partial fc 10%": 8.0, "partial fc 30%": 20.0, "code head eager": 4.0,
                     "code head compile": 2.0, "fused cpu": 1.0}) == [
        (None, None), (1.0, "partial fc 10%"), (0.4, "partial fc 10%"), (2.0, "partial fc 10%"),
        (4.0, "partial fc 10%"), (8.0, "partial fc 10%")]
    # No softmax head fits: the fastest code head in plain PyTorch.
    assert speedups({"full softmax": None, "partial fc 10%": None, "partial fc 30%": None, "code head eager": 4.0,
                     "code head compile": 2.0, "fused cpu": 1.0})[3:] == [
        (0.5, "code head compile"), (1.0, "code head compile"), (2.0, "code head compile")]
    assert scale_ids.format_speedup({"speedup": 4.0, "speedup_baseline": "partial fc 10%"}) == "4x vs partial fc 10%"
    assert scale_ids.format_fewer(104_166.7) == "104,167x fewer" and scale_ids.format_fewer(1) == "same"


def test_report_goes_to_a_results_folder_named_on_the_last_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        scale_ids.main(TINY + ["--methods", "fused", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    folder = re.fullmatch(r"wrote scale_ids\.json, scale_ids\.csv(, scale_ids\.png)? to (\S+)( \(no plot.*\))?", last)
    assert folder, last
    written = sorted(path.name for path in (tmp_path / folder[2]).iterdir())
    assert written == sorted(["scale_ids.json", "scale_ids.csv"] + (["scale_ids.png"] if folder[1] else []))
    assert json.loads((tmp_path / folder[2] / "scale_ids.json").read_text())["config"]["threads"] == 1


def test_rows_that_do_not_fit_are_skipped_with_the_analytic_figures_kept(tmp_path):
    out = tmp_path / "scale_ids.json"
    scale_ids.main(TINY + ["--methods", "full,fused", "--max-memory-gb", "0.001", "--out", str(tmp_path)])
    results = json.loads(out.read_text())["results"]
    assert len(results) == 4
    for row in results:
        assert row["time_ms"] is None and row["head_flops"] > 0 and row["state_bytes"] > 0
        assert re.fullmatch(r"skipped: needs [\d.]+ [kMGT]?B, [\d.]+ [kMGT]?B free", row["skipped"])


def test_a_failing_step_is_reported_not_raised(monkeypatch):
    def failing_head(*args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(scale_ids, "make_head", failing_head)
    args = scale_ids.parse_args(TINY + ["--methods", "full"])
    report = scale_ids.run_benchmark(args)
    assert [row["skipped"] for row in report["results"]] == [
        "skipped: out of memory: CUDA out of memory. Tried to allocate 20.00 GiB"] * 2
