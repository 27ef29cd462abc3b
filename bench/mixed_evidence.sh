#!/usr/bin/env bash
# The mixed-family evidence of docs/results.md (#23): fine-tune the ensemble of configs/sst2-mixed.yaml
# (MPNet-base at 12/8/6 layers and MiniLM 6; `make mpnet` first), cache its soft labels once, then train the
# 6-layer MiniLM student with every method x 3 seeds from the cache, in two `skd compare` streams side by
# side (a student worker uses one core: two streams fill a 2-core machine), seed by seed so that a stopped
# campaign still leaves whole seeds, and print the paired table (bench/paired_table.py).
#   [STREAM_A="variant ..."] [STREAM_B="variant ..."] bash bench/mixed_evidence.sh OUT_DIR [--set k=v ...]
# e.g. bash bench/mixed_evidence.sh runs/sst2-mixed      (--set overrides go to every command)
set -euo pipefail
out=$(realpath -m "${1:?usage: bash bench/mixed_evidence.sh OUT_DIR [--set ...]}"); shift
skd=${SKD:-skd}
cfg=configs/sst2-mixed.yaml
mkdir -p "$out/b"
common=(-c "$cfg" --set "output_dir=$out" --set "mlflow.tracking_uri=sqlite:///$out/mlflow.db" "$@")
echo "[evidence] teachers $(date -u +%T)"
# 120 steps of 32 per teacher (a 12-layer MPNet step is about 4 s on 2 cores), one dev evaluation at the end
$skd teachers prepare "${common[@]}" --set teachers.finetune.max_steps=120 --set distill.eval_every=120
# resumes an interrupted build and reuses a finished one
echo "[evidence] cache $(date -u +%T)"
$skd cache build "${common[@]}" --out "$out/cache"

# stream DIR VARIANT...: one compare per seed into DIR (its own MLflow store: two writers can lock SQLite)
stream() {
    local dir=$1; shift
    local variants=()
    for v in "$@"; do variants+=(--variant "$v"); done
    for seed in 0 1 2; do
        $skd compare -c "$cfg" --set "output_dir=$dir" --set "mlflow.tracking_uri=sqlite:///$dir/mlflow.db" \
            --set "teachers.manifest=$out/teachers/manifest.json" --set "distill.knowledge.source=cache:$out/cache" \
            "${extra[@]}" "${variants[@]}" --seed "$seed"
    done
}
extra=("${@}")
echo "[evidence] compare $(date -u +%T)"
# the two streams' variants (each about 6 min per run on one core for the 6-layer student at 1 epoch)
STREAM_A=${STREAM_A:-no-kd single:mpnet-l12 single:mpnet-l6 single:minilm-l6 average}
STREAM_B=${STREAM_B:-skd:uniform skd:teacher-rank skd:capacity-gaussian skd:adaptive single:mpnet-l8}
# shellcheck disable=SC2086
stream "$out" $STREAM_A > "$out/stream-a.log" 2>&1 &
a=$!
# shellcheck disable=SC2086
stream "$out/b" $STREAM_B > "$out/stream-b.log" 2>&1 &
b=$!
wait $a $b
echo "[evidence] done $(date -u +%T)"
${PYTHON:-python} bench/paired_table.py -c "$cfg" --out "$out" --out "$out/b" --baseline no-kd --baseline single-mpnet-l12
