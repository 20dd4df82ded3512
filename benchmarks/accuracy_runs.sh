#!/usr/bin/env bash
# Every run behind the README's accuracy tables, one after another, each stored with
# `python -m benchmarks.accuracy add` in benchmarks/results/accuracy-<data set>.json.
#
#   bash benchmarks/accuracy_runs.sh [GROUP ...]
#   groups: beauty ablations seeds ksweep ml-1m ml-1m-search ml-1m-sr-seeds bce-sr bce-s4rec bce-why search search-seeds
#
# Runs go to runs/acc/<name>; a run whose metrics.json exists is not run again, and one that was
# stopped is resumed, so the script can be killed and started again. DATA (default ../shared/data)
# is where Beauty.txt and ml-1m.txt are; EXTRA is added to every command (e.g. "--threads 1").
# On a 2-core CPU a Beauty run takes 20-40 minutes, an ML-1M run one to two hours.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
EXTRA=${EXTRA:-}
GROUPS_WANTED=${*:-beauty ablations seeds ksweep ml-1m}

run() {  # run NAME MODEL-LABEL FLAGS...
    local name=$1 label=$2
    shift 2
    local dir=runs/acc/$name
    local cmd="python -m s4rec.train $* --progress false"
    if [[ ! -f $dir/metrics.json ]]; then
        if [[ -f $dir/last.pt ]]; then
            python -m s4rec.train --resume "$dir" --progress false
        else
            # shellcheck disable=SC2086
            $cmd $EXTRA --run-dir "$dir"
        fi
    fi
    python -m benchmarks.accuracy add "$dir" --model "$label" --command "$cmd"
}

B="--data $DATA/Beauty.txt --epochs 100"
for group in $GROUPS_WANTED; do
    case $group in
        beauty)
            run beauty-s4rec-s1 "S4Rec" $B --preset beauty --seed 1
            run beauty-sr-s1 "SR-only" $B --preset beauty --ablation sr-only --seed 1
            run beauty-paper-s1 "S4Rec (paper weights)" $B --preset paper --seed 1 ;;
        ablations)
            run beauty-nocsd-s1 "w/o CSD and L_clust" $B --preset beauty --ablation no-ssl --seed 1
            run beauty-nocsd-clust-s1 "w/o CSD" $B --preset beauty --ablation no-csd --seed 1
            run beauty-nogr-s1 "w/o GR" $B --preset beauty --ablation no-gr --seed 1 ;;
        seeds)
            for seed in 2 3; do
                run beauty-s4rec-s$seed "S4Rec" $B --preset beauty --seed $seed
                run beauty-sr-s$seed "SR-only" $B --preset beauty --ablation sr-only --seed $seed
            done ;;
        ksweep)
            for k in 32 64 256 512; do
                run beauty-k$k-s1 "K=$k" $B --preset beauty --n-clusters $k --seed 1
            done ;;
        ml-1m)
            M="--data $DATA/ml-1m.txt --epochs 120 --patience 20 --eval-every 2"
            run ml1m-s4rec-s1 "S4Rec" $M --preset ml-1m --seed 1
            run ml1m-sr-s1 "SR-only" $M --preset ml-1m --ablation sr-only --seed 1 ;;
        bce-sr | bce-s4rec)  # the paper's conditions: SASRec's BCE loss, the paper's weights
            BCE="--data $DATA/Beauty.txt --sr-loss bce --epochs 300 --eval-every 2"
            for seed in ${SEEDS:-1 2 3}; do
                if [[ $group == bce-sr ]]; then
                    run beauty-bce-sr-s$seed "SR-only (bce)" $BCE --preset paper --ablation sr-only --seed $seed
                else
                    run beauty-bce-s4rec-s$seed "S4Rec (bce)" $BCE --preset paper --seed $seed
                fi
            done ;;
        bce-why)  # which term holds S4Rec (bce) back: 40-epoch runs at seed 1, read on validation
            W="--data $DATA/Beauty.txt --sr-loss bce --epochs 40 --eval-every 2 --preset paper --seed 1"
            run beauty-bce-why-nogr-s1 "S4Rec (bce) w/o GR, 40 epochs" $W --lam 0
            run beauty-bce-why-nockd-s1 "S4Rec (bce) w/o CKD, 40 epochs" $W --beta2 0
            run beauty-bce-why-nockdgr-s1 "S4Rec (bce) w/o CKD and GR, 40 epochs" $W --beta2 0 --lam 0 ;;
        search)  # the self-supervised terms' suspects, on Beauty validation (seed 1)
            P="--preset beauty --proj-head mlp --augment length"
            run beauty-search-nogr-s1 "search: mlp head, length views, no adversary" $B $P --lam 0 --seed 1
            run beauty-search-scl-s1 "search: mlp head, length views, contrast only" $B $P --alpha 0 --beta2 0 --lam 0 --seed 1
            run beauty-search-proj-s1 "search: mlp head, length views" $B $P --seed 1
            run beauty-search-ckd-s1 "search: mlp head, length views, tau3 0.05" $B $P --tau3 0.05 --seed 1 ;;
        search-seeds)  # the best search setting so far (mlp head, length views, no adversary), seeds 2 and 3
            P="--preset beauty --proj-head mlp --augment length"
            for seed in 2 3; do
                run beauty-search-nogr-s$seed "search: mlp head, length views, no adversary" $B $P --lam 0 --seed $seed
            done ;;
        ml-1m-search)  # the Beauty search setting (mlp head, length views, no adversary) on ML-1M, seed 1
            M="--data $DATA/ml-1m.txt --epochs 120 --patience 20 --eval-every 2"
            run ml1m-search-nogr-s1 "search: mlp head, length views, no adversary" $M --preset ml-1m --proj-head mlp --augment length --lam 0 --seed 1 ;;
        ml-1m-sr-seeds)  # SR-only on ML-1M at seeds 2 and 3 (seed 1 is in the ml-1m group)
            M="--data $DATA/ml-1m.txt --epochs 120 --patience 20 --eval-every 2"
            for seed in 2 3; do
                run ml1m-sr-s$seed "SR-only" $M --preset ml-1m --ablation sr-only --seed $seed
            done ;;
        *) echo "unknown group: $group (beauty ablations seeds ksweep ml-1m ml-1m-search ml-1m-sr-seeds bce-sr bce-s4rec bce-why search search-seeds)" >&2; exit 2 ;;
    esac
done
for dataset in Beauty ml-1m; do
    [[ -f benchmarks/results/accuracy-$dataset.json ]] && python -m benchmarks.accuracy table --dataset $dataset
done
