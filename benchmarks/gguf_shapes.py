"""GGUF files of a model shape's random checkpoint, for serving benchmarks against llama-server: the
checkpoint serve_cpu.py writes, converted to f32 by llama.cpp's convert_hf_to_gguf.py, then quantized
by its llama-quantize (Q8_0 and Q4_K_M by default).

    python benchmarks/gguf_shapes.py --llama-cpp /path/to/llama.cpp --work-dir /tmp/batchlm-serve-cpu

--llama-cpp is a llama.cpp source tree (e.g. the one vendored in llama-cpp-python's sdist) with
llama-quantize built in build/bin. The padded benchmark tokenizer has no known pre-tokenizer hash,
so the conversion is told it is SmolLM's ("smollm"), the tokenizer it was padded from.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_cpu import build_model

CONVERT = """
import sys
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "smollm"
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", sys.argv[1], "--outtype", "f32", "--outfile", sys.argv[2]]
convert_hf_to_gguf.main()
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--llama-cpp", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/batchlm-serve-cpu"))
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--types", nargs="+", default=["Q8_0", "Q4_K_M"])
    args = parser.parse_args()
    model_dir = build_model(args.work_dir / f"{args.shape}-random", args.shape)
    f32 = args.work_dir / f"{args.shape}-f32.gguf"
    if not f32.exists():
        root = args.llama_cpp.resolve()
        env = {**os.environ, "PYTHONPATH": f"{root / 'gguf-py'}{os.pathsep}{root}"}
        subprocess.run(
            [sys.executable, "-c", CONVERT, str(model_dir), str(f32)], cwd=root, env=env, check=True
        )
    for qtype in args.types:
        out = args.work_dir / f"{args.shape}-{qtype.lower()}.gguf"
        if not out.exists():
            quantize = args.llama_cpp / "build" / "bin" / "llama-quantize"
            subprocess.run([str(quantize), str(f32), str(out), qtype], check=True)
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
