"""A chain of 64 one-row GEMVs in a CUDA graph (each reads the one before's output), cycling over
enough weight copies to outgrow L2: cuBLAS, a plain Triton GEMV, and the same kernel launched with
programmatic dependent launch in three forms (wait first; weights read, then wait; and the latter
with the next kernel let in at the start). How much of a small linear's time is the gap between
kernels, which is what kernels/pdl.py takes back in the decode step. "maxerr" is against the
cuBLAS chain (64 chained bf16 products drift apart; it is not an accuracy figure).

    python benchmarks/gemv_chain_pdl.py   (a Hopper GPU)
"""

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.testing import do_bench


@triton.jit
def gemv(w_ptr, x_ptr, y_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr):
    # MODE 0: plain; 1: wait first; 2: weights loaded, then wait; 3: as 2 and dependents launched early
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, K)
    if MODE == 1:
        gdc_wait()
    if MODE == 3:
        gdc_launch_dependents()
    w = tl.load(w_ptr + rows[:, None] * K + cols[None, :])
    if MODE >= 2:
        gdc_wait()
    x = tl.load(x_ptr + cols)
    y = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    tl.store(y_ptr + rows, y.to(tl.bfloat16))


def chain(weights, bufs, kind, block_n, warps):
    n = weights[0].shape[0]
    for i, w in enumerate(weights):
        x, y = bufs[i % 2][: w.shape[1]], bufs[(i + 1) % 2][:n]
        if kind == "cublas":
            torch.matmul(w, x, out=y)
        else:
            mode = {"triton": 0, "pdl wait first": 1, "pdl prefetch": 2, "pdl prefetch+early": 3}[kind]
            gemv[(n // block_n,)](
                w, x, y, n, K=w.shape[1], BLOCK_N=block_n, MODE=mode, num_warps=warps, launch_pdl=mode > 0
            )


def run(n, k, copies, length, block_n, warps):
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
    seq = [weights[i % copies] for i in range(length)]
    results = {}
    for kind in ("cublas", "triton", "pdl wait first", "pdl prefetch", "pdl prefetch+early"):
        m = max(n, k)
        bufs = [
            torch.randn(m, device="cuda", dtype=torch.bfloat16),
            torch.zeros(m, device="cuda", dtype=torch.bfloat16),
        ]
        start = bufs[0].clone()
        try:
            chain(seq, bufs, kind, block_n, warps)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                chain(seq, bufs, kind, block_n, warps)
            bufs[0].copy_(start)
            g.replay()
            torch.cuda.synchronize()
            out = bufs[length % 2].float().clone()
            t = float(do_bench(g.replay, warmup=20, rep=200, return_mode="median"))
            results[kind] = (t, out)
        except Exception as e:
            print(f"  {kind}: fails {type(e).__name__}: {str(e)[:200]}", flush=True)
    ref = results["cublas"][1]
    gb = n * k * 2 / 1e9
    for kind, (t, out) in results.items():
        err = (out - ref).abs().max().item()
        us = t * 1e3 / length
        print(
            f"  {n}x{k} bn{block_n} w{warps} {kind:<20} {us:7.2f} us/GEMV  {gb / (us * 1e-6):7.0f} GB/s  maxerr {err:.3g}",
            flush=True,
        )


if __name__ == "__main__":
    for n, k, bn, w in (
        (2048, 2048, 16, 4),
        (3072, 2048, 16, 4),
        (2048, 2048, 8, 4),
        (16384, 2048, 16, 4),
        (2048, 8192, 4, 4),
    ):
        run(n, k, 16 if n < 8192 else 4, 64, bn, w)
