"""The reference trainer end to end on tiny runs: metrics, checkpoints, kill and resume, DDP, evaluation."""
import csv
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from gif_kernels import CodeBook
from gif_kernels.train import checkpoint
from gif_kernels.train.data import write_bin
from gif_kernels.train.data import load_splits
from gif_kernels.train.model import DEFAULT_LENGTH, embed
from gif_kernels.train.evaluate import verification, verification_pairs
from gif_kernels.train.trainer import learning_rate, parse_run, train
from tests.helpers.trainer_runs import TINY, command, environment

METRIC_KEYS = {"ident_top1", "ident_top5", "tar@far=1e-3", "tar@far=1e-4", "images_per_s", "head", "steps"}


def parameters(path):
    return {k: v for k, v in checkpoint.load(path)["model"].items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("head", ["gif", "full", "partial_fc"])
def test_a_tiny_run_writes_checkpoints_log_and_metrics(tmp_path, head):
    metrics = train(parse_run([*TINY, "--head", head, "--sample-rate", "0.5", "--out", str(tmp_path)]))
    assert METRIC_KEYS <= set(metrics) and metrics["head"] == head and metrics["steps"] == 6
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert 0 <= metrics["ident_top1"] <= metrics["ident_top5"] <= 1
    assert metrics["ident_queries"] == 6 * 2 and metrics["genuine_pairs"] == 3 * 15
    assert [step for step, _ in checkpoint.checkpoints(tmp_path)] == [4, 6]  # the newest KEEP
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 1 + 6
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(parse_run([*TINY, "--head", head, "--out", str(tmp_path)]))


def test_threads_option_sets_the_training_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        metrics = train(parse_run([*TINY, "--threads", "1", "--out", str(tmp_path)]))
        assert metrics["threads"] == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = [*TINY, "--steps", "30", "--checkpoint-every", "1", "--gamma", "1.0"]
    subprocess.run(command(*args, "--out", str(whole)), check=True, env=environment(), capture_output=True)
    process = subprocess.Popen(command(*args, "--out", str(killed)), env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not any(step >= 3 for step, _ in checkpoint.checkpoints(killed)) and process.poll() is None:
        assert time.time() < deadline, "no checkpoint in 120 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved_step = checkpoint.checkpoints(killed)[-1][0]
    assert 3 <= saved_step < 30, "the run finished before it could be killed: make it longer"
    resumed = subprocess.run(command(*args, "--out", str(killed), "--resume"), check=True, env=environment(),
                             capture_output=True, text=True)
    assert f"resumed from step {saved_step}" in resumed.stdout
    expected, got = parameters(whole / "checkpoint-30.safetensors"), parameters(killed / "checkpoint-30.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    with pytest.raises(ValueError, match="--head"):
        train(parse_run([*args, "--head", "full", "--out", str(killed), "--resume"]))


class Interrupted(Exception):
    pass


def retokenized(run, stats):
    return checkpoint.stage_head(run, stats)[1] == checkpoint.RETOKENIZED_CODES_FILE


def interrupt_after_saving(monkeypatch, step, switched):
    """Makes checkpoint.save raise once it has saved `step` before (switched False) or after the switch."""
    save = checkpoint.save

    def save_then_stop(directory, saved_step, model, optimizer, run, stats):
        path = save(directory, saved_step, model, optimizer, run, stats)
        if saved_step == step and retokenized(run, stats) == switched:
            monkeypatch.setattr(checkpoint, "save", save)
            raise Interrupted
        return path
    monkeypatch.setattr(checkpoint, "save", save_then_stop)


@pytest.mark.parametrize("first", [["--first-head", "gif"],
                                   ["--first-head", "partial_fc", "--gamma", "1", "--classifier-init", "vectors"]],
                         ids=["gif", "partial_fc"])
def test_retokenize_switch_resumes_from_either_side(first, tmp_path, monkeypatch):
    # 3 steps an epoch: the switch is step 3 of 6. Stopped after the checkpoint before it (step 2), after
    # step 3's first save (still the first stage), or after the switch (step 3 again, then 4), every
    # resumed run ends with the parameters and codes of the run that went through.
    args = [*TINY, "--code-method", "pq", "--retokenize-after", "1", "--checkpoint-every", "1", *first]
    whole = tmp_path / "whole"
    train(parse_run([*args, "--out", str(whole)]))
    second = CodeBook.load(whole / checkpoint.RETOKENIZED_CODES_FILE)
    assert (second.num_ids, second.length, second.vocab) == (6, DEFAULT_LENGTH, 3)
    assert (whole / checkpoint.CODES_FILE).exists() == (first[1] == "gif")
    final = checkpoint.load(whole / "checkpoint-6.safetensors")
    assert retokenized(final["run"], final["stats"])
    assert checkpoint.stage_head(final["run"], {}) == (first[1], checkpoint.CODES_FILE if first[1] == "gif" else None)
    with open(whole / "log.csv", newline="") as f:  # one header over both stages' loss parts
        rows = list(csv.DictReader(f))
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4, 5, 6]
    assert all(row["loss"] and row["code_ce"] for row in rows[3:])
    if first[1] == "partial_fc":
        assert all(row["softmax_ce"] and not row["code_ce"] for row in rows[:3])
    expected = parameters(whole / "checkpoint-6.safetensors")
    for step, switched in [(2, False), (3, False), (3, True), (4, True)]:
        out = tmp_path / f"stopped-{step}-{switched}"
        interrupt_after_saving(monkeypatch, step, switched)
        with pytest.raises(Interrupted):
            train(parse_run([*args, "--out", str(out)]))
        metrics = train(parse_run([*args, "--out", str(out), "--resume"]))
        got = parameters(out / "checkpoint-6.safetensors")
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[name], got[name]) for name in expected), (step, switched)
        assert torch.equal(CodeBook.load(out / checkpoint.RETOKENIZED_CODES_FILE).codes, second.codes)
        assert metrics["code_length"] == second.length
    # The evaluation CLI restores a checkpoint with the head and codes of its stage.
    model, _, _, codebook = checkpoint.restore_for_evaluation(final, whole, "cpu")
    assert torch.equal(codebook.codes, second.codes) and model.head.codebook is codebook


