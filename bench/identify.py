"""Identification among N identities: beam decoding of a code head against FAISS and brute force, on
the same embeddings, in one run.

Every method answers the same queries (face embeddings, unit vectors) against the same N identities,
each kept as one template, its unit mean embedding, the way a FAISS user indexes identities:
  brute force      queries @ templates.T and top-k (torch), in blocks: exact
  faiss flat       IndexFlatIP over the templates: exact
  faiss ivf P      IndexIVFFlat, inner product, --nlist lists, nprobe P
  faiss hnsw E     IndexHNSWFlat, inner product, --hnsw-m links, efSearch E
  beam W [exact]   CodeHead.identify: the head's per-position scores, then code_beam_search of width W
                   over the trie (cpu backend; "beam exact": re-searched until certified exact, i.e.
                   the head's best code among all N)
FAISS (pip install faiss-cpu, an optional extra) uses as many threads as torch; its rows are left out,
saying so, where it is not installed.

Figures per method and setting: identification top-1 / top-5 against the true identity, queries/s
(all queries, in batches of --batch), single-query latency (median ms), bytes per identity of what
the method keeps (FAISS: the serialized index; beam: trie + head weights; brute force: the
templates), build seconds (FAISS: train + add; beam: codes + head training; not known for --run).

Sources of embeddings:
  --synthetic N  N identity vectors uniform on the unit sphere in --dim dimensions. A query is one
                 identity's vector turned to cosine c with it in a random direction, c drawn from
                 N(--cosine, --cosine-spread) (default 0.7 +- 0.1, about an ArcFace model's
                 probe-to-template cosine). Codes are made from the identity vectors (--codes VxL,
                 --code-method), the CodeHead starts from them (init_from_vectors) and trains
                 --train-steps steps on fresh queries (head only, no margin), so its scores are a
                 trained head's on these embeddings, not random ones.
  --run OUT      a run of the reference trainer with a code head: templates are the mean features
                 of its training images, queries its held-out images, the head and codes its own.

    python bench/identify.py --synthetic 1M
    python bench/identify.py --synthetic 10M --dim 128 --methods brute,flat,ivf,beam
    python bench/identify.py --run runs/demo --json identify.json --plot identify.png
"""
import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import gif_kernels
from gif_kernels import CodeBook, CodeHead
from gif_kernels.cli import ArgumentParser, one_line_errors
from gif_kernels.tokenize import METHODS
from harness import brute_force_topk, comma_list, has_matplotlib, one_of, parse_count, positive_int

METHOD_KINDS = ("brute", "flat", "ivf", "hnsw", "beam")
GENERATE_BLOCK = 1 << 18  # identity vectors drawn at once
TOPK = 5
PLOT_ORDER = ("brute force", "faiss flat", "faiss ivf", "faiss hnsw", "beam", "beam exact")  # a colour each
IVF_TRAIN_PER_LIST = 64  # templates k-means sees per IVF list (FAISS asks for at least 39)


# ----------------------------------------------------------------------------- synthetic embeddings

def synthetic_identities(num_ids: int, dim: int, seed: int) -> torch.Tensor:
    """(N, D) float32 unit vectors, uniform on the sphere, drawn in blocks from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.empty(num_ids, dim)
    for start in range(0, num_ids, GENERATE_BLOCK):
        block = vectors[start:start + GENERATE_BLOCK]
        block.copy_(F.normalize(torch.randn(block.shape, generator=generator), dim=1))
    return vectors


def synthetic_queries(vectors: torch.Tensor, count: int, cosine: float, spread: float,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries (count, D) unit vectors, labels (count,)): each the vector of a uniformly drawn identity
    turned, in a uniformly random direction, to a cosine with it drawn from N(cosine, spread) (clamped
    to [-1, 1])."""
    labels = torch.randint(0, vectors.shape[0], (count,), generator=generator)
    centre = vectors[labels]
    away = torch.randn(centre.shape, generator=generator)
    away = F.normalize(away - (away * centre).sum(1, keepdim=True) * centre, dim=1)
    c = (cosine + spread * torch.randn(count, 1, generator=generator)).clamp(-1.0, 1.0)
    return F.normalize(c * centre + (1 - c * c).sqrt() * away, dim=1), labels


