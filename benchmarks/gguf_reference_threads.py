"""Start-up cost of the GGUF block types only the gguf package's numpy reference code reads
(gguf_types.REFERENCE_TYPES), converted in row chunks on one thread and on several
(layers/quantization/reference_rows.py). Random blocks (random bytes, the float16 scales set small,
TQ2_0's codes kept ternary) of each --type, --tensors tensors of --shape each.

- q8: the quantized CPU kernels' path, reference values requantized to Q8_0 (cpu_quantized.code_blocks).
- dense: the dense (GPU, other) path, reference values cast to --dtype (QuantizedTensor.dequantize).

    python benchmarks/gguf_reference_threads.py --types Q2_K IQ2_XXS --shape 4096x4096 --tensors 4 --threads 0 1 2

--threads 0 is the code before this change (dense: the whole tensor decoded in one call, then cast).
Each sitting runs every thread count in turn, on the same tensors, and checks that the results are
equal byte for byte. Prints one JSON line per type, path and thread count: seconds of each sitting,
seconds a GB of blocks, and CPU seconds over wall seconds (above 1 only where threads overlapped).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from batchlm.kernels import dense_blocks
from batchlm.kernels.quant_blocks import CodeBlocks
from batchlm.layers.quantization import reference_rows
from batchlm.layers.quantization.base import QuantizedTensor

# Offsets of each type's float16 scale fields and their size.
SCALE_FIELDS = {
    "Q2_K": ((80, 2e-3), (82, 3e-3)),
    "IQ1_S": ((0, 7e-3),),
    "IQ2_XXS": ((0, 9e-4),),
    "IQ2_XS": ((0, 9e-4),),
    "IQ2_S": ((0, 9e-4),),
    "IQ3_XXS": ((0, 3.5e-4),),
    "IQ3_S": ((0, 3.5e-4),),
    "TQ1_0": ((52, 6e-2),),
    "TQ2_0": ((64, 5e-2),),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def random_tensor(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> QuantizedTensor:
    block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    blocks = rng.integers(0, 256, (rows * cols // block_size, block_bytes), dtype=np.uint8)
    if type_name == "TQ2_0":
        trits = rng.integers(0, 3, (len(blocks), 64, 4), dtype=np.uint8)
        blocks[:, :64] = (trits << np.array([0, 2, 4, 6], dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)
    for offset, scale in SCALE_FIELDS[type_name]:
        halves = (rng.uniform(0.5, 1.5, len(blocks)) * scale).astype(np.float16)
        blocks[:, offset : offset + 2] = halves.view(np.uint8).reshape(-1, 2)
    return QuantizedTensor(
        type_name, torch.from_numpy(blocks.reshape(rows, -1)), cols, block_size, block_bytes
    )


def before(tensor: QuantizedTensor, path: str, dtype: torch.dtype) -> CodeBlocks | torch.Tensor:
    """The conversion as it was: chunks decoded in turn on the calling thread (q8), the whole tensor
    decoded in one call, then cast (dense)."""
    qtype = GGMLQuantizationType[tensor.qtype]
    rows, cols = tensor.shape
    if path == "q8":
        data = tensor.data.numpy()
        return dense_blocks.q8_from_row_chunks(
            rows, cols, lambda start, stop: gguf_dequantize(data[start:stop], qtype).reshape(-1, cols)
        )
    values = gguf_dequantize(tensor.data.contiguous().numpy(), qtype)
    return torch.from_numpy(values.reshape(rows, cols)).to(dtype)


def fingerprint(result: CodeBlocks | torch.Tensor) -> bytes:
    if isinstance(result, torch.Tensor):
        return result.view(torch.uint8).numpy().tobytes()
    return result.codes.tobytes() + result.scales.tobytes() + result.biases.tobytes()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--types", nargs="+", default=["Q2_K", "IQ2_XXS", "IQ3_S", "TQ1_0"])
    parser.add_argument("--shape", default="4096x4096")
    parser.add_argument("--tensors", type=int, default=4)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[0, 1, reference_rows.conversion_threads()],
        help="thread counts to run; 0: the conversion before threads (dense: the whole tensor at once)",
    )
    parser.add_argument("--paths", nargs="+", default=["q8", "dense"], choices=["q8", "dense"])
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--sittings", type=int, default=2)
    args = parser.parse_args()
    rows, cols = (int(size) for size in args.shape.split("x"))
    dtype = DTYPES[args.dtype]
    rng = np.random.default_rng(0)
    print(json.dumps({"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}), flush=True)
    for type_name in args.types:
        tensors = [random_tensor(type_name, rows, cols, rng) for _ in range(args.tensors)]
        gigabytes = sum(t.data.numel() for t in tensors) / 1e9
        for path in args.paths:

            def convert(tensor: QuantizedTensor, threads: int, path: str = path) -> CodeBlocks | torch.Tensor:
                if threads == 0:
                    return before(tensor, path, dtype)
                if path == "q8":
                    return reference_rows.q8_code_blocks(tensor, threads)
                return reference_rows.dequantize(tensor, dtype, threads)

            convert(tensors[0], 1)  # warm-up: the gguf package builds its grids, pages get touched
            seconds: dict[int, list[float]] = {n: [] for n in args.threads}
            cpu: dict[int, float] = dict.fromkeys(args.threads, 0.0)
            loads: list[float] = []
            for _ in range(args.sittings):
                prints: dict[int, list[bytes]] = {}
                for threads in args.threads:
                    start, start_cpu = time.perf_counter(), time.process_time()
                    results = [convert(tensor, threads) for tensor in tensors]
                    seconds[threads].append(round(time.perf_counter() - start, 2))
                    cpu[threads] += time.process_time() - start_cpu
                    prints[threads] = [fingerprint(result) for result in results]
                    del results
                    loads.append(os.getloadavg()[0])
                if len({tuple(each) for each in prints.values()}) != 1:
                    raise SystemExit(f"{type_name} {path}: the thread counts disagree")
            for threads in args.threads:
                line = {
                    "type": type_name,
                    "path": path if path == "q8" else f"dense {args.dtype}",
                    "shape": args.shape,
                    "tensors": args.tensors,
                    "gb_of_blocks": round(gigabytes, 4),
                    "threads": threads or "before",
                    "seconds": seconds[threads],
                    "s_per_gb": round(min(seconds[threads]) / gigabytes, 1),
                    "cpu_over_wall": round(cpu[threads] / sum(seconds[threads]), 2),
                    "load_average": round(max(loads), 1),
                }
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