@pytest.mark.parametrize("extra,words", [
    (["--retokenize-after", "0"], "> 0"),
    (["--retokenize-after", "1", "--code-method", "random"], "reads identity vectors"),
    (["--retokenize-after", "1", "--head", "full"], "--head gif"),
    (["--first-head", "partial_fc"], "give --retokenize-after"),
    (["--classifier-init", "vectors", "--proj-dim", "4"], "use one of them"),
])
def test_retokenize_arguments(extra, words, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_run([*TINY, *extra, "--out", str(tmp_path)])
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("extra,start", [([], "vectors"), (["--proj-dim", "4"], "random"),
                                         (["--classifier-init", "random"], "random")])
def test_classifier_init_auto_starts_at_the_vectors_unless_projections(extra, start, tmp_path):
    assert parse_run([*TINY, *extra, "--out", str(tmp_path)])["classifier_init"] == start


def test_retokenize_after_the_last_step_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--retokenize-after: 2.0 epochs is step 6"):
        train(parse_run([*TINY, "--retokenize-after", "2", "--out", str(tmp_path / "run")]))
    assert not (tmp_path / "run").exists()


def test_two_process_ddp_run_and_resume(tmp_path):
    # with a verification set scored by rank 0 while the other process waits
    images = [np.full((16, 16, 3), 12 * k, np.uint8) for k in range(20)]
    write_bin(tmp_path / "set.bin", images, [k % 2 == 0 for k in range(10)])
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "gif_kernels.train", *TINY, "--val-targets", str(tmp_path / "set.bin"), "--val-every", "2",
              "--out", str(out)]
    first = subprocess.run(launch, env=environment(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 6 and 0 <= metrics["set_accuracy"] <= 1
    with open(out / "log.csv", newline="") as file:
        assert [row["step"] for row in csv.DictReader(file) if row["set_accuracy"]] == ["2", "4", "6"]
    more = subprocess.run([*launch, "--steps", "8", "--resume"], env=environment(), capture_output=True,
                          text=True, timeout=300)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resumed from step 6" in more.stdout
    assert json.loads((out / "metrics.json").read_text())["steps"] == 8


def test_evaluate_cli_reproduces_the_run_metrics(tmp_path):
    metrics = train(parse_run([*TINY, "--out", str(tmp_path)]))
    result = subprocess.run([sys.executable, "-m", "gif_kernels.train.evaluate", str(tmp_path),
                             "--out", str(tmp_path / "again")], check=True, env=environment(),
                            capture_output=True, text=True)
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert "wrote" in result.stdout
    for key in METRIC_KEYS:
        assert again[key] == pytest.approx(metrics[key]), key


def test_checkpoint_round_trip_of_model_and_optimizer(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(7, 5)).square().sum().backward()
    optimizer.step()
    path = checkpoint.save(tmp_path, 3, model, optimizer, {"seed": 1}, {"images_per_s": 2.5})
    saved = checkpoint.load(path)
    assert saved["step"] == 3 and saved["run"] == {"seed": 1} and saved["stats"] == {"images_per_s": 2.5}
    fresh = torch.optim.AdamW(model.parameters(), lr=0.01)
    fresh.load_state_dict(saved["optimizer"])
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(fresh.state_dict()["state"][0][key], value)
    assert not list(tmp_path.glob("*.tmp"))
    path.write_bytes(path.read_bytes()[:50])  # damaged: named error, and load_latest says so
    with pytest.raises(ValueError, match="checkpoint: .* not a readable checkpoint"):
        checkpoint.load(path)
    with pytest.raises(ValueError, match="no readable checkpoint"):
        checkpoint.load_latest(tmp_path)


def test_learning_rate_warms_up_then_decays_to_zero():
    run = {"lr": 0.2, "warmup": 0.1}
    rates = [learning_rate(run, step, 100) for step in range(100)]
    assert rates[0] == pytest.approx(0.02) and rates[9] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:])) and rates[-1] < 1e-3


