"""bench/train_throughput.py: a tiny CPU run of every head, and rows that cannot fit skipped before
anything is allocated."""
import json
import re

import pytest

from tests.helpers.bench_scripts import bench_script

train_throughput = bench_script("train_throughput")

TINY = ["--backbone", "cnn", "--image-size", "32", "--batch", "8", "--embedding-dim", "16",
        "--steps", "2", "--warmup", "1", "--device", "cpu"]


def test_defaults():
    args = train_throughput.parse_args([])
    assert (args.backbone, args.ids, args.vocab, args.sample_rate) == ("iresnet50", [10**6, 10**7], 16, 0.1)
    assert (args.batch, args.image_size, args.embedding_dim, args.steps, args.warmup) == (256, 112, 512, 20, 5)
    assert args.device in ("cpu", "cuda")


@pytest.mark.parametrize("argv,option", [
    (["--ids", "1M,x"], "--ids"), (["--vocab", "1"], "--vocab"), (["--sample-rate", "0"], "--sample-rate"),
    (["--backbone", "resnet"], "--backbone"), (["--warmup", "-1"], "--warmup"), (["--batch", "0"], "--batch")])
def test_bad_options_are_rejected(argv, option, capsys):
    with pytest.raises(SystemExit):
        train_throughput.parse_args(argv)
    assert f"argument {option}" in capsys.readouterr().err


def test_tiny_cpu_run_measures_every_head(tmp_path, capsys):
    out = tmp_path / "out.json"
    train_throughput.main(TINY + ["--ids", "5000,1000", "--json", str(out)])
    table = capsys.readouterr().out
    assert "| backbone |" in table and "| partial_fc | 5K |" in table

    report = json.loads(out.read_text())
    assert set(report) == {"device", "torch", "date", "args", "rows"}
    assert report["args"]["ids"] == [1000, 5000] and report["args"]["device"] == "cpu"
    rows = report["rows"]
    assert [(row["head"], row["ids"]) for row in rows] == [("backbone", None)] + [
        (head, n) for n in (1000, 5000) for head in ("gif", "full", "partial_fc")]
    for row in rows:
        assert row["skipped"] is None and row["images_per_s"] > 0 and row["ratio_vs_backbone"] > 0
        assert row["images_per_s"] == pytest.approx(8e3 / row["step_ms"])
        assert row["peak_cuda_bytes"] is None  # CPU run
    assert rows[0]["ratio_vs_backbone"] == 1.0
    by_key = {(row["head"], row["ids"]): row for row in rows}
    # V = 16: L = 3 at 1000 identities (16^3 = 4096), 4 at 5000; the code head scores L * V classes.
    assert by_key["gif", 1000]["code_length"] == 3 and by_key["gif", 5000]["code_length"] == 4
    assert by_key["gif", 5000]["classes"] == 64 and by_key["gif", 5000]["head_param_bytes"] == 64 * 16 * 4
    assert by_key["full", 5000]["classes"] == 5000 and by_key["full", 5000]["head_param_bytes"] == 5000 * 16 * 4
    assert by_key["partial_fc", 5000]["classes"] == 500 and by_key["partial_fc", 1000]["classes"] == 100


def test_rows_that_cannot_fit_are_skipped_without_allocating(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(train_throughput, "build_head", lambda kind, *args: built.append(kind))
    out = tmp_path / "out.json"
    train_throughput.main(TINY + ["--ids", "1e12", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert built == []
    assert [row["head"] for row in rows] == ["backbone", "gif", "full", "partial_fc"]
    for row in rows[1:]:
        # The dense heads' (N, D) weight, and the code head's codebook of N codes, cannot fit.
        assert re.fullmatch(r"skipped: needs [\d.]+ [kMGTP]?B, [\d.]+ [kMGTP]?B free", row["skipped"])
        assert row["images_per_s"] is None and row["ratio_vs_backbone"] is None
    assert rows[1]["code_length"] == 10 and rows[3]["classes"] == 10**11
    assert rows[2]["head_param_bytes"] == 10**12 * 16 * 4


def test_a_step_out_of_memory_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    measure = train_throughput.measure

    def full_runs_out(backbone, head, *args):
        if isinstance(head, train_throughput.FullSoftmaxHead) and \
                not isinstance(head, train_throughput.PartialFCHead):
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return measure(backbone, head, *args)
    monkeypatch.setattr(train_throughput, "measure", full_runs_out)
    out = tmp_path / "out.json"
    train_throughput.main(TINY + ["--ids", "1000", "--json", str(out)])
    skipped = {row["head"]: row["skipped"] for row in json.loads(out.read_text())["rows"]}
    assert skipped == {"backbone": None, "gif": None, "partial_fc": None,
                       "full": "skipped: out of memory: CUDA out of memory. Tried to allocate 20.00 GiB"}
