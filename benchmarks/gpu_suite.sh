#!/usr/bin/env bash
# The performance measurements that need a GPU, at the real 7B shape (Vicuna-7B: 32 layers, hidden
# 4096, 32 heads, MLP 11008, vocabulary 32,000; random weights, bfloat16), in one go:
#
#   OUT=gpu-results bash benchmarks/gpu_suite.sh
#
# Writes at most 8 files into $OUT (JSON, markdown, the console log). HIDDEN / HEADS / LAYERS /
# VOCAB / DEVICE / DTYPE / REPEATS override the defaults, e.g. a dry run on the CPU:
#
#   DEVICE=cpu HIDDEN=128 HEADS=2 VOCAB=1000 REPEATS=1 OUT=/tmp/suite bash benchmarks/gpu_suite.sh
#
# SETUP=1 first installs fvlm[plot], offline, into the environment of $PYTHON (default python3),
# for a machine without network whose python already has a CUDA torch: pip keeps every installed
# package that is in fvlm's ranges (torch >= 2.11, transformers >= 5.17, ...) and takes what is
# missing from the wheels in .whl/ (which to carry: docs/benchmarks-performance.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${SETUP:-0}" = 1 ]; then
    "$PY" -m pip install -q --no-index --find-links .whl --no-build-isolation --no-compile ".[plot]"
fi
OUT=${OUT:-gpu-results}
HIDDEN=${HIDDEN:-4096}
HEADS=${HEADS:-32}
LAYERS=${LAYERS:-32}
VOCAB=${VOCAB:-32000}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
REPEATS=${REPEATS:-5}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
model=(--hidden "$HIDDEN" --heads "$HEADS" --vocab "$VOCAB" --device "$DEVICE" --dtype "$DTYPE")
{
    "$PY" -c "import torch, transformers, fvlm; print('torch', torch.__version__, 'transformers', transformers.__version__,
        'fvlm', fvlm.__file__, 'selectors', len(fvlm.list_selectors()))"
    echo "== 1. LLaVA-NeXT shape: 5 x 576 = 2,880 visual tokens, 11.1 % (layer average 320), vs keep-all"
    "$PY" benchmarks/prefill_speedup.py "${model[@]}" --layers "$LAYERS" --images 5 --budgets 320 \
        --selectors pio_fvlm fastv random --no-fastv-compare --generate-tokens 16 --repeats "$REPEATS" \
        --json "$OUT/prefill_2880.json"
    echo "== 2. LLaVA-1.5 shape: 576 visual tokens, every selector at layer averages 192 / 128 / 64"
    "$PY" benchmarks/prefill_speedup.py "${model[@]}" --layers "$LAYERS" --repeats "$REPEATS" \
        --json "$OUT/prefill_576.json" --plot "$OUT/prefill_576.png"
    echo "== 3. PIO-FVLM proxy per stage: rows-only vs full block vs one layer forward (576 and 2,880)"
    "$PY" benchmarks/pio_proxy_cost.py "${model[@]}" --layers 4 --repeats "$REPEATS" --skip-throughput \
        --markdown "$OUT/proxy_cost.md" --json "$OUT/proxy_cost.json"
    echo "== 4. samples/s of greedy generate at batch 8 vs batch 1 (keep-all, FastV, PIO-FVLM)"
    "$PY" benchmarks/pio_proxy_cost.py "${model[@]}" --skip-proxy --tp-hidden "$HIDDEN" --tp-heads "$HEADS" \
        --tp-layers "$LAYERS" --markdown "$OUT/throughput.md" --json "$OUT/throughput.json"
} 2>&1 | tee "$OUT/suite.log"
