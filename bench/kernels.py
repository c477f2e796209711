"""fused_code_ce forward + backward against the code head written plainly in PyTorch, eager and under
torch.compile, and against three plain matrix products of the same FLOPs.

The baseline is harness.plain_code_head (normalize, einsum, margin, F.cross_entropy), what a user would
otherwise write and compile. Every row of one run is timed side by side on the same device, the
methods taking turns over --runs rounds; each figure is the median over the rounds of the median of
--repeats steps. "3 GEMMs" times torch.matmul on the head's useful products (the logits and both
gradients, 6 * B * L * V * D FLOPs): the op's rate as a fraction of it says how close to the GEMMs the
step is. On a GPU both the fused backends and the compiled head are also replayed from CUDA graphs
("graph"), so that neither side is timed with Python's launch overhead and the other without; there
Triton's deterministic backward is "triton-det", and, when the package is installed, Cut Cross-Entropy's
linear_cross_entropy is applied per position (scale * unit features against unit rows; no margin).

    python bench/kernels.py                 # the default shapes on the machine at hand
    python bench/kernels.py --json out.json --shapes 512x6x16x512
"""
import json
import platform
import statistics

import torch

import gif_kernels
from gif_kernels.cli import ArgumentParser
from harness import median_ms, parse_shape, plain_code_head, positive_int

DEFAULT_SHAPES = {"cpu": ["512x6x16x512", "512x3x256x512", "256x2x4096x512"],
                  "cuda": ["512x6x16x512", "512x4x64x512", "512x3x256x512", "4096x2x4096x512",
                           "8192x2x32768x512"]}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def training_step(loss_fn, x, weight, codes, margin):
    """One forward + backward, the gradients returned rather than accumulated (every step alike)."""
    def step():
        return torch.autograd.grad(loss_fn(x, weight, codes, m3=margin), (x, weight))
    return step


def graph_ms(step, repeats):
    """Median time of one step replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles, allocates) outside the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return median_ms(graph.replay, "cuda", repeats)


def print_kernel_profile(step, name, steps=5):
    """The GPU kernels of `steps` training steps, by total CUDA time (torch.profiler)."""
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    print(f"-- {name}: kernels of {steps} steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


def cut_cross_entropy_loss():
    """Cut Cross-Entropy per position, or None when it is not installed (an optional peer)."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return None

    def loss(x, weight, codes, m3=0.0, scale=64.0):
        feats = scale * torch.nn.functional.normalize(x, dim=-1)
        rows = torch.nn.functional.normalize(weight, dim=-1)
        return sum(linear_cross_entropy(feats, rows[j], codes[:, j], reduction="sum")
                   for j in range(weight.shape[0])) / x.shape[0]
    return loss


def three_gemms(B, L, V, D, dtype, device):
    """torch.matmul on the head's useful products: logits (B, D) @ (D, L*V), then both gradients."""
    a = torch.randn(B, D, dtype=dtype, device=device)
    w = torch.randn(L * V, D, dtype=dtype, device=device)
    g = torch.randn(B, L * V, dtype=dtype, device=device)
    return lambda: (a @ w.t(), g @ w, g.t() @ a)


def fused_fn(method):
    """A fused backend by method name; a "-det" suffix asks for its deterministic backward."""
    backend, _, deterministic = method.partition("-")
    return lambda *args, **kwargs: gif_kernels.fused_code_ce(*args, backend=backend,
                                                             deterministic=bool(deterministic), **kwargs)


