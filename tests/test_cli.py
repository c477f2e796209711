"""The command-line tools as a new user meets them: every mistake is one `error:` line on stderr
with exit status 2 and leaves no output behind; --help shows each default once."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from gif_kernels import CodeBook
from gif_kernels.tokenize import __main__ as tokenizer
from gif_kernels.train import evaluate, evaluate_ijb, export, trainer

from tests.helpers.bench_scripts import bench_script
from tests.helpers.trainer_runs import TINY, environment

scale_ids = bench_script("scale_ids")

ONE_LINE = re.compile(r"error: [^\n]+\n")


def fails_with_one_line(capsys, main, argv, *words):
    """main(argv) exits with status 2 after printing one `error:` line that contains `words`."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and ONE_LINE.fullmatch(err), err
    for word in words:
        assert word in err, err
    return err


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("num_ids", [1, 4, 16, 17])  # N = 1, V, V^2 and V^2 + 1 for V = 4
def test_tokenize_cli_at_every_size_that_leaves_prefixes_alone(tmp_path, capsys, num_ids):
    np.save(tmp_path / "v.npy", np.random.default_rng(0).standard_normal((num_ids, 3)).astype(np.float32))
    out = tmp_path / "c.safetensors"
    tokenizer.main(["--vectors", str(tmp_path / "v.npy"), "--vocab", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    book = CodeBook.load(out)
    assert book.num_ids == num_ids and f"N = {num_ids}" in printed and "vs random codes" in printed


def test_tokenize_cli_mistakes(tmp_path, capsys):
    vectors = tmp_path / "v.npy"
    np.save(vectors, np.ones((5, 3), dtype=np.float32))
    out = tmp_path / "c.safetensors"
    cases = [
        (["--vectors", str(tmp_path / "missing.npy"), "--vocab", "4"], "--vectors: no file"),
        (["--vectors", str(vectors), "--vocab", "1"], "vocab"),
        (["--vectors", str(vectors), "--vocab", "x"], "--vocab"),
        (["--vectors", str(vectors)], "--vocab"),
        (["--vectors", str(vectors), "--vocab", "4", "--length", "1"], "length"),
    ]
    for argv, words in cases:
        fails_with_one_line(capsys, tokenizer.main, [*argv, "--out", str(out)], words)
    np.save(tmp_path / "ints.npy", np.ones((5, 3), dtype=np.int64))
    fails_with_one_line(capsys, tokenizer.main, ["--vectors", str(tmp_path / "ints.npy"), "--vocab", "4",
                                                 "--out", str(out)], "--vectors: expected a float (N, D)")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    fails_with_one_line(capsys, tokenizer.main, ["--vectors", str(tmp_path / "junk.npy"), "--vocab", "4",
                                                 "--out", str(out)], "--vectors:", "not a readable .npy")
    fails_with_one_line(capsys, tokenizer.main, ["--vectors", str(vectors), "--vocab", "4",
                                                 "--out", str(tmp_path / "no" / "such" / "c.safetensors")], "--out")
    assert not out.exists()


def test_a_cli_mistake_prints_no_traceback_in_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gif_kernels.tokenize", "--vectors", str(tmp_path / "v.npy"),
                             "--vocab", "16", "--out", str(tmp_path / "c.safetensors")],
                            capture_output=True, text=True, env=environment())
    assert result.returncode == 2 and ONE_LINE.fullmatch(result.stderr), result.stderr


# ----------------------------------------------------------------------------- trainer


def test_train_data_mistakes_leave_no_output_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = [
        (["--data", f"imagefolder:{tmp_path / 'nonexistent'}"], "data: image folder"),
        (["--data", f"features:{tmp_path / 'empty'}"], "data: features file"),
        (["--data", "webdataset:x"], "data: expected"),
        (["--scale", "0"], "--scale: expected a finite number > 0"),
        (["--scale", "-64"], "--scale"),
        (["--batch-size", "0"], "--batch-size"),
        (["--lr", "fast"], "--lr"),
        (["--val-every", "0"], "--val-every"),
        (["--threads", "0"], "--threads"),
        (["--val-targets", "lfw"], "val_targets:", "give the path of its .bin"),
        (["--val-targets", str(tmp_path / "lfw.bin")], "val_targets:", "not found"),
        (["--init-backbone", str(tmp_path / "r50.pth")], "init_backbone:", "not found"),
    ]
    for change, *words in cases:
        out = tmp_path / "run"
        fails_with_one_line(capsys, trainer.main, [*TINY, *change, "--out", str(out)], *words)
        assert not out.exists(), change


