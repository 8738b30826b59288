#!/usr/bin/env bash
# CPU tables of docs/performance.md, "Dense resolutions and peers": transnext against ConvNeXt-T and
# Swin-T (timm, built untrained) through the same protocol, each case in its own fresh process,
# fp32, 2 threads. Every command writes JSON + PNG into docs/benchmarks/ and its Markdown tables
# into a .md file beside them.
#
# Long: the 800x1344 and 1024 px cases take minutes per iteration on a 2-core machine; run it on
# an otherwise idle machine. `--rounds 3` (fastest of three interleaved rounds) steadies the times
# on a busy one. Run from the repository root:  bash benchmarks/cpu_dense.sh [extra flags for every command]
# ONLY="cpu_dense_512_train cpu_224_b8_compile" runs only the named tables.
set -euo pipefail

TRANSNEXT=${TRANSNEXT:-transnext}
OUT=${OUT:-docs/benchmarks}
PEERS=(convnext_tiny swin_tiny_patch4_window7_224)
COMMON=(--threads 2 --markdown "$@")
mkdir -p "$OUT"

bench() {  # bench NAME ARGS...: one invocation, outputs named after NAME
    local name=$1
    shift
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
        return 0
    fi
    echo "== $name" >&2
    "$TRANSNEXT" benchmark "$@" "${COMMON[@]}" --output "$OUT/$name.json" --plot "$OUT/$name.png" | tee "$OUT/$name.md"
}

# 1. Backbone inference at 800x1344, batch 1, Mask R-CNN settings (bias interpolated from an 800 grid).
#    The reference backend is left out (tens of GB at this size); add `--backends reference torch` to include it.
bench cpu_dense_800x1344_infer \
    --variants transnext_tiny --features --preset mask_rcnn --sizes 800x1344 --batch-sizes 1 --modes infer \
    --backends torch --no-reference --peers "${PEERS[@]}" --warmup 1 --repeats 3

# 2. Backbone training step at 512x512, batch 2, UPerNet settings (512 grid).
bench cpu_dense_512_train \
    --variants transnext_tiny --features --preset upernet --sizes 512 --batch-sizes 2 --modes train \
    --backends torch --no-reference --peers "${PEERS[@]}" --warmup 1 --repeats 3

# 3a. Classification at 224, batch 8, inference and training step, with the reference backend as baseline.
bench cpu_224_b8_peers \
    --variants transnext_tiny --sizes 224 --batch-sizes 8 --modes infer train \
    --peers "${PEERS[@]}" --warmup 2 --repeats 5

# 3b. The same under torch.compile, eager beside it in the same invocation (compile time reported apart).
bench cpu_224_b8_compile \
    --variants transnext_tiny --sizes 224 --batch-sizes 8 --modes infer train \
    --backends torch --no-reference --peers "${PEERS[@]}" --compile --warmup 2 --repeats 5

# 4. Memory curve: transnext_small backbone training step, UPerNet settings, 512 / 768 / 1024 px, batch 1.
bench cpu_dense_small_upernet_memory \
    --variants transnext_small --features --preset upernet --sizes 512 768 1024 --batch-sizes 1 --modes train \
    --backends torch --no-reference --warmup 1 --repeats 2