def test_verification_tar_at_far_against_a_direct_count():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(40).repeat_interleave(6)
    centers = torch.randn(40, 24, generator=generator)
    embeddings = centers[labels] + 0.9 * torch.randn(len(labels), 24, generator=generator)
    result = verification(embeddings, labels)
    first, second = verification_pairs(labels)
    z = torch.nn.functional.normalize(embeddings, dim=1)
    similarity = (z[first] * z[second]).sum(1).numpy()
    genuine = (labels[first] == labels[second]).numpy()
    impostor = np.sort(similarity[~genuine])[::-1]
    for far, key in ((1e-3, "tar@far=1e-3"), (1e-4, "tar@far=1e-4")):
        allowed = int(far * len(impostor))  # impostors that may score at or above the threshold
        threshold = impostor[allowed] if allowed < len(impostor) else -np.inf
        assert result[key] == pytest.approx((similarity[genuine] > threshold).mean()), key
    assert result["genuine_pairs"] == 40 * 15 and 0 < result["tar@far=1e-4"] <= result["tar@far=1e-3"] < 1


def test_features_data_trains_the_head_alone_from_given_identity_vectors(tmp_path):
    generator = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(12, 24, generator=generator), dim=1)
    labels = torch.arange(12).repeat_interleave(10)
    features = centers[labels] + 0.05 * torch.randn(len(labels), 24, generator=generator)
    np.savez(tmp_path / "embeddings.npz", features=features.numpy(), labels=labels.numpy())
    vectors = tmp_path / "vectors.npy"
    argv = ["--data", f"features:{tmp_path / 'embeddings.npz'}", "--verify-ids", "2", "--identity-vectors",
            str(vectors), "--gamma", "1.0", "--vocab", "4", "--batch-size", "16", "--steps", "60", "--lr", "0.02"]
    # 10 of the 12 identities train, relabelled 0..9
    splits = load_splits(parse_run([*argv, "--out", str(tmp_path / "run")]))
    train_features, train_labels = embed(torch.nn.Identity(), splits.train, "cpu")
    means = torch.zeros(10, 24).index_add_(0, train_labels, train_features)
    np.save(vectors, centers[(means @ centers.T).argmax(1)].numpy())  # each training identity's own center
    metrics = train(parse_run([*argv, "--out", str(tmp_path / "run")]))
    assert metrics["backbone"] == "none" and metrics["num_ids"] == 10
    assert metrics["ident_top1"] >= 0.9  # well separated clusters: the head alone learns them
    with pytest.raises(ValueError, match="identity_vectors: expected a float array"):
        np.save(vectors, centers.numpy())
        train(parse_run(["--data", f"features:{tmp_path / 'embeddings.npz'}", "--verify-ids", "2",
                         "--identity-vectors", str(vectors), "--out", str(tmp_path / "other")]))


