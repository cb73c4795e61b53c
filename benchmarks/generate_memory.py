"""`finetune generate` on a model larger than its budget: the peak RSS of the generating process.

    python benchmarks/generate_memory.py            # memory_bound.py's model (277M params, 1.03 GiB fp32), 1 GiB
    python benchmarks/generate_memory.py --quick    # a small model, for a sanity run

The model is memory_bound.py's Llama (19 layers, hidden 1024, tied, fp32 safetensors: its weights alone are above
the budget), with a small BPE tokenizer (examples/finetune_stdlib.py) beside it. `finetune generate --memory`
runs as a subprocess, as a user runs it; its own ru_maxrss (the JSON's peak_rss) must stay within the budget +
`--slack` GiB (the interpreter, torch, transformers: memory_bound.py's allowance).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import GiB, fmt_bytes  # noqa: E402

FINETUNE = str(Path(sys.executable).with_name("finetune"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 4-layer hidden-256 model (20 MiB) at a 16 MB budget")
    parser.add_argument("--memory", default="1GB", help="finetune generate --memory")
    parser.add_argument("--slack", type=float, default=0.8, help="allowed peak RSS above the budget, GiB")
    parser.add_argument("--layers", type=int, default=19)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--workdir", default="/tmp")
    parser.add_argument("--name", default=None, help="results file benchmarks/results/<name>.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.memory, args.layers, args.new_tokens = "16MB", 4, 8
    return args


def build(args: argparse.Namespace, directory: Path) -> tuple[int, int]:
    """The model and its tokenizer in `directory`; returns (parameters, weight bytes)."""
    example = _example()
    hidden, intermediate, heads, vocab = (256, 704, 4, 8000) if args.quick else (1024, 2816, 16, 32000)
    config = common.llama_config(hidden=hidden, intermediate=intermediate, layers=args.layers, heads=heads,
                                 vocab=vocab, tie=True)
    params = common.save_random_model(config, directory, seed=0)
    example.train_tokenizer([Path(shutil.__file__).read_text()], directory, vocab_size=2000)
    return params, sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def _example() -> object:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "finetune_stdlib.py"
    spec = importlib.util.spec_from_file_location("finetune_stdlib", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from finetune.offload import parse_size

    common.quiet_transformers()
    workdir = Path(tempfile.mkdtemp(prefix="generate_memory-", dir=args.workdir))
    try:
        model = workdir / "model"
        params, weight_bytes = build(args, model)
        command = [FINETUNE, "generate", str(model), "--prompt", "def main():", "--max-new-tokens",
                   str(args.new_tokens), "--memory", args.memory, "--json"]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            print(completed.stderr, file=sys.stderr)
            return completed.returncode
        result = json.loads(completed.stdout)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    budget = parse_size(args.memory)
    limit = budget + int(args.slack * GiB)
    passed = result["peak_rss"] <= limit
    rows = [
        ["model", f"Llama {args.layers} layers, {params / 1e6:.1f}M params, fp32 weights {fmt_bytes(weight_bytes)}"],
        ["--memory (device + host)", fmt_bytes(budget)],
        ["weights / budget", f"{weight_bytes / budget:.2f}x"],
        ["new tokens", f"{result['new_tokens']} in {result['seconds']:.1f} s ({result['tokens_per_s']:.2f}/s)"],
        ["engine peak device / host", f"{fmt_bytes(result['peak_device'])} / {fmt_bytes(result['peak_host'])}"],
        ["read from the model's files", fmt_bytes(result["nvme_read"])],
        ["peak RSS (ru_maxrss of finetune generate)", fmt_bytes(result["peak_rss"])],
        ["limit (budget + slack)", f"{fmt_bytes(limit)} (slack {args.slack:g} GiB)"],
    ]
    print(common.table(["quantity", "value"], rows))
    print(f"{'PASS' if passed else 'FAIL'}: peak RSS {fmt_bytes(result['peak_rss'])} <= {fmt_bytes(limit)}")
    payload = {"benchmark": "generate_memory", "quick": args.quick, "settings": vars(args), "params": params,
               "weight_bytes": weight_bytes, "budget_bytes": budget, "limit_bytes": limit, "passed": passed,
               "hardware": common.hardware(), **{k: v for k, v in result.items() if k != "text"}}
    common.write_results(args.name or ("generate_memory_quick" if args.quick else "generate_memory"), payload)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
