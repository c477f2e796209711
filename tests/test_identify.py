"""bench/identify.py: the synthetic embeddings' statistics, tiny end-to-end runs on synthetic data and
on a trained run (with and without FAISS), and its command-line mistakes."""
import json

import pytest
import torch

from gif_kernels import exhaustive_code_topk
from gif_kernels.train.trainer import parse_run, train
from tests.helpers.bench_scripts import bench_script
from tests.helpers.trainer_runs import TINY
from tests.test_cli import fails_with_one_line

identify = bench_script("identify")

SMALL = ["--synthetic", "300", "--dim", "16", "--codes", "4x5", "--queries", "60", "--beams", "5,16",
         "--exact-beams", "5", "--nprobe", "1,4", "--ef-search", "16", "--repeats", "1", "--latency-queries", "2"]


@pytest.mark.parametrize("cosine,spread", [(0.7, 0.1), (0.5, 0.0), (0.85, 0.05)])
def test_synthetic_queries_sit_at_the_asked_cosine(cosine, spread):
    vectors = identify.synthetic_identities(5000, 64, seed=1)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(5000))
    assert vectors.mean(0).norm() < 0.05  # no preferred direction
    queries, labels = identify.synthetic_queries(vectors, 20000, cosine, spread, torch.Generator().manual_seed(2))
    torch.testing.assert_close(queries.norm(dim=1), torch.ones(20000))
    own = (queries * vectors[labels]).sum(1)
    assert abs(own.mean().item() - cosine) < 0.02 and abs(own.std().item() - spread) < 0.02
    assert labels.bincount(minlength=5000).float().var() < 6  # drawn uniformly: Poisson counts of variance 4
    others = (queries * vectors[(labels + 1) % 5000]).sum(1)
    assert others.abs().mean() < 0.15  # away from other identities as random directions in 64 dimensions are


def test_synthetic_run_end_to_end(tmp_path, capsys):
    report = identify.main([*SMALL, "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    out = capsys.readouterr().out
    rows = {(row["method"], row["setting"]): row for row in report["results"]}
    assert set(rows) == {("brute force", ""), ("faiss flat", ""), ("faiss ivf", "nprobe 1"), ("faiss ivf", "nprobe 4"),
                         ("faiss hnsw", "efSearch 16"), ("beam", "beam 5"), ("beam", "beam 16"),
                         ("beam exact", "beam 5")}
    assert rows[("brute force", "")]["top1"] == rows[("faiss flat", "")]["top1"]  # both exact
    assert rows[("brute force", "")]["bytes_per_id"] == 16 * 4
    assert 16 * 4 <= rows[("faiss flat", "")]["bytes_per_id"] < rows[("faiss hnsw", "efSearch 16")]["bytes_per_id"]
    trie_bytes = report["results"][-1]["bytes_per_id"]  # trie + head, at least a leaf id and a node per code
    assert trie_bytes > 8 + 8 + 4
    assert all(0 <= row["top1"] <= row["top5"] <= 1 and row["queries_per_s"] > 0 for row in rows.values())
    assert json.loads((tmp_path / "r.json").read_text())["results"] == report["results"]
    assert (tmp_path / "r.png").stat().st_size > 0
    assert out.count("\n| ") == len(rows) + 1 and report["num_ids"] == 300 and report["length"] == 5


def test_exact_beam_rows_are_the_heads_best_codes():
    args = identify.parse_args(SMALL)
    source = identify.synthetic_source(args)
    head = identify.synthetic_head(source.templates, 4, 5, "pq", 3, 32, 1e-3, 0.7, 0.1, seed=0)
    ids = identify.beam_methods(head, 0.0, args)[-1].search(source.queries)
    expected, _ = exhaustive_code_topk(head.position_scores(source.queries), head.codebook.trie(), 5)
    assert torch.equal(ids[:, 0], expected[:, 0])


def test_rows_without_faiss_are_left_out_saying_so(monkeypatch, capsys):
    monkeypatch.setattr(identify, "faiss_module", lambda: None)
    report = identify.main([*SMALL, "--exact-beams", "none"])
    assert {row["method"] for row in report["results"]} == {"brute force", "beam"}
    assert "faiss is not installed" in capsys.readouterr().out


def test_a_trained_run_is_identified_as_its_evaluation_did(tmp_path, capsys):
    run = parse_run([*TINY, "--out", str(tmp_path / "run")])
    metrics, beam = train(run), str(run["eval_beam"])
    report = identify.main(["--run", str(tmp_path / "run"), "--beams", beam, "--exact-beams", beam,
                            "--repeats", "1", "--latency-queries", "1", "--ef-search", "16", "--nprobe", "1"])
    capsys.readouterr()
    rows = {(row["method"], row["setting"]): row for row in report["results"]}
    assert report["source"] == "run" and report["num_ids"] == 6 and report["queries"] == 6 * 2
    assert rows[("beam", f"beam {beam}")]["top1"] == pytest.approx(metrics["ident_top1"])  # as evaluated
    assert rows[("beam", f"beam {beam}")]["build_s"] is None


def test_mistakes(tmp_path, capsys):
    for argv, *words in ((["--synthetic", "100", "--codes", "2x3"], "argument --codes"),
                         (["--codes", "16"], "argument --codes"), (["--cosine", "1.5"], "argument --cosine"),
                         (["--beams", "2"], "argument --beams"), (["--methods", "brute,annoy"], "argument --methods"),
                         (["--synthetic", "10", "--run", "x"], "not allowed with"),
                         (["--max-seconds", "0"], "argument --max-seconds"),
                         (["--synthetic", "100", "--codes", "4x4", "--nlist", "101"], "argument --nlist"),
                         (["--run", str(tmp_path)], "--run:", "no checkpoint")):
        fails_with_one_line(capsys, identify.main, argv, *words)
    train(parse_run([*TINY, "--head", "full", "--out", str(tmp_path / "full")]))
    capsys.readouterr()
    fails_with_one_line(capsys, identify.main, ["--run", str(tmp_path / "full")], "--run:", "code head")
    train(parse_run([*TINY, "--out", str(tmp_path / "gif")]))
    capsys.readouterr()
    fails_with_one_line(capsys, identify.main, ["--run", str(tmp_path / "gif"), "--methods", "ivf", "--nlist", "7"],
                        "--nlist:", "at most N = 6")
