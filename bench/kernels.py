"""fused_code_ce forward + backward against the same math in eager PyTorch and under torch.compile.

Every row of one run is timed side by side on the same device; the table reports ratios against
eager and torch.compile. On a GPU it also reports TFLOP/s against torch.matmul on the same FLOPs,
each fused backend's time with its launches captured in a CUDA graph (what the kernels cost without
Python's launch overhead), Triton's deterministic backward as "triton-det", and, when the package is installed, Cut Cross-Entropy's
linear_cross_entropy applied per position (scale * unit features against unit rows; it has no margin).

    python bench/kernels.py                 # the default shapes on the machine at hand
    python bench/kernels.py --json out.json --shapes 512x6x16x512
"""
import json
import platform

import torch

import gif_kernels
from gif_kernels import reference
from gif_kernels.cli import ArgumentParser
from harness import median_ms, parse_shape

DEFAULT_SHAPES = {"cpu": ["512x6x16x512", "512x3x256x512", "256x2x4096x512"],
                  "cuda": ["512x6x16x512", "512x4x64x512", "512x3x256x512", "4096x2x4096x512",
                           "8192x2x32768x512"]}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def training_step(loss_fn, x, weight, codes, margin):
    def step():
        x.grad = weight.grad = None
        loss_fn(x, weight, codes, m3=margin).backward()
    return step


def graph_ms(loss_fn, x, weight, codes, margin, repeats):
    """Median time of one forward + backward replayed from a CUDA graph."""
    def step():
        return torch.autograd.grad(loss_fn(x, weight, codes, m3=margin), (x, weight))
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


def print_kernel_profile(fn, x, weight, codes, margin, name, steps=5):
    """The GPU kernels of `steps` training steps of fn, by total CUDA time (torch.profiler)."""
    step = training_step(fn, x, weight, codes, margin)
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


def matmul_ms(B, L, V, D, dtype, device, repeats):
    """torch.matmul on the head's useful FLOPs: logits (B, D) @ (D, L*V), then both gradients."""
    a = torch.randn(B, D, dtype=dtype, device=device)
    w = torch.randn(L * V, D, dtype=dtype, device=device)
    g = torch.randn(B, L * V, dtype=dtype, device=device)
    return median_ms(lambda: (a @ w.t(), g @ w, g.t() @ a), device, repeats)


def bench_shape(B, L, V, D, dtype, device, backends, repeats, margin, profile=False):
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, D, generator=gen).to(device, dtype).requires_grad_()
    weight = torch.randn(L, V, D, generator=gen).to(device, dtype).requires_grad_()
    codes = torch.randint(0, V, (B, L), generator=gen).to(device)
    row = {"shape": dict(B=B, L=L, V=V, D=D), "dtype": str(dtype).replace("torch.", ""),
           "time_ms": {}, "errors": {}}

    def measure(table, name, timing):
        """table[name] = timing(); a failure is reported and the other rows still run."""
        try:
            table[name] = timing()
        except Exception as error:  # noqa: BLE001 - any failure of one method is a result too
            row["errors"][f"{name} ({'graph' if table is not row['time_ms'] else 'eager'})"] = repr(error)
            print(f"{name}: failed: {error!r}"[:500], flush=True)

    def fused_fn(method):
        """A fused backend by method name; a "-det" suffix asks for its deterministic backward."""
        backend, _, deterministic = method.partition("-")
        return lambda *args, **kwargs: gif_kernels.fused_code_ce(*args, backend=backend,
                                                                 deterministic=bool(deterministic), **kwargs)

    methods = {"eager": reference.fused_code_ce,
               "compile": torch.compile(reference.fused_code_ce, dynamic=False),
               **{backend: fused_fn(backend) for backend in backends}}
    cce = cut_cross_entropy_loss() if device == "cuda" else None
    if cce is not None:
        methods["cce"] = cce
    for name, fn in methods.items():
        measure(row["time_ms"], name, lambda: median_ms(training_step(fn, x, weight, codes, margin),
                                                        device, repeats))
    if device == "cuda":
        row["graph_ms"] = {}
        for backend in backends:
            measure(row["graph_ms"], backend,
                    lambda: graph_ms(methods[backend], x, weight, codes, margin, repeats))
        row["fastest"] = min(row["graph_ms"], key=row["graph_ms"].get, default=None)
        if profile:
            for backend in backends:
                print_kernel_profile(methods[backend], x, weight, codes, margin, f"{backend} {B}x{L}x{V}x{D}")
        useful_flops = 6 * B * L * V * D  # forward logits + both gradient products
        row["matmul_ms"] = matmul_ms(B, L, V, D, dtype, device, repeats)
        row["tflops"] = {name: useful_flops / (ms * 1e9) for name, ms in
                         {**row["time_ms"], **{f"{b} graph": ms for b, ms in row["graph_ms"].items()},
                          "matmul": row["matmul_ms"]}.items()}
    return row


def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", type=parse_shape, nargs="+", help="BxLxVxD (shared features)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--margin", type=float, default=0.4, help="CosFace margin m3")
    parser.add_argument("--repeats", type=int, default=20)
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
    results = []
    header = f"{'B x L x V x D':>22} {'eager ms':>9} {'compile':>9}" + "".join(
        f" {b + ' ms':>10} {'vs eager':>9} {'vs comp':>8}" for b in backends)
    print(f"fused_code_ce fwd+bwd, {device}, {dtype}, CosFace m3={args.margin}")
    print(header)
    for B, L, V, D in shapes:
        row = bench_shape(B, L, V, D, dtype, device, backends, args.repeats, args.margin,
                          args.profile and device == "cuda")
        results.append(row)
        t = row["time_ms"]
        nan = float("nan")
        line = f"{f'{B} x {L} x {V} x {D}':>22} {t.get('eager', nan):9.3f} {t.get('compile', nan):9.3f}"
        for b in backends:
            ms = t.get(b, nan)
            line += f" {ms:10.3f} {t.get('eager', nan) / ms:8.1f}x {t.get('compile', nan) / ms:7.1f}x"
        if "cce" in t:
            line += f"  cce {t['cce']:.3f} ms"
        if "graph_ms" in row:
            line += "  graph " + ", ".join(f"{b} {ms * 1e3:.1f} us ({t.get('compile', nan) / ms:.0f}x comp)"
                                           for b, ms in row["graph_ms"].items())
            line += f"  fastest {row['fastest']}"
        if "tflops" in row:
            line += "  TFLOP/s " + ", ".join(f"{k} {v:.0f}" for k, v in row["tflops"].items())
        print(line, flush=True)
    if args.json:
        info = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                "torch": torch.__version__, "build_info": gif_kernels.build_info(),
                "threads": torch.get_num_threads(), "results": results}
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
