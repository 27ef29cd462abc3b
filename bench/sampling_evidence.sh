#!/usr/bin/env bash
# The sampling-distribution evidence of docs/results.md (#13): on one GLUE task, fine-tune the offline
# ensemble (MiniLM 6/4/3 layers), cache its soft labels once, and run the 7 methods x 3 seeds with
# `skd compare` (paired differences from no-kd; bench/paired_table.py recomputes them against any baseline).
#   bash bench/sampling_evidence.sh TASK OUT_DIR EPOCHS [extra --set overrides for prepare, cache and compare]
# e.g. bash bench/sampling_evidence.sh sst2 runs/evidence/sst2 2
set -euo pipefail
task=$1; out=$(realpath -m "$2"); epochs=$3; shift 3
skd=${SKD:-skd}
mkdir -p "$out"
common=(-c "configs/$task.yaml" --set "output_dir=$out" --set "mlflow.tracking_uri=sqlite:///$out/mlflow.db" "$@")
echo "[evidence] $task: teachers $(date -u +%T)"
$skd teachers prepare "${common[@]}"
best=$(python3 -c "import json,sys; t=json.load(open(sys.argv[1]))['teachers']; print(max(t, key=lambda m: m['dev_metric'])['name'])" "$out/teachers/manifest.json")
echo "[evidence] $task: cache $(date -u +%T)"
$skd cache build "${common[@]}" --out "$out/cache"
echo "[evidence] $task: compare (best teacher $best) $(date -u +%T)"
$skd compare "${common[@]}" --set "distill.knowledge.source=cache:$out/cache" --set "distill.epochs=$epochs" \
    --variant no-kd --variant "single:$best" --variant average --variant skd:uniform --variant skd:teacher-rank \
    --variant skd:student-rank --variant skd:adaptive --seed 0 --seed 1 --seed 2 --baseline no-kd
echo "[evidence] $task: done $(date -u +%T)"