def test_random_identity_vectors_make_the_codes_and_anchors(tmp_path):
    from gif_kernels.tokenize import random_vectors, tokenize
    out = tmp_path / "run"
    run = parse_run([*TINY, "--identity-vectors", "random", "--seed", "3", "--code-method", "pq", "--length", "2",
                     "--gamma", "50", "--out", str(out)])
    train(run)
    vectors = random_vectors(6, 16, seed=3)  # TINY: 6 training identities, 16-wide features
    assert torch.equal(CodeBook.load(out / checkpoint.CODES_FILE).codes.long(),
                       tokenize(vectors, 3, 2, method="pq", seed=3).long())
    assert not (out / checkpoint.VECTORS_FILE).exists()  # made again from the seed, never stored
    header = (out / "log.csv").read_text().splitlines()[0]
    assert "anchor" in header.split(",")
    # evaluation re-ranks with the same anchors, made from the saved run's seed
    model, splits, _, _ = checkpoint.restore_for_evaluation(checkpoint.load_given(out), out, "cpu")
    assert model.head.anchor_seed == 3 and model.head.anchor_vectors is None
    assert torch.equal(model.head.anchors(torch.tensor([4, 1]), torch.device("cpu")), vectors[[4, 1]])
    # a run folder that saved its random vectors (as runs did before they were made again) keeps them
    saved = torch.nn.functional.normalize(torch.randn(6, 16), dim=1)
    np.save(out / checkpoint.VECTORS_FILE, saved.numpy())
    start, table, seed = checkpoint.stage_vectors(run, out, checkpoint.CODES_FILE, 16, 6, "cpu")
    assert seed is None and torch.equal(table, saved) and torch.equal(start, saved)


def test_recordio_data_end_to_end(tmp_path):
    from gif_kernels.train.data import write_recordio
    generator = np.random.default_rng(0)
    labels = np.repeat(np.arange(8) * 7 + 3, 5)  # label values need not be contiguous
    images = [np.clip(generator.normal(30 * (label % 8), 20, (20, 20, 3)), 0, 255).astype(np.uint8)
              for label in labels]
    write_recordio(str(tmp_path / "train.rec"), str(tmp_path / "train.idx"), images, labels.tolist())
    metrics = train(parse_run(["--data", f"recordio:{tmp_path}", "--verify-ids", "2", "--holdout-per-id", "1",
                               "--image-size", "16", "--embedding-dim", "16", "--vocab", "3", "--batch-size", "8",
                               "--steps", "4", "--out", str(tmp_path / "run")]))
    assert metrics["num_ids"] == 6 and metrics["ident_queries"] == 6 and metrics["genuine_pairs"] == 2 * 10


def test_verification_pairs_sampled_past_max_pairs(monkeypatch):
    from gif_kernels.train import evaluate
    labels = torch.arange(30).repeat_interleave(7)[torch.randperm(210, generator=torch.Generator().manual_seed(1))]
    monkeypatch.setattr(evaluate, "MAX_PAIRS", 2000)  # of 21,945 pairs
    first, second = verification_pairs(labels, seed=3)
    assert (first < second).all() and len(first) <= 2000
    genuine = labels[first] == labels[second]
    assert genuine.sum() == 30 * 21  # every genuine pair (630 <= MAX_PAIRS / 2), then impostors
    assert len(set(zip(first[genuine].tolist(), second[genuine].tolist()))) == 30 * 21
    assert (~genuine).sum() > 1000
