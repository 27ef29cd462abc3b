#!/usr/bin/env bash
# The mixed-family evidence of docs/results.md (#23), in stages (STAGES, default "teachers cache compare"), for
# CONFIG (default configs/sst2-mixed.yaml; configs/cola-mixed.yaml for CoLA):
#   teachers  fine-tune the ensemble of CONFIG (MPNet-base at 12/8/6 layers and MiniLM 6 for SST-2; `make mpnet`
#             first), TEACHER_STEPS (default 120) steps of 32 each, one dev evaluation at the end;
#   cache     cache its knowledge once (soft labels, and whatever --set distill.knowledge.outputs=... asks);
#   tune      the recipe search: `skd tune` with the config's tune: section, TUNE_STRATEGY (default
#             single:mpnet-l12) on HOLDOUT (default 2000) training rows held back from training, never dev;
#   compare   train the 6-layer MiniLM student with every method x 3 seeds from the cache, in two `skd compare`
#             streams side by side (a student worker uses one core: two streams fill a 2-core machine), seed
#             by seed so that a stopped campaign still leaves whole seeds, with RECIPE's --set items (the
#             recipe the tune stage chose), then print the paired table (bench/paired_table.py).
#   [CONFIG=...] [STAGES="..."] [TEACHER_STEPS=N] [STREAM_A="variant ..."] [STREAM_B="variant ..."] [RECIPE="k=v ..."] \
#   [SEEDS="0 1 2"] \
#       bash bench/mixed_evidence.sh OUT_DIR [--set k=v ...]          (--set overrides go to every stage)
# e.g. bash bench/mixed_evidence.sh runs/sst2-mixed
#      (SEEDS and the STREAMs finish a stopped comparison: the table reads only FINISHED runs)
#      STAGES="cache tune" bash bench/mixed_evidence.sh runs/sst2-mixed --set 'distill.knowledge.outputs=[hidden,cls]'
set -euo pipefail
out=$(realpath -m "${1:?usage: bash bench/mixed_evidence.sh OUT_DIR [--set ...]}"); shift
skd=${SKD:-skd}
cfg=${CONFIG:-configs/sst2-mixed.yaml}
steps=${TEACHER_STEPS:-120}
stages=" ${STAGES:-teachers cache compare} "
mkdir -p "$out/b"
common=(-c "$cfg" --set "output_dir=$out" --set "mlflow.tracking_uri=sqlite:///$out/mlflow.db" "$@")
if [[ $stages == *" teachers "* ]]; then
    echo "[evidence] teachers $(date -u +%T)"
    # a 12-layer MPNet step of 32 is about 4 to 8 s on 2 cores
    $skd teachers prepare "${common[@]}" --set "teachers.finetune.max_steps=$steps" --set "distill.eval_every=$steps"
fi
if [[ $stages == *" cache "* ]]; then
    echo "[evidence] cache $(date -u +%T)"
    # resumes an interrupted build and reuses a finished one
    $skd cache build "${common[@]}" --out "$out/cache"
fi
if [[ $stages == *" tune "* ]]; then
    echo "[evidence] tune $(date -u +%T)"
    $skd tune "${common[@]}" --set "distill.knowledge.source=cache:$out/cache" \
        --set "distill.strategy=${TUNE_STRATEGY:-single:mpnet-l12}" --set "data.holdout=${HOLDOUT:-2000}" \
        --set mlflow.run_name=recipe
fi
[[ $stages == *" compare "* ]] || exit 0

recipe=()
for kv in ${RECIPE:-}; do recipe+=(--set "$kv"); done
# stream DIR VARIANT...: one compare per seed into DIR (its own MLflow store: two writers can lock SQLite)
stream() {
    local dir=$1; shift
    local variants=()
    for v in "$@"; do variants+=(--variant "$v"); done
    for seed in ${SEEDS:-0 1 2}; do
        $skd compare -c "$cfg" --set "output_dir=$dir" --set "mlflow.tracking_uri=sqlite:///$dir/mlflow.db" \
            --set "teachers.manifest=$out/teachers/manifest.json" --set "distill.knowledge.source=cache:$out/cache" \
            "${extra[@]}" ${recipe[@]+"${recipe[@]}"} "${variants[@]}" --seed "$seed"
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
