#!/usr/bin/env bash
# The one-shot check of the CUDA path, for a session that is lent a GPU for a few minutes (issue 13):
#
#     bash benchmarks/gpu_check.sh          # writes $OUT/gpu_check.json (else benchmarks/results/), prints a table
#
# With CUDA: installs finetune into the machine's Python without touching its torch (offline: --no-deps,
# --no-build-isolation; what is missing there is skipped by the tests, not downloaded), then runs
# tests/offload/test_cuda.py (pinned buffers, the copy stream and events, kvikio where installed, the engine on the
# GPU through NVMe against plain PyTorch on the GPU, bf16 compute, a checkpoint in swap resumed) with the CUDA test
# of tests/offload/test_activations.py (activation offload through pinned memory and NVMe), and short runs of
# stream_overhead.py and lora_stream.py. Each part has its own time limit; the whole stays under 8 minutes.
# Without CUDA it says so, runs the same tests (the CUDA ones skip) and checks that the benchmark scripts compile,
# and exits 0: CI runs that part (tests/benchmarks/test_gpu_check.py).
#
# The exit code is that of the first part that failed (0: all passed). Each part's output is in $OUT/<part>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
: > "$out/gpu_check.parts"
status=0

part() {  # part NAME SECONDS COMMAND...: run it with a time limit, log it, record name, exit code and seconds
    local name=$1 limit=$2 started=$SECONDS code
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    code=$?
    tail -n 3 "$out/$name.log"
    echo "$name $code $((SECONDS - started))" >> "$out/gpu_check.parts"
    if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then status=$code; fi
}

cuda=$("$python" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if ! "$python" -c 'import finetune.offload' 2>/dev/null; then
    part install 120 "$python" -m pip install -q --no-deps --no-build-isolation --no-index -e .
fi
if [ "$cuda" = 1 ]; then
    "$python" -c 'import torch; print("CUDA:", torch.cuda.get_device_name(), "torch", torch.__version__)'
    part cuda_tests 240 "$python" -m pytest -q -p no:cacheprovider tests/offload/test_cuda.py \
        tests/offload/test_activations.py -k cuda
    part stream_overhead 120 "$python" benchmarks/stream_overhead.py --quick --name gpu_stream_overhead_quick
    part lora_stream 120 "$python" benchmarks/lora_stream.py --quick --name gpu_lora_stream_quick
else
    echo "no CUDA on this machine: the CPU part only (the CUDA tests skip; the benchmarks are only compiled)"
    part cuda_tests 120 "$python" -m pytest -q -p no:cacheprovider tests/offload/test_cuda.py \
        tests/offload/test_activations.py -k cuda
    part compile 60 "$python" -m py_compile benchmarks/stream_overhead.py benchmarks/lora_stream.py
fi

"$python" - "$out" "$cuda" <<'EOF'
import json, platform, sys
from pathlib import Path

out, cuda = Path(sys.argv[1]), sys.argv[2] == "1"
parts = []
for line in (out / "gpu_check.parts").read_text().splitlines():
    name, code, seconds = line.split()
    log = (out / f"{name}.log").read_text(errors="replace").strip().splitlines()
    parts.append({"part": name, "exit_code": int(code), "seconds": int(seconds), "last_line": log[-1] if log else ""})
try:
    import torch
    device = torch.cuda.get_device_name() if cuda else None
    versions = {"torch": torch.__version__, "cuda_version": torch.version.cuda}
except Exception as error:  # the report is still written
    device, versions = None, {"error": str(error)}
result = {"benchmark": "gpu_check", "cuda": cuda, "device": device, "python": platform.python_version(),
          **versions, "parts": parts}
(out / "gpu_check.json").write_text(json.dumps(result, indent=1))
width = max(len(p["part"]) for p in parts)
print(f"\n{'part':<{width}}  exit  seconds  last line")
for p in parts:
    print(f"{p['part']:<{width}}  {p['exit_code']:>4}  {p['seconds']:>7}  {p['last_line'][:100]}")
print(f"wrote {out / 'gpu_check.json'}")
EOF
exit "$status"
