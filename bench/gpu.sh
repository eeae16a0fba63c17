#!/usr/bin/env bash
# One short GPU benchmark for a single H100/H200 (under 8 minutes): the official Phi-3.5-vision
# shape with random weights (meta-initialised on the GPU, nothing downloaded), bf16, the four
# methods on DocVQA-shaped samples (16 crops, ~2443 tokens), with sdpa and, when the flash-attn
# package is installed, flash-attention 2. Prints the tables; writes bench-gpu-*.json here.
#
# Installs nothing but what pip can: phivision and its dependencies, keeping a preinstalled torch.
# Usage: bash bench/gpu.sh    (STEPS=N: timed steps per method; PYTHON=...: another interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-6}
BUDGET=${BUDGET:-460}  # seconds for both runs together

if ! "$PYTHON" -c "import phivision.cli.bench, peft, bitsandbytes" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet -e ".[qlora]" || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "phivision commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

# Batch 1 per step, as the official recipe runs per GPU. Full fine-tuning keeps fp32 weights,
# gradients and AdamW states (16 bytes per parameter, ~66 GB): it fits an H200 but not an 80 GB
# H100, where its row says "failed" (out of memory) and the other methods still run.
COMMON=(--preset official --workload docvqa --precision bf16 --batch-size 1 --warmup 2 --steps "$STEPS")

timeout 300 "$PYTHON" -m phivision.cli.main bench "${COMMON[@]}" --method all --attn sdpa \
    --output bench-gpu-sdpa.json || echo "the sdpa run ended with status $?"

if "$PYTHON" -c "import flash_attn" 2>/dev/null; then
    left=$((BUDGET - SECONDS))
    if [ "$left" -gt 60 ]; then
        # results are written after every method, so a run cut short keeps the methods it finished
        timeout "$left" "$PYTHON" -m phivision.cli.main bench "${COMMON[@]}" --method all \
            --attn flash_attention_2 --output bench-gpu-flash.json || echo "the flash-attention run ended with status $?"
    else
        echo "no time left for the flash-attention run"
    fi
else
    echo "flash-attn is not installed: the flash-attention run is skipped (pip install 'phivision[flash]')"
fi