def bench_shape(B, L, V, D, dtype, device, backends, repeats, runs, margin, profile=False):
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, D, generator=gen).to(device, dtype).requires_grad_()
    weight = torch.randn(L, V, D, generator=gen).to(device, dtype).requires_grad_()
    codes = torch.randint(0, V, (B, L), generator=gen).to(device)
    row = {"shape": dict(B=B, L=L, V=V, D=D), "dtype": str(dtype).replace("torch.", ""),
           "runs": {}, "time_ms": {}, "errors": {}}
    losses = {"eager": plain_code_head, "compile": torch.compile(plain_code_head, dynamic=False),
              **{backend: fused_fn(backend) for backend in backends}}
    cce = cut_cross_entropy_loss() if device == "cuda" else None
    if cce is not None:
        losses["cce"] = cce
    steps = {name: training_step(fn, x, weight, codes, margin) for name, fn in losses.items()}
    steps["3 gemms"] = three_gemms(B, L, V, D, dtype, device)
    timings = {name: (lambda step=step: median_ms(step, device, repeats)) for name, step in steps.items()}
    if device == "cuda":
        graphed = ["compile"] + backends
        timings.update({f"{name} graph": (lambda name=name: graph_ms(steps[name], repeats)) for name in graphed})
    for _ in range(runs):  # the methods take turns, so that a drift of the machine spreads over all of them
        for name, timing in timings.items():
            if name in row["errors"]:
                continue
            try:
                row["runs"].setdefault(name, []).append(timing())
            except Exception as error:  # noqa: BLE001 - any failure of one method is a result too
                row["errors"][name] = repr(error)
                print(f"{name}: failed: {error!r}"[:500], flush=True)
    row["time_ms"] = {name: statistics.median(times) for name, times in row["runs"].items()}
    if profile:
        for backend in backends:
            print_kernel_profile(steps[backend], f"{backend} {B}x{L}x{V}x{D}")
    gemm_ms = row["time_ms"].get("3 gemms")
    row["gemm_fraction"] = {name: gemm_ms / ms for name, ms in row["time_ms"].items()
                            if gemm_ms is not None and name != "3 gemms"}
    flops = 6 * B * L * V * D
    row["tflops"] = {name: flops / (ms * 1e9) for name, ms in row["time_ms"].items()}
    return row


def format_row(row, backends):
    t, nan = row["time_ms"], float("nan")
    shape = " x ".join(str(row["shape"][k]) for k in "BLVD")
    line = f"{shape:>22} {t.get('eager', nan):9.3f} {t.get('compile', nan):9.3f}"
    line += f" {t.get('3 gemms', nan):9.3f}"
    for b in backends:
        ms = t.get(b, nan)
        line += (f" {ms:9.3f} {t.get('eager', nan) / ms:7.2f}x {t.get('compile', nan) / ms:7.2f}x"
                 f" {row['gemm_fraction'].get(b, nan):6.0%}")
    if "cce" in t:
        line += f"  cce {t['cce']:.3f} ms"
    graphs = {name.removesuffix(" graph"): ms for name, ms in t.items() if name.endswith(" graph")}
    if graphs:
        compiled = graphs.get("compile", nan)
        line += "  graph: " + ", ".join(
            f"{name} {ms * 1e3:.1f} us" + ("" if name == "compile" else f" ({compiled / ms:.2f}x compile)")
            for name, ms in graphs.items())
    return line


def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", type=parse_shape, nargs="+", help="BxLxVxD (shared features)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--margin", type=float, default=0.4, help="CosFace margin m3")
    parser.add_argument("--repeats", type=positive_int, default=20, help="steps timed per method and round")
    parser.add_argument("--runs", type=positive_int, default=3, help="rounds; each figure is their median")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--profile", action="store_true", help="print each fused backend's GPU kernels")
    args = parser.parse_args()
    device = args.device
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    shapes = args.shapes or [parse_shape(s) for s in DEFAULT_SHAPES[device]]
    if device == "cuda":
        backends = ["triton", "triton-det"] + (["cuda"] if gif_kernels.ops.has_cuda_kernels() else [])
    else:
        backends = ["cpu"]
    print(f"fused_code_ce fwd+bwd, {device}, {dtype}, CosFace m3={args.margin}, {torch.get_num_threads()} "
          f"threads; plain head eager / torch.compile; median of {args.runs} rounds of {args.repeats} steps")
    print(f"{'B x L x V x D':>22} {'eager ms':>9} {'compile':>9} {'3 GEMMs':>9}" + "".join(
        f" {b + ' ms':>9} {'vs eager':>8} {'vs comp':>8} {'GEMMs':>6}" for b in backends))
    results = []
    for B, L, V, D in shapes:
        row = bench_shape(B, L, V, D, dtype, device, backends, args.repeats, args.runs, args.margin,
                          args.profile and device == "cuda")
        results.append(row)
        print(format_row(row, backends), flush=True)
    if args.json:
        info = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                "torch": torch.__version__, "build_info": gif_kernels.build_info(),
                "threads": torch.get_num_threads(), "results": results}
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
