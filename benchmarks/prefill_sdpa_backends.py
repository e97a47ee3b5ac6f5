"""Prefill attention at the long-prefill shapes (Llama-3.2-1B heads): our paged Triton kernel against
torch SDPA's backends (cuDNN, flash, memory-efficient), on a whole prompt and on chunks after a
cached prefix: lower-right causal masks, cuDNN with placeholder query rows in front (a square
mask), and the cost of gathering a request's K/V out of the paged cache. "maxerr" is against the
Triton kernel's output.

    python benchmarks/prefill_sdpa_backends.py   (a CUDA GPU)
"""

import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from attention_kernels import paged_setup

from batchlm.kernels.paged_prefill import paged_prefill_attention

DT = torch.bfloat16
H, HKV, D = 32, 8, 64
SCALE = 0.125


def ms(fn):
    return float(do_bench(fn, warmup=20, rep=200, return_mode="median"))


def gather_kv(cache, table, length):
    """[S, HKV, D] keys and values of one request from the paged cache."""
    bs = cache.shape[2]
    blocks = table[: math.ceil(length / bs)].long()
    k = cache[0].index_select(0, blocks).reshape(-1, HKV, D)[:length]
    v = cache[1].index_select(0, blocks).reshape(-1, HKV, D)[:length]
    return k, v


def case(L, P):
    S = P + L
    cache, tables, seq_lens = paged_setup(1, S, HKV, D, 16)
    q = torch.randn(L, H, D, device="cuda", dtype=DT)
    starts = torch.tensor([0, L], dtype=torch.int32, device="cuda")
    flops = 4 * H * D * L * (P + L / 2)
    res = {}
    tri = lambda: paged_prefill_attention(q, cache, starts, seq_lens, tables, SCALE, L)  # noqa: E731
    ref = tri()
    res["triton paged"] = ms(tri)
    k, v = gather_kv(cache, tables[0], S)
    res["gather K/V"] = ms(lambda: gather_kv(cache, tables[0], S))
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, L, D] view
    kh = k.transpose(0, 1).unsqueeze(0)
    vh = v.transpose(0, 1).unsqueeze(0)
    ke = kh.repeat_interleave(H // HKV, dim=1)
    ve = vh.repeat_interleave(H // HKV, dim=1)

    def check(name, out):
        o = out[0].transpose(0, 1) if out.dim() == 4 else out
        err = (o.float() - ref.float()).abs().max().item()
        return err

    backends = {
        "default": None,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    for bname, be in backends.items():
        for gname, (kk, vv, gqa) in {"gqa": (kh, vh, True), "expanded": (ke, ve, False)}.items():
            if P == 0:
                fn = lambda kk=kk, vv=vv, gqa=gqa: F.scaled_dot_product_attention(  # noqa: E731
                    qh, kk, vv, is_causal=True, scale=SCALE, enable_gqa=gqa
                )
                label = f"sdpa {bname} {gname} causal"
            else:
                mask = causal_lower_right(L, S)
                fn = lambda kk=kk, vv=vv, gqa=gqa, mask=mask: F.scaled_dot_product_attention(  # noqa: E731
                    qh, kk, vv, attn_mask=mask, scale=SCALE, enable_gqa=gqa
                )
                label = f"sdpa {bname} {gname} lower-right"
            try:
                if be is None:
                    out = fn()
                    t = ms(fn)
                else:
                    with sdpa_kernel([be]):
                        out = fn()
                        t = ms(fn)
                res[label] = (t, check(label, out))
            except Exception as e:
                res[label] = f"fails: {type(e).__name__}: {str(e)[:120]}"
    if P > 0:
        # Padded query: every position 0..S-1 through top-left causal, the last L rows kept.
        qpad = torch.randn(S, H, D, device="cuda", dtype=DT)
        qpad[P:] = q
        qph = qpad.transpose(0, 1).unsqueeze(0)
        for bname in ("cudnn", "flash"):
            be = backends[bname]
            fn = lambda: F.scaled_dot_product_attention(qph, ke, ve, is_causal=True, scale=SCALE)  # noqa: E731
            try:
                with sdpa_kernel([be]):
                    out = fn()[:, :, P:]
                    t = ms(fn)
                res[f"sdpa {bname} expanded, padded query"] = (t, check("", out))
            except Exception as e:
                res[f"sdpa {bname} padded"] = f"fails: {type(e).__name__}: {str(e)[:120]}"
    print(f"== L={L} after P={P}: {flops / 1e9:.1f} GFLOP", flush=True)
    for name, val in res.items():
        if isinstance(val, tuple):
            t, err = val
            print(f"  {name:<44} {t:8.4f} ms {flops / t / 1e9:7.1f} TFLOP/s  maxerr {err:.3g}", flush=True)
        elif isinstance(val, float):
            extra = f"{flops / val / 1e9:7.1f} TFLOP/s" if name.startswith("triton") else ""
            print(f"  {name:<44} {val:8.4f} ms {extra}", flush=True)
        else:
            print(f"  {name:<44} {val}", flush=True)


def which_kernel():
    q = torch.randn(1, H, 8000, D, device="cuda", dtype=DT)
    k = torch.randn(1, HKV, 8000, D, device="cuda", dtype=DT)
    F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    print("default sdpa kernels:", sorted(names)[:6], flush=True)


if __name__ == "__main__":
    print(torch.__version__, torch.backends.cudnn.version(), flush=True)
    which_kernel()
    for L, P in ((8000, 0), (7808, 192), (4096, 4096), (512, 0), (384, 0)):
        case(L, P)
