"""bench/accuracy.py: a tiny table of every default run, runs read back instead of retrained, the head
cost from the FLOP model, the targets' checks, and command-line mistakes."""
import json

import pytest

from tests.helpers.bench_scripts import bench_script
from tests.helpers.trainer_runs import TINY

accuracy = bench_script("accuracy")
harness = bench_script("harness")

# The tiny trainer run's model and data; the runner adds --data, --ids, --seed, --epochs, --out.
# 4 epochs of 3 steps: the switches of gif-pq6-retokenized (2 epochs) and gif-pfc-pq6 (3) fall inside.
SHARED = ["--images-per-id", "4", "--epochs", "4", "--trainer-args",
          "--image-size 16 --backbone cnn --embedding-dim 16 --vocab 3 --batch-size 8 --verify-ids 3 "
          "--holdout-per-id 2"]


def test_trainer_arguments_come_from_the_tiny_run():
    # SHARED repeats the model and data of tests/helpers/trainer_runs.TINY: keep them in step.
    words = SHARED[-1].split()
    for flag in ("--image-size", "--backbone", "--embedding-dim", "--vocab", "--batch-size", "--verify-ids"):
        assert words[words.index(flag) + 1] == TINY[TINY.index(flag) + 1]


def test_tiny_table(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--ids", "6", "--seeds", "0,1", *SHARED,
            "--run", "gif-l3=--code-method pq --length 3"]
    accuracy.main(argv)
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "accuracy.json").read_text())
    rows = report["tables"]["6"]["rows"]
    assert list(rows) == [*accuracy.DEFAULT_RUNS, "gif-l3"]
    for name, row in rows.items():
        assert f"| {name} |" in out
        assert len(row["tar@far=1e-3"]["values"]) == 2 and row["tar@far=1e-3"]["std"] is not None
        assert 0 <= row["ident_top1"]["mean"] <= row["ident_top5"]["mean"] <= 1
        assert (row["ident_exact"] is None) == (row["head"] != "gif")
    # Head FLOPs from bench/scale_ids.py's model: batch 8, width 16; the code head L * V classes.
    assert rows["full"]["head_flops"]["mean"] == harness.head_flops(8, 16, 6)
    assert rows["gif-l3"]["head_flops"]["mean"] == harness.head_flops(8, 16, 3 * 3)
    assert rows["gif-random6"]["flops_ratio_vs_full"]["mean"] == pytest.approx(6 / (6 * 3))
    checks = report["tables"]["6"]["targets"]["checks"]
    assert set(checks) == {"tar@far=1e-3 >= full", "tar@far=1e-4 >= full", "ident_top1 >= 0.99 x full",
                           "tar@far=1e-3 >= partial_fc", "tar@far=1e-4 >= partial_fc"}  # cost: from 1000 ids
    assert "Targets for the best code head" in out
    assert "head cost >= 10x below full softmax" in accuracy.targets(rows, 1000)["checks"]

    # A second call reads every run back; a run whose arguments changed is refused.
    trained = []
    original = accuracy.train
    accuracy.train = lambda run: trained.append(run)
    try:
        accuracy.main(argv)
        assert trained == [] and json.loads((tmp_path / "accuracy.json").read_text())["tables"] == report["tables"]
        with pytest.raises(SystemExit) as error:
            accuracy.main([*argv[:-1], "gif-l3=--code-method rq --length 3"])
    finally:
        accuracy.train = original
    assert error.value.code == 2 and "holds a run with other arguments" in capsys.readouterr().err


def test_head_cost_with_projection_heads():
    run = {"batch_size": 8, "embedding_dim": 16, "sample_rate": 0.5, "proj_dim": 4}
    flops, ratio = accuracy.head_cost({"num_ids": 100, "head": "gif", "code_length": 2, "vocab": 10}, run)
    assert flops == harness.head_flops(8, 4, 20) + harness.head_flops(8, 16, 4 * 2)
    assert ratio == harness.head_flops(8, 16, 100) / flops
    flops, _ = accuracy.head_cost({"num_ids": 100, "head": "partial_fc"}, run)
    assert flops == harness.head_flops(8, 16, 50)


def test_head_cost_counts_the_first_stage_for_its_steps():
    run = {"batch_size": 8, "embedding_dim": 16, "sample_rate": 0.5, "proj_dim": None, "first_head": "partial_fc"}
    metrics = {"num_ids": 100, "head": "gif", "code_length": 2, "vocab": 10, "steps": 40, "retokenized_at": 30}
    flops, ratio = accuracy.head_cost(metrics, run)
    assert flops == (30 * harness.head_flops(8, 16, 50) + 10 * harness.head_flops(8, 16, 20)) / 40
    assert ratio == harness.head_flops(8, 16, 100) / flops


@pytest.mark.parametrize("argv,words", [
    (["--runs", "full,nope"], "--runs: unknown nope"),
    (["--run", "noequals"], "argument --run"),
    (["--ids", "0"], "argument --ids"),
    (["--epochs", "0"], "--epochs"),
    (["--trainer-args", "'unclosed"], "--trainer-args"),
])
def test_mistakes_are_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as error:
        accuracy.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert error.value.code == 2 and words in err[-1] and err[-1].startswith("error:")
