#!/usr/bin/env bash
# One prepared GPU run (time limits add up to 10.0 minutes, plus 3.0 for the vLLM part where vLLM's venv exists; one
# H200): the `gpu`-marked tests, SAM ViT-H batching with random weights
# (same compute as the release), per-stage throughput of the paper-scale models (random weights), and the bf16
# training step time / MFU of a CLIP ViT-B/16, and region captions job by job vs from the shared image prefix
# (Hugging Face path, then the vLLM engine run by $PYTHON_VLLM). Every figure goes to $OUT (default benchmarks/out/gpu_suite):
# one log per part and summary.txt. Run from the repository root:  benchmarks/gpu_suite.sh
# Without CUDA it stops at once with exit code 2 (nothing here means anything on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
PYTHON_VLLM="${PYTHON_VLLM:-/opt/vllm-venv/bin/python}"  # vLLM's own venv (docker/Dockerfile.cuda, stage vllm-env)
OUT="${OUT:-benchmarks/out/gpu_suite}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"

if ! "$PYTHON" - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"error: benchmarks/gpu_suite.sh needs a CUDA GPU; torch {torch.__version__} "
             f"(CUDA build {torch.version.cuda}) sees none")
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
then
    exit 2
fi
"$PYTHON" -c "import torch; print('GPU:', torch.cuda.get_device_name(0))" > "$SUMMARY"

status=0
part() {  # part NAME SECONDS COMMAND...: run with a time limit, log, keep the last lines for the summary
    local name="$1" limit="$2"; shift 2
    local started=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    [ $rc -ne 0 ] && status=1
    { echo "== $name: exit $rc, $((SECONDS - started)) s"; tail -n 8 "$OUT/$name.log"; echo; } | tee -a "$SUMMARY"
}

part gpu_tests 90 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests

# SAM ViT-H: a random-weight checkpoint through the real loading path (weights_only), then batched vs looped.
SAM_CKPT="$OUT/sam_vit_h_random.pth"
part sam_random_weights 75 "$PYTHON" -c "
import torch
from segment_anything import sam_model_registry
torch.manual_seed(0)
torch.save(sam_model_registry['vit_h']().state_dict(), '$SAM_CKPT')
print('random SAM ViT-H state dict written')"
part sam_batching 60 "$PYTHON" benchmarks/sam_batching.py --model-type vit_h --checkpoint "$SAM_CKPT" \
    --device cuda --dtype bfloat16 --boxes 50 --width 1500 --height 1000
part sam_encoder_batching 60 "$PYTHON" benchmarks/sam_batching.py --model-type vit_h --checkpoint "$SAM_CKPT" \
    --device cuda --dtype bfloat16 --boxes 10 --width 1500 --height 1000 --encoder-images 8
rm -f "$SAM_CKPT"

part stage_throughput 170 "$PYTHON" benchmarks/stage_throughput.py --device cuda --dtype bfloat16 \
    --json "$OUT/stage_throughput.json" --costs-out "$OUT/costs.json"
# then: umg plan-resources --config configs/umg41m.yaml --gpus 8 --cpus-per-node 88 --costs "$OUT/costs.json"
part train_step_mfu 60 "$PYTHON" benchmarks/train_step_mfu.py --device cuda --batch 256 --steps 10
# Region captions, LLaVA-1.5-7B shape (random weights, built in memory): job by job vs the shared image prefix.
part region_captions 85 "$PYTHON" benchmarks/region_captions.py --paper-scale --device cuda --dtype bfloat16 \
    --images 2 --boxes 20 --prompts 5 --batch-size 32 --repeats 2
# The same at 20 boxes x 5 prompts: HF job by job vs the vLLM engine (prefix caching, all jobs in one generate), in
# vLLM's venv; vLLM gets the model's config with dummy weights. Skipped (not failed) where that venv is absent.
if "$PYTHON_VLLM" -c "import vllm" > /dev/null 2>&1; then
    part region_captions_vllm 180 "$PYTHON_VLLM" benchmarks/region_captions.py --engine vllm --paper-scale \
        --device cuda --dtype bfloat16 --images 2 --boxes 20 --prompts 5 --batch-size 32 --repeats 2
else
    echo "== region_captions_vllm: skipped, $PYTHON_VLLM cannot import vllm (vLLM runs in its own venv:" \
        "docker/Dockerfile.cuda stage vllm-env; or set PYTHON_VLLM)" | tee -a "$SUMMARY"
fi

echo "summary: $SUMMARY"
exit $status
