"""Tokenize once: `finetune run`'s tokenization with a cold and a warm token cache, on a ~50 MB text corpus.

    python benchmarks/tokenize_cache.py                 # ~50 MB corpus, --pack --seq-len 1024 (a few minutes)
    python benchmarks/tokenize_cache.py --megabytes 5   # a quick sanity run

Issue 14's measure: the second run of the same command spends < 10% of the first run's tokenization time. The
corpus is built from files every machine has: the Python standard library's sources (under the running
interpreter's lib directory), then man pages and license texts, one JSON line {"text": ...} per file, until it
holds --megabytes. The tokenizer is a byte-level BPE (examples/finetune_stdlib.py's) trained on the corpus's first
megabytes once, kept in --workdir. Each run is its own fresh process, as a rerun or a --resume is: (cold) an empty
token cache, then (warm) the cache the cold run filled. Both go through the code path of `finetune run`
(cli/train.py): `load_rows`, `detect_format`, then `TokenCache.sequences` over `tokenize_rows`. Rows are loaded
by `datasets` (whose own cache of the JSON file as Arrow is warm in both: the corpus is loaded once before), and
timed apart from the tokenization. Each child also reads every sequence once (what training does over an epoch),
with its peak RSS.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

MiB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=50.0, help="corpus size (UTF-8 text)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--no-pack", dest="pack", action="store_false", help="one document per sequence (cut)")
    parser.add_argument("--vocab", type=int, default=8192, help="the BPE tokenizer's vocabulary")
    parser.add_argument("--workdir", default="/tmp/finetune-bench/tokenize_cache", help="corpus, tokenizer, caches")
    parser.add_argument("--name", default="tokenize_cache", help="results file benchmarks/results/<name>.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ the corpus


def _texts() -> Any:
    """Text files every machine has: the standard library's sources, man pages, license texts."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        yield path
    for root in (Path("/usr/share/man"), Path("/usr/share/common-licenses"), Path("/usr/share/doc")):
        if root.exists():
            yield from sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _read(path: Path) -> str | None:
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None
    return text if text.strip() else None


def build_corpus(path: Path, megabytes: float) -> dict[str, Any]:
    """Write the corpus as JSON lines; returns its size, documents and where they came from."""
    target, written, documents, sources = int(megabytes * MiB), 0, 0, {}
    with path.open("w", encoding="utf-8") as out:
        for file in _texts():
            text = _read(file)
            if text is None:
                continue
            out.write(json.dumps({"text": text}) + "\n")
            written += len(text.encode())
            documents += 1
            kind = "stdlib" if file.suffix == ".py" else file.parts[3] if len(file.parts) > 3 else "other"
            sources[kind] = sources.get(kind, 0) + 1
            if written >= target:
                break
    return {"bytes": written, "documents": documents, "sources": sources}


def train_tokenizer(corpus: Path, directory: Path, vocab: int) -> None:
    """examples/finetune_stdlib.py's byte-level BPE, trained on the corpus's first 4 MB."""
    sys.path.insert(0, str(common.ROOT / "examples"))
    import finetune_stdlib

    texts, size = [], 0
    with corpus.open(encoding="utf-8") as lines:
        for line in lines:
            texts.append(json.loads(line)["text"])
            size += len(texts[-1])
            if size > 4 * MiB:
                break
    finetune_stdlib.train_tokenizer(texts, directory, vocab_size=vocab)


# ------------------------------------------------------------------------------------------------ one run


