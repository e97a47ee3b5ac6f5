"""Start-up cost of one GGUF block type on the quantized CPU kernels: converting a tensor's blocks into
the kernels' code blocks (quant_blocks.py), and the error of the result against the gguf package's
reference values. Random blocks (random bytes, the float16 scales set to ~1e-3, jittered) of each
--shapes size.

- before: the path of a type the kernels do not read, the gguf package's numpy dequantizer a few rows
  at a time, then requantization to Q8_0 (dense_blocks.q8_from_row_chunks), on one thread as this
  comparison always ran (gguf_reference_threads.py measures that path on several).
- after: cpu_quantized.code_blocks, our own decoder where quant_blocks has one for the type.

With --threads, only `after`, once for each thread count (torch's thread count, which a load's pool
takes: reference_rows.one_pool()).

    python benchmarks/gguf_block_conversion.py --type Q3_K --shapes 4096x4096 4096x16384 --tensors 4
    python benchmarks/gguf_block_conversion.py --type Q4_K --shapes 4096x14336 --threads 1 2

Prints one JSON line per path and shape: seconds of each sitting (converting --tensors distinct
tensors of the shape), seconds converting and packing one of them into panels (quant_panels.pack),
the RMS error relative to the weights' RMS, the largest error of one value, and bytes per 32 weights
once packed.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from batchlm.kernels import quant_blocks, quant_panels
from batchlm.layers.quantization import reference_rows
from batchlm.layers.quantization.base import QuantizedTensor
from batchlm.layers.quantization.cpu_quantized import code_blocks

# Offsets of each type's float16 scale fields (d, then dmin where it has one) and their size.
SCALE_FIELDS = {
    "Q2_K": ((80, 2e-3), (82, 3e-3)),
    "Q3_K": ((108, 1e-3),),
    "Q4_K": ((0, 2e-4), (2, 1.5e-3)),
    "Q5_K": ((0, 1e-4), (2, 1.55e-3)),
    "Q8_0": ((0, 1e-3),),
}


def random_tensor(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> QuantizedTensor:
    block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    blocks = rng.integers(0, 256, (rows * cols // block_size, block_bytes), dtype=np.uint8)
    for offset, scale in SCALE_FIELDS[type_name]:
        halves = (rng.uniform(0.5, 1.5, len(blocks)) * scale).astype(np.float16)
        blocks[:, offset : offset + 2] = halves.view(np.uint8).reshape(-1, 2)
    return QuantizedTensor(
        type_name, torch.from_numpy(blocks.reshape(rows, -1)), cols, block_size, block_bytes
    )


def reference_path(tensor: QuantizedTensor) -> quant_blocks.CodeBlocks:
    return reference_rows.q8_code_blocks(tensor, threads=1)


def on_threads(threads: int) -> Callable[[QuantizedTensor], quant_blocks.CodeBlocks]:
    def convert(tensor: QuantizedTensor) -> quant_blocks.CodeBlocks:
        torch.set_num_threads(threads)
        with reference_rows.one_pool():
            return code_blocks(tensor)

    return convert


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--type", default="Q3_K", choices=sorted(SCALE_FIELDS))
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x14336", "4096x16384"])
    parser.add_argument("--sittings", type=int, default=2)
    parser.add_argument("--tensors", type=int, default=1, help="distinct tensors of each shape a sitting")
    parser.add_argument("--threads", type=int, nargs="*", default=[], help="`after` on these thread counts")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    paths: dict[str, Callable[[QuantizedTensor], quant_blocks.CodeBlocks]] = {
        "before": reference_path,
        "after": code_blocks,
    }
    if args.threads:
        paths = {f"after, {threads} threads": on_threads(threads) for threads in args.threads}
    for shape in args.shapes:
        rows, cols = (int(size) for size in shape.split("x"))
        tensors = [random_tensor(args.type, rows, cols, rng) for _ in range(args.tensors)]
        tensor = tensors[0]
        values = gguf_dequantize(tensor.data.numpy(), GGMLQuantizationType[args.type]).reshape(rows, cols)
        rms = float(np.sqrt(np.mean(np.square(values, dtype=np.float64))))
        for name, convert in paths.items():
            if name.startswith("after") and not quant_blocks.supported(args.type):
                continue
            seconds, packed_seconds = [], []
            for _ in range(args.sittings):
                start = time.perf_counter()
                for each in tensors:
                    convert(each)
                seconds.append(round(time.perf_counter() - start, 3))
                start = time.perf_counter()
                blocks = convert(tensor)
                packed = quant_panels.pack(blocks)
                packed_seconds.append(round(time.perf_counter() - start, 3))
            error = quant_blocks.dequantize(blocks) - values
            line = {
                "type": args.type,
                "shape": shape,
                "path": name,
                "seconds": seconds,
                "tensors": args.tensors,
                "one_with_packing": packed_seconds,
                "rms_error_relative": float(np.sqrt(np.mean(np.square(error, dtype=np.float64)))) / rms,
                "max_error": float(np.abs(error).max()),
                "bytes_per_32": packed.nbytes / (rows * cols / 32),
            }
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
