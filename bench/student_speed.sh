#!/usr/bin/env bash
# The size-and-speed table of docs/results.md (#24): export every model given (ONNX fp32 + int8, verified on
# the task's dev set), then measure them side by side with `skd benchmark` (PyTorch fp32, ONNX Runtime fp32
# and int8; one thread each), writing JSON lines and the table.
#   bash bench/student_speed.sh CONFIG OUT.jsonl MODEL_DIR... [-- extra skd benchmark options]
# e.g. bash bench/student_speed.sh configs/sst2-mixed.yaml runs/speed.jsonl runs/sst2-mixed/students/no-kd-s0 \
#          runs/sst2-mixed/teachers/mpnet-l12
set -euo pipefail
cfg=$1; out=$2; shift 2
skd=${SKD:-skd}
models=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do models+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
for m in "${models[@]}"; do
    [ -f "$m/onnx/model.int8.onnx" ] || $skd export "$m" -c "$cfg" --int8
done
$skd benchmark "${models[@]}" -c "$cfg" --threads 1 --json "$out" "$@"