def main_child(spec: dict[str, Any]) -> None:
    """One run's tokenization, as cli/train.py does it, timed; written to spec["result_path"]."""
    from transformers import AutoTokenizer

    from finetune.cli.config import RunConfig
    from finetune.cli.data import detect_format, load_rows, tokenize_rows
    from finetune.cli.sequences import BYTES_PER_PROCESS
    from finetune.cli.token_cache import TokenCache

    common.quiet_transformers()
    sampler = common.RssSampler().__enter__()
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    config = RunConfig(model=spec["tokenizer"], dataset=spec["corpus"], seq_len=spec["seq_len"], pack=spec["pack"])
    built: list[float] = []

    started = time.perf_counter()
    rows = load_rows(config.dataset)
    fmt = detect_format(rows.column_names, config.format, config.dataset)
    loaded = time.perf_counter()
    if spec.get("load_only"):
        Path(spec["result_path"]).write_text(json.dumps({"load_rows_s": loaded - started}))
        return

    def build(directory: Path | None) -> Any:
        start = time.perf_counter()
        sequences = tokenize_rows(rows, fmt, tokenizer, seq_len=config.seq_len, pack=config.pack,
                                  train_on_prompt=False, source=config.dataset, directory=directory)
        built.append(time.perf_counter() - start)
        return sequences

    sequences = TokenCache(Path(spec["cache"]), config, tokenizer).sequences("train", config.dataset, fmt.value,
                                                                             rows, build)
    tokenized = time.perf_counter()
    tokens = sum(len(sequences.arrays(i)[0]) for i in range(len(sequences)))  # an epoch's reads
    read = time.perf_counter()
    sampler.__exit__()
    Path(spec["result_path"]).write_text(json.dumps({
        "load_rows_s": loaded - started, "tokenize_s": tokenized - loaded, "read_all_s": read - tokenized,
        "tokenized": bool(built), "sequences": len(sequences), "tokens": tokens, "rows": len(rows),
        "fingerprint": sequences.fingerprint(), "peak_rss_bytes": sampler.peak,
        "processes": min(os.cpu_count() or 1, max(1, rows.data.nbytes // BYTES_PER_PROCESS)),
    }))


# ------------------------------------------------------------------------------------------------ the benchmark


def main_parent(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer = workdir / f"corpus-{args.megabytes:g}MB.jsonl", workdir / f"tokenizer-{args.vocab}"
    described_path = corpus.with_suffix(".json")
    if not corpus.exists() or not described_path.exists():
        described_path.write_text(json.dumps(build_corpus(corpus, args.megabytes)))
    described = json.loads(described_path.read_text())
    if not tokenizer.exists():
        train_tokenizer(corpus, tokenizer, args.vocab)
    cache = workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "HF_DATASETS_CACHE": str(workdir / "datasets")}
    spec = {"corpus": str(corpus), "tokenizer": str(tokenizer), "cache": str(cache), "seq_len": args.seq_len,
            "pack": args.pack}
    # `datasets` converts the JSON file to Arrow once, into its own cache: done here, so both runs load alike.
    common.run_child(__file__, {**spec, "load_only": True, "result_path": str(workdir / "load.json")}, env)
    runs = {name: common.run_child(__file__, {**spec, "result_path": str(workdir / f"{name}.json")}, env)
            for name in ("cold", "warm")}
    cold, warm = runs["cold"], runs["warm"]
    assert cold["tokenized"] and not warm["tokenized"], "the warm run must read the cache"
    assert cold["fingerprint"] == warm["fingerprint"], "the warm run must see the same sequences"
    ratio = warm["tokenize_s"] / cold["tokenize_s"]
    entry_bytes = sum(p.stat().st_size for p in (cache / "tokens").rglob("*") if p.is_file())
    rows = [[name, f"{run['load_rows_s']:.2f}", f"{run['tokenize_s']:.3f}", f"{run['read_all_s']:.2f}",
             f"{run['tokens'] / run['tokenize_s'] / 1e6:.2f}" if run["tokenized"] else "-",
             common.fmt_bytes(run["peak_rss_bytes"])]
            for name, run in runs.items()]
    print(f"corpus: {described['bytes'] / MiB:.1f} MiB of text, {described['documents']} documents "
          f"({', '.join(f'{k}: {v}' for k, v in described['sources'].items())}); {cold['tokens']} tokens in "
          f"{cold['sequences']} sequences of <= {args.seq_len} ({'packed' if args.pack else 'cut'}); BPE vocabulary "
          f"{args.vocab}; cache entry {common.fmt_bytes(entry_bytes)}")
    print(common.table(["run", "load rows (s)", "tokenize (s)", "read every sequence (s)", "Mtokens/s tokenized",
                        "peak RSS"],
                       rows))
    print(f"warm / cold tokenization time: {ratio:.4f} ({ratio * 100:.2f}%; goal < 10%)")
    hardware = common.hardware()
    print(common.hardware_line(hardware))
    common.write_results(args.name, {
        "benchmark": "tokenize_cache", "args": vars(args), "corpus": described, "cold": cold, "warm": warm,
        "warm_over_cold": ratio, "cache_entry_bytes": entry_bytes, "hardware": hardware,
        "cli_digest": _cli_digest(),
    })


def _cli_digest() -> str:
    """sha256 (12 hex digits) of the cli modules that tokenize and cache (common.source_digest covers the engine)."""
    import hashlib

    digest = hashlib.sha256()
    for name in ("data.py", "sources.py", "sequences.py", "token_cache.py"):
        digest.update((common.ROOT / "cli" / name).read_bytes())
    return digest.hexdigest()[:12]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.child_or_parent(args, main_child, main_parent)


if __name__ == "__main__":
    main()
