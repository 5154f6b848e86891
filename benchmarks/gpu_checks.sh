#!/usr/bin/env bash
# Every GPU check of the project in one command, on one CUDA GPU, about ten minutes:
#   1. benchmarks/gpu.py on the model the 1b recipe trains (gated deltanet from layer 1), eager:
#      training tokens/s, MFU and the memory's overhead, 32K vs 1M-token prefill, SDPA vs
#      flash-attn, memory precision in bf16;
#   2. the same training step with the blocks compiled (train.compile);
#   3. tests/test_cuda.py: float32 equal to the CPU, chunk invariance in bf16, compiled = eager;
#   4. `pretrain --recipe 1b` under ZeRO-3 on this one GPU, on the bundled books and tokenizer:
#      5 steps, a checkpoint, `--resume auto` to step 10, `export hf`, and the export generating.
#
#   bash benchmarks/gpu_checks.sh [LOG_DIR [GROUP ...]]   # from the repository root
#
# LOG_DIR defaults to gpu-checks; GROUPs pick some of the checks: benchmark (1, 2), tests (3),
# zero3 (4); all of them by default. About 5 minutes for benchmark + tests, 5 for zero3: split
# them where one command has a time limit.
#
# Each step has its own time limit and a failing step does not stop the others; LOG_DIR keeps each
# step's log and the benchmark's JSON. Needs the project's dependencies importable (an installed
# package, or PYTHONPATH=. with them installed) and about 40 GB of free disk for the ZeRO-3
# checkpoints (RUN_DIR, default /tmp/infinitrain-gpu-checks).
set -u
LOG_DIR=${1:-gpu-checks}
GROUPS_WANTED=" ${*:2} "
[ "$GROUPS_WANTED" = "  " ] && GROUPS_WANTED=" benchmark tests zero3 "
for group in $GROUPS_WANTED; do
    case $group in benchmark|tests|zero3) ;; *)
        echo "unknown group '$group': choose from benchmark, tests, zero3" >&2; exit 2;;
    esac
done
wanted() { [[ $GROUPS_WANTED == *" $1 "* ]]; }
RUN_DIR=${RUN_DIR:-/tmp/infinitrain-gpu-checks}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$LOG_DIR"
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to LOG_DIR/NAME.log
    local name=$1 seconds=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S), at most ${seconds} s)"
    timeout "$seconds" "$@" > "$LOG_DIR/$name.log" 2>&1
    local code=$?
    grep -v "Warning\|return func\|warnings.warn" "$LOG_DIR/$name.log" | tail -n 25
    if [ "$code" -ne 0 ]; then
        echo "== $name FAILED (exit $code)"
        failed=1
    fi
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
} | tee "$LOG_DIR/device.txt"

if wanted benchmark; then
    step gpu-1b 180 "$PYTHON" benchmarks/gpu.py --recipe recipes/1b.yaml --json "$LOG_DIR/gpu-1b.json"
    step gpu-1b-compiled 240 "$PYTHON" benchmarks/gpu.py --recipe recipes/1b.yaml --sections training \
        --compile --json "$LOG_DIR/gpu-1b-compiled.json"
fi
wanted tests && step cuda-tests 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py
wanted zero3 || exit $failed

SMALL_DATA=(--set data.tokenizer=data/tokenizer
            --set "data.sources=[{files: [data/books/austen.jsonl.gz, data/books/kjv.jsonl.gz]}]"
            --set train.max_steps=10 --set optim.warmup_steps=3 --set checkpoint.every_steps=5
            --set checkpoint.keep_last=1 --set logging.every_steps=1)
rm -rf "$RUN_DIR"
step zero3-first-5-steps 200 "$PYTHON" -m infinitrain pretrain --recipe recipes/1b.yaml --devices 1 \
    --out-dir "$RUN_DIR/run" --max-steps 5 "${SMALL_DATA[@]}"
step zero3-resume-to-10 200 "$PYTHON" -m infinitrain pretrain --recipe recipes/1b.yaml --devices 1 \
    --out-dir "$RUN_DIR/run" --resume auto "${SMALL_DATA[@]}"
step export-hf 120 "$PYTHON" -m infinitrain export hf "$RUN_DIR/run" "$RUN_DIR/hf"
step export-generates 90 "$PYTHON" -c "
import torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(
    '$RUN_DIR/hf', trust_remote_code=True, dtype=torch.bfloat16).cuda()
ids = torch.tensor([[1, 2, 3, 4]], device='cuda')
print('export generates', model.generate(ids, max_new_tokens=8, do_sample=False).tolist())"
rm -rf "$RUN_DIR"
exit $failed
