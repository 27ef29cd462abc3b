#!/usr/bin/env bash
# The transfer-set evidence of docs/results.md (#23): few labels and much raw in-domain text. The MPNet-base
# teacher of configs/sst2-mixed.yaml (`make mpnet` first) is fine-tuned on the first LABELLED rows of SST-2's
# training split; the next TRANSFER rows, labels dropped, are the transfer set (data.transfer.source: rest),
# taught by the teacher alone. The 6-layer MiniLM student trains for the same STEPS with the same 3 seeds:
#   no-kd            the labelled rows only (no-kd skips transfer rows), STEPS/ (LABELLED/32) epochs;
#   transfer         single:mpnet-l12 on labelled + transfer rows (soft labels only on the transfer rows);
#   same-rows        single:mpnet-l12 on the labelled rows only: is it the rows or the teacher?
# Soft labels come from two caches (labelled + transfer rows; labelled rows). Runs go two at a time (a student uses
# one core), each in its own folder (its own MLflow store), then bench/paired_table.py prints the table.
# The teacher and caches already in OUT_DIR are reused; ARMS picks which arms' students run (default all three).
#   [LABELLED=8000] [TRANSFER=8000] [STEPS=500] [ARMS="no-kd transfer same-rows"] bash bench/transfer_evidence.sh OUT_DIR [--set ...]
set -euo pipefail
out=$(realpath -m "${1:?usage: bash bench/transfer_evidence.sh OUT_DIR [--set ...]}"); shift
skd=${SKD:-skd}
cfg=configs/sst2-mixed.yaml
labelled=${LABELLED:-8000}
transfer=${TRANSFER:-8000}
steps=${STEPS:-500}
arms=" ${ARMS:-no-kd transfer same-rows} "
mkdir -p "$out"
common=(-c "$cfg" --set "output_dir=$out" --set "mlflow.tracking_uri=sqlite:///$out/mlflow.db"
        --set "teachers.members=[{name: mpnet-l12, init: mpnet-base}]"
        --set "data.max_train_samples=$labelled" "$@")
with_transfer=(--set "data.transfer={source: rest, max_rows: $transfer}")
echo "[transfer] teacher $(date -u +%T)"
$skd teachers prepare "${common[@]}" --set teachers.finetune.max_steps=120 --set distill.eval_every=120
echo "[transfer] cache $(date -u +%T)"
$skd cache build "${common[@]}" "${with_transfer[@]}" --out "$out/cache"
# a cache's fingerprint covers its exact training rows: the labelled-only runs read one of their own
$skd cache build "${common[@]}" --out "$out/cache-labelled"

# run NAME SEED VARIANT [--set ...]: one compare of one seed into $out/NAME-sSEED (log beside it)
run() {
    local name=$1 seed=$2 variant=$3; shift 3
    local dir="$out/$name-s$seed" cache="$out/cache-labelled"
    [[ $name == transfer ]] && cache="$out/cache"
    mkdir -p "$dir"
    if $skd compare "${common[@]}" --set "output_dir=$dir" --set "mlflow.tracking_uri=sqlite:///$dir/mlflow.db" \
        --set "teachers.manifest=$out/teachers/manifest.json" --set "distill.knowledge.source=cache:$cache" \
        --set "distill.max_steps=$steps" --variant "$variant" --seed "$seed" "$@" > "$dir.log" 2>&1; then
        echo "[transfer] $name s$seed done $(date -u +%T)"
    else
        echo "[transfer] $name s$seed FAILED (see $dir.log)"
    fi
}
echo "[transfer] students $(date -u +%T)"
jobs=()
for seed in 0 1 2; do
    if [[ $arms == *" no-kd "* ]]; then jobs+=("no-kd $seed no-kd"); fi
    if [[ $arms == *" transfer "* ]]; then
        jobs+=("transfer $seed single:mpnet-l12 --set 'data.transfer={source: rest, max_rows: $transfer}'")
    fi
done
if [[ $arms == *" same-rows "* ]]; then
    for seed in 0 1 2; do jobs+=("same-rows $seed single:mpnet-l12"); done
fi
running=0
for job in "${jobs[@]}"; do  # two at a time, in this order
    if (( running >= 2 )); then wait -n; running=$((running - 1)); fi
    eval "run $job" &
    running=$((running + 1))
done
wait
echo "[transfer] done $(date -u +%T)"
folders() { for s in 0 1 2; do [[ -d $out/$1-s$s/students ]] && printf -- '--out %s ' "$out/$1-s$s"; done; }
# shellcheck disable=SC2046
for arm in transfer same-rows; do
    [[ -n $(folders "$arm") ]] || continue
    echo "== single:mpnet-l12 on $arm against no-kd"
    ${PYTHON:-python} bench/paired_table.py -c "$cfg" --out "$out" $(folders no-kd) $(folders "$arm") --baseline no-kd
done