def test_a_failure_after_the_output_folder_was_made_removes_it(tmp_path, capsys):
    vectors = tmp_path / "vectors.npy"
    np.save(vectors, np.ones((6, 5), dtype=np.float32))  # wrong width for L_AR over 16-wide features
    out = tmp_path / "run"
    fails_with_one_line(capsys, trainer.main, [*TINY, "--identity-vectors", str(vectors), "--gamma", "1",
                                               "--code-method", "random", "--out", str(out)], "--gamma")
    assert not out.exists()


def test_resume_with_nothing_to_resume_stops(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    fails_with_one_line(capsys, trainer.main, [*TINY, "--out", str(tmp_path / "run"), "--resume"],
                        "--resume: no checkpoint in")
    assert list((tmp_path / "run").iterdir()) == []


def test_train_help_shows_each_default_once():
    text = trainer.build_parser().format_help()
    for option in ("--lr", "--epochs", "--vocab", "--scale", "--batch-size", "--head"):
        help_text = re.search(rf"^\s+{option} \S+\s+(.*?)(?=^\s+--|\Z)", text, re.MULTILINE | re.DOTALL)[1]
        assert help_text.count("default") == 1, (option, help_text)
    m_help = re.search(r"^\s+--m M\s+(.*?)(?=^\s+--)", text, re.MULTILINE | re.DOTALL)[1]
    assert m_help.count("default") == 1 and "None" not in m_help


def test_evaluate_merges_into_metrics_json_and_keeps_the_runs_description(tmp_path):
    metrics = trainer.train(trainer.parse_run([*TINY, "--out", str(tmp_path)]))
    (tmp_path / "metrics.json").write_text(json.dumps({**metrics, "note": "kept"}))
    subprocess.run([sys.executable, "-m", "gif_kernels.train.evaluate", str(tmp_path)], check=True,
                   env=environment(), capture_output=True)
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert again["note"] == "kept"
    for key in ("backbone", "code_length", "num_ids", "processes", "vocab", "head", "steps"):
        assert again[key] == metrics[key], key


def test_evaluate_mistakes(tmp_path, capsys):
    fails_with_one_line(capsys, evaluate.main, [str(tmp_path / "missing")], "checkpoint:", "does not exist")
    fails_with_one_line(capsys, evaluate.main, [str(tmp_path)], "checkpoint: no checkpoint in")
    (tmp_path / "checkpoint-3.safetensors").write_bytes(b"damaged")
    fails_with_one_line(capsys, evaluate.main, [str(tmp_path)], "checkpoint:")
    fails_with_one_line(capsys, evaluate.main, [str(tmp_path), "--beam", "0"], "--beam")


def test_ijb_and_export_mistakes(tmp_path, capsys):
    fails_with_one_line(capsys, evaluate_ijb.main, [str(tmp_path / "missing"), "--root", str(tmp_path)],
                        "checkpoint:", "does not exist")
    fails_with_one_line(capsys, evaluate_ijb.main, [str(tmp_path / "r50.pth"), "--root", str(tmp_path)],
                        "model:", "not found")
    fails_with_one_line(capsys, evaluate_ijb.main, [str(tmp_path), "--root", str(tmp_path), "--batch-size", "0"],
                        "--batch-size")
    fails_with_one_line(capsys, evaluate_ijb.main, [str(tmp_path), "--root", str(tmp_path), "--target", "IJBA"],
                        "--target")
    fails_with_one_line(capsys, evaluate_ijb.main, [str(tmp_path)], "--root")
    fails_with_one_line(capsys, export.main, [str(tmp_path)], "--onnx")
    fails_with_one_line(capsys, export.main, [str(tmp_path), "--onnx", str(tmp_path / "x.onnx")],
                        "checkpoint: no checkpoint in")
    trainer.train(trainer.parse_run([*TINY, "--out", str(tmp_path / "run")]))
    capsys.readouterr()  # the run's progress bar
    fails_with_one_line(capsys, evaluate_ijb.main, [str(tmp_path / "run"), "--root", str(tmp_path / "IJBC")],
                        "root:", "ijbc_name_5pts_score.txt not found")


# ----------------------------------------------------------------------------- benchmark


def test_scale_ids_mistakes(capsys):
    for argv, words in ((["--ids", "10X"], "argument --ids"), (["--vocab", "1"], "argument --vocab"),
                        (["--threads", "0"], "argument --threads")):
        fails_with_one_line(capsys, scale_ids.main, argv, words)


def test_scale_ids_help_shows_each_default_once():
    text = scale_ids.build_parser().format_help()
    assert "(default: None)" not in text
    for option in ("--ids", "--batch", "--repeats", "--max-memory-gb", "--seed", "--sample-rate"):
        help_text = re.search(rf"^\s+{option} \S+\s+(.*?)(?=^\s+--|\Z)", text, re.MULTILINE | re.DOTALL)[1]
        assert help_text.count("default") == 1, (option, help_text)