def synthetic_head(vectors, vocab, length, method, steps, batch, lr, cosine, spread, seed) -> CodeHead:
    """A CodeHead on codes made from `vectors`, started at their token means and trained `steps` steps of
    AdamW (cosine decay of lr) on fresh queries drawn as synthetic_queries draws them."""
    codebook = CodeBook.build(vectors, vocab, length, method=method, seed=seed)
    head = CodeHead(vectors.shape[1], codebook, margin="none", backend="cpu")
    head.init_from_vectors(vectors)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        features, labels = synthetic_queries(vectors, batch, cosine, spread, generator)
        loss, _ = head(features, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return head.eval()


# ----------------------------------------------------------------------------- sources

@dataclass
class Source:
    templates: torch.Tensor   # (N, D) unit vectors, one per identity
    queries: torch.Tensor     # (Q, D) unit vectors
    labels: torch.Tensor      # (Q,) the true identity of each query
    description: dict


def synthetic_source(args) -> Source:
    vectors = synthetic_identities(args.synthetic, args.dim, args.seed)
    queries, labels = synthetic_queries(vectors, args.queries, args.cosine, args.cosine_spread,
                                        torch.Generator().manual_seed(args.seed + 2))
    return Source(vectors, queries, labels, {
        "source": "synthetic", "num_ids": args.synthetic, "dim": args.dim, "cosine": args.cosine,
        "cosine_spread": args.cosine_spread, "measured_cosine": (queries * vectors[labels]).sum(1).mean().item()})


def run_source(args) -> tuple[Source, CodeHead]:
    """The templates, held-out queries and code head of a trained run (its newest checkpoint)."""
    from gif_kernels.train import checkpoint
    from gif_kernels.train.model import embed, mean_features

    out = Path(args.run)
    saved = checkpoint.load_latest(out)
    if saved is None:
        raise ValueError(f"--run: no checkpoint in {out}")
    model, splits, run, codebook = checkpoint.restore_for_evaluation(saved, out, torch.device("cpu"))
    if codebook is None:
        raise ValueError(f"--run: {out} trained a {run['head']} head; decoding needs a code head (--head gif)")
    model.eval()
    queries, labels = embed(model.backbone, splits.ident_test, "cpu")
    if not len(labels):
        raise ValueError(f"--run: {out} holds no images out for identification (it ran with --holdout-per-id 0)")
    templates = mean_features(model.backbone, splits.train, splits.train_labels, splits.num_ids, "cpu")
    head = model.head.eval()
    head.backend = "cpu"
    return Source(templates, F.normalize(queries, dim=1), labels, {
        "source": "run", "run": str(out), "num_ids": splits.num_ids, "dim": templates.shape[1],
        "step": saved["step"]}), head


# ----------------------------------------------------------------------------- methods

@dataclass
class Method:
    """One searcher: search(queries) -> ids (Q, TOPK) int64."""
    kind: str
    setting: str
    search: object
    nbytes: int
    build_seconds: float


def faiss_module():
    try:
        import faiss
    except ImportError:
        return None
    faiss.omp_set_num_threads(torch.get_num_threads())
    return faiss


def faiss_methods(faiss, kind, templates, args):
    """The index of one FAISS kind, built once, and a Method for each of its search settings."""
    data = templates.numpy()
    dim = data.shape[1]
    start = time.perf_counter()
    if kind == "flat":
        index, settings = faiss.IndexFlatIP(dim), [None]
    elif kind == "ivf":
        nlist = args.nlist or max(1, min(len(data) // 39, 4 * round(math.sqrt(len(data)))))
        if nlist > len(data):  # a --run's N is known only once it is read
            raise ValueError(f"--nlist: expected at most N = {len(data)} lists, got {nlist}")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(data[torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
                    [:IVF_TRAIN_PER_LIST * nlist].numpy()])
        settings = [p for p in args.nprobe if p <= nlist]
    else:
        index = faiss.IndexHNSWFlat(dim, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = args.ef_construction
        settings = args.ef_search
    index.add(data)
    build_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:  # on disk: serialize_index would copy the index in memory
        faiss.write_index(index, os.path.join(folder, "index"))
        nbytes = os.path.getsize(os.path.join(folder, "index"))

    def method(setting):
        def search(queries):
            if kind == "ivf":
                index.nprobe = setting
            elif kind == "hnsw":
                index.hnsw.efSearch = setting
            return torch.from_numpy(index.search(queries.numpy(), TOPK)[1])
        name = {"flat": "", "ivf": f"nprobe {setting}", "hnsw": f"efSearch {setting}"}[kind]
        return Method(f"faiss {kind}", name, search, nbytes, build_seconds)

    return [method(setting) for setting in settings]


def beam_methods(head: CodeHead, build_seconds: float, args):
    trie = head.codebook.trie()
    nbytes = trie.nbytes + sum(p.numel() * p.element_size() for p in head.parameters())
    methods = []
    for beam, exact in [(beam, False) for beam in args.beams] + [(beam, True) for beam in args.exact_beams]:
        def search(queries, beam=beam, exact=exact):  # exact: the head's own best code, never re-ranked
            return head.identify(queries, beam=beam, topk=TOPK, exact=exact, rerank=False if exact else None)[0]
        methods.append(Method("beam exact" if exact else "beam", f"beam {beam}", search, nbytes, build_seconds))
    return methods


# ----------------------------------------------------------------------------- measurement

def in_batches(search, queries, batch):
    return torch.cat([search(queries[start:start + batch]) for start in range(0, len(queries), batch)])


def measure(method: Method, source: Source, args) -> dict:
    """Accuracy, queries/s (the fastest of up to 1 + --repeats passes over the queries, fewer once they
    have taken --max-seconds) and single-query latency of one method on the source's queries."""
    passes = []
    while len(passes) < 1 + args.repeats and sum(passes) < args.max_seconds:
        start = time.perf_counter()
        ids = in_batches(method.search, source.queries, args.batch)
        passes.append(time.perf_counter() - start)
    latencies = []
    for query in source.queries[:args.latency_queries].split(1):
        start = time.perf_counter()
        method.search(query)
        latencies.append((time.perf_counter() - start) * 1e3)
    truth = source.labels[:, None]
    return {"method": method.kind, "setting": method.setting,
            "top1": (ids[:, :1] == truth).any(1).float().mean().item(),
            "top5": (ids == truth).any(1).float().mean().item(),
            "queries_per_s": len(source.queries) / min(passes), "latency_ms": statistics.median(latencies),
            "bytes_per_id": method.nbytes / source.templates.shape[0], "build_s": method.build_seconds}


def measure_each(methods: list, source: Source, args) -> list:
    """measure() of each method, each row printed as it comes."""
    rows = []
    for method in methods:
        rows.append(measure(method, source, args))
        print(format_row(rows[-1]), flush=True)
    return rows


def format_row(row: dict) -> str:
    return (f"| {row['method']} | {row['setting']} | {row['top1']:.3f} | {row['top5']:.3f} | "
            f"{row['queries_per_s']:,.0f} | {row['latency_ms']:.3f} | {row['bytes_per_id']:,.1f} | "
            f"{'-' if row['build_s'] is None else format(row['build_s'], '.1f')} |")


def plot(rows: list, path: str, title: str):
    """Top-1 against queries/s (log x), one curve per method, as ANN benchmarks draw them."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in dict.fromkeys(row["method"] for row in rows):
        points = sorted((row["queries_per_s"], row["top1"]) for row in rows if row["method"] == kind)
        ax.plot(*zip(*points), marker="o", label=kind, color=f"C{PLOT_ORDER.index(kind)}")
    ax.set_xscale("log")
    ax.set_xlabel("queries/s")
    ax.set_ylabel("identification top-1")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line

def parse_codes(text):
    """VxL: vocabulary and code length."""
    try:
        vocab, length = (int(part) for part in text.lower().split("x"))
    except ValueError:
        vocab = length = 0
    if vocab < 2 or length < 1:
        raise argparse.ArgumentTypeError(f"expected VxL with V >= 2 and L >= 1 like 16x8, got {text!r}")
    return vocab, length


def parse_exact_beams(text):
    return [] if text == "none" else comma_list(positive_int)(text)


def build_parser():
    parser = ArgumentParser(description=__doc__)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--synthetic", type=parse_count, help="N synthetic identities (1M without --run)")
    source.add_argument("--run", help="a trained run's output folder (reference trainer, code head)")
    parser.add_argument("--dim", type=positive_int, default=512, help="synthetic: embedding size D")
    parser.add_argument("--cosine", type=float, default=0.7, help="synthetic: mean query-to-identity cosine")
    parser.add_argument("--cosine-spread", type=float, default=0.1, help="synthetic: its standard deviation")
    parser.add_argument("--queries", type=positive_int, default=1000, help="synthetic: queries")
    parser.add_argument("--codes", type=parse_codes, default="16x16", help="synthetic: VxL of the codes")
    parser.add_argument("--code-method", default="pq", choices=METHODS, help="synthetic: how codes are made")
    parser.add_argument("--train-steps", type=int, default=0, help="synthetic: head training steps (0: none)")
    parser.add_argument("--train-batch", type=positive_int, default=1024, help="synthetic: queries per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="synthetic: the head's peak learning rate")
    parser.add_argument("--methods", type=comma_list(one_of(METHOD_KINDS)), default=",".join(METHOD_KINDS),
                        help="methods, comma-separated")
    parser.add_argument("--beams", type=comma_list(positive_int), default="8,16,32,64,256,1024", help="beam widths")
    parser.add_argument("--exact-beams", type=parse_exact_beams, default="32",
                        help="beams also run with exact re-search, or none (slow where few answers are certified)")
    parser.add_argument("--nlist", type=positive_int, help="ivf lists (default 4 sqrt(N), at most N / 39)")
    parser.add_argument("--nprobe", type=comma_list(positive_int), default="1,2,4,8,16,32,64,128",
                        help="ivf lists searched")
    parser.add_argument("--hnsw-m", type=positive_int, default=32, help="HNSW links per node")
    parser.add_argument("--ef-construction", type=positive_int, default=40, help="HNSW build beam")
    parser.add_argument("--ef-search", type=comma_list(positive_int), default="16,32,64,128,256,512",
                        help="HNSW search beams")
    parser.add_argument("--batch", type=positive_int, default=1000, help="queries per search call")
    parser.add_argument("--repeats", type=positive_int, default=2, help="timed passes over the queries after the first")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="no further pass once the passes took this long")
    parser.add_argument("--latency-queries", type=positive_int, default=50, help="queries timed one at a time")
    parser.add_argument("--seed", type=int, default=0, help="seed of the embeddings, codes and IVF sample")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--plot", help="write the top-1 vs queries/s plot here (needs matplotlib)")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.run is None and args.synthetic is None:
        args.synthetic = 10**6
    if not -1.0 <= args.cosine <= 1.0:
        parser.error(f"argument --cosine: expected a number in [-1, 1], got {args.cosine}")
    if not 0.0 <= args.cosine_spread < math.inf:
        parser.error(f"argument --cosine-spread: expected a finite number >= 0, got {args.cosine_spread}")
    if args.train_steps < 0:
        parser.error(f"argument --train-steps: expected a whole number >= 0, got {args.train_steps}")
    for option in ("lr", "max_seconds"):
        if not 0.0 < getattr(args, option) < math.inf:
            parser.error(f"argument --{option.replace('_', '-')}: expected a finite number > 0, got "
                         f"{getattr(args, option)}")
    for option in ("beams", "exact_beams"):
        if min(getattr(args, option), default=TOPK) < TOPK:
            parser.error(f"argument --{option.replace('_', '-')}: expected each >= the top-{TOPK} reported, got "
                         f"{min(getattr(args, option))}")
    vocab, length = args.codes
    if args.synthetic is not None:
        if vocab ** length < args.synthetic:
            parser.error(f"argument --codes: {vocab}x{length} gives {vocab ** length} codes, fewer than "
                         f"N = {args.synthetic}")
        if args.nlist is not None and args.nlist > args.synthetic:
            parser.error(f"argument --nlist: expected at most N = {args.synthetic} lists, got {args.nlist}")
        if args.code_method == "pq" and length > args.dim:
            parser.error(f"argument --codes: pq splits the D = {args.dim} columns into L blocks, so L <= D")
    if args.plot and not has_matplotlib():
        parser.error("argument --plot: needs matplotlib (pip install matplotlib)")
    return args


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors():
        head = None
        if args.run is not None:
            source, head = run_source(args)
            vocab, length = head.codebook.vocab, head.codebook.length
        else:
            source = synthetic_source(args)
            vocab, length = args.codes
        faiss = faiss_module()
        description = {**source.description, "queries": len(source.labels), "topk": TOPK,
                       "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "cpu_capability": gif_kernels.build_info()["cpu_capability"],
                       "faiss": faiss.__version__ if faiss else None, "vocab": vocab, "length": length}
        print("# " + ", ".join(f"{key} {value}" for key, value in description.items()))
        if faiss is None and {"flat", "ivf", "hnsw"} & set(args.methods):
            print("# faiss is not installed (pip install faiss-cpu): its rows are left out")
        print("\n| method | setting | top-1 | top-5 | queries/s | latency ms | bytes/id | build s |")
        print("|---|---|---|---|---|---|---|---|")
        rows = []
        for kind in args.methods:
            if kind == "brute":
                methods = [Method("brute force", "", lambda q: brute_force_topk(q, source.templates, TOPK),
                                  source.templates.numel() * source.templates.element_size(), 0.0)]
            elif kind == "beam":
                head_seconds = None
                if head is None:  # made here, after the FAISS indexes have been freed
                    start = time.perf_counter()
                    head = synthetic_head(source.templates, vocab, length, args.code_method, args.train_steps,
                                          args.train_batch, args.lr, args.cosine, args.cosine_spread, args.seed)
                    head_seconds = time.perf_counter() - start
                methods = beam_methods(head, head_seconds, args)
            elif faiss is not None:
                methods = faiss_methods(faiss, kind, source.templates, args)
            else:
                continue
            rows += measure_each(methods, source, args)
            del methods  # a FAISS index is freed before the next is built
        report = {**description, "results": rows}
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        if args.plot:
            plot(rows, args.plot, f"N = {source.description['num_ids']:,}, D = {source.templates.shape[1]}")
    return report


if __name__ == "__main__":
    main()
