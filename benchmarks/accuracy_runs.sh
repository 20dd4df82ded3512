#!/usr/bin/env bash
# Every run behind the README's accuracy tables, one after another, each stored with
# `python -m benchmarks.accuracy add` in benchmarks/results/accuracy-<data set>.json.
#
#   bash benchmarks/accuracy_runs.sh [GROUP ...]
#   groups: beauty seeds five-terms ablations default ksweep ml-1m ml-1m-seeds ml-1m-sr-seeds ml-1m-s4rec-seeds bce-sr bce-s4rec bce-best bce-why search search-ckd table3
#
# Runs go to runs/acc/<name>; a run whose metrics.json exists is not run again, and one that was
# stopped is resumed, so the script can be killed and started again. DATA (default ../shared/data)
# is where Beauty.txt and ml-1m.txt are; EXTRA is added to every command (e.g. "--threads 1");
# SEEDS narrows the seed groups (bce-*, default, ml-1m-*seeds) to the seeds given, e.g. SEEDS=3,
# and widens table3 (seed 1 alone by default), e.g. SEEDS="1 2".
# DRY_RUN=1 prints each run (name, row label, command; tab-separated) and runs nothing.
# Two copies may run the same groups at once (one per core): each run is locked by the copy
# that starts it, and the other copy goes on to the next.
# On a 2-core CPU a Beauty run takes 20-40 minutes, an ML-1M run one to two hours.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
EXTRA=${EXTRA:-}
GROUPS_WANTED=${*:-beauty seeds five-terms ablations ksweep ml-1m ml-1m-seeds}

run() {  # run NAME MODEL-LABEL FLAGS...
    local name=$1 label=$2
    shift 2
    local dir=runs/acc/$name
    local cmd="python -m s4rec.train $* --progress false"
    if [[ -n ${DRY_RUN:-} ]]; then  # print the run instead: name, label, command (tab-separated)
        printf '%s\t%s\t%s\n' "$name" "$label" "$cmd $EXTRA --run-dir $dir"
        return 0
    fi
    # A second copy of this script (the other core) skips the runs the first one holds.
    mkdir -p runs/acc
    local lock
    exec {lock}>"runs/acc/$name.lock"
    if ! flock -n "$lock"; then
        echo "$name: another copy of this script is running it; skipped" >&2
        exec {lock}>&-
        return 0
    fi
    if [[ ! -f $dir/metrics.json ]]; then
        if [[ -f $dir/last.pt ]]; then
            python -m s4rec.train --resume "$dir" --progress false
        else
            # shellcheck disable=SC2086
            $cmd $EXTRA --run-dir "$dir"
        fi
    fi
    python -m benchmarks.accuracy add "$dir" --model "$label" --command "$cmd"
    exec {lock}>&-
}

B="--data $DATA/Beauty.txt --epochs 100"
M="--data $DATA/ml-1m.txt --epochs 120 --patience 20 --eval-every 2"
# What --preset beauty / ml-1m held until 2026-12-03 (all five terms), for the rows run with them
OLD_B="--tau2 0.1 --tau3 1.0"
OLD_M="--dropout 0.2 --batch-size 128 --lr 2e-3 --train-window random --tau2 0.1 --tau3 1.0
       --alpha 0.0005 --beta1 0.005 --beta2 0.005 --lam 0.05 --crop-ratio 0.6 --mask-ratio 0.3"
# The presets' self-supervised part, spelt out in the S4Rec rows' commands as they were run
BEST="--proj-head mlp --augment length --lam 0"
for group in $GROUPS_WANTED; do
    case $group in
        beauty)
            run beauty-search-nogr-s1 "S4Rec" $B --preset beauty $BEST --seed 1
            run beauty-sr-s1 "SR-only" $B --preset beauty --ablation sr-only --seed 1
            run beauty-paper-s1 "S4Rec (paper weights)" $B --preset paper --seed 1 ;;
        seeds)
            for seed in 2 3; do
                run beauty-search-nogr-s$seed "S4Rec" $B --preset beauty $BEST --seed $seed
                run beauty-sr-s$seed "SR-only" $B --preset beauty --ablation sr-only --seed $seed
            done ;;
        five-terms)  # S4Rec with all five terms at the paper's weights, tuned temperatures
            for seed in 1 2 3; do
                run beauty-s4rec-s$seed "S4Rec, all five terms" $B $OLD_B --seed $seed
            done ;;
        ablations)
            run beauty-nocsd-s1 "w/o CSD and L_clust" $B $OLD_B --ablation no-ssl --seed 1
            run beauty-nocsd-clust-s1 "w/o CSD" $B $OLD_B --ablation no-csd --seed 1
            run beauty-nogr-s1 "S4Rec, all five terms, w/o GR" $B $OLD_B --ablation no-gr --seed 1 ;;
        default)  # --preset default (the terms at x0.05 the paper's weights) on Beauty; on ML-1M it is the S4Rec row's setting
            for seed in ${SEEDS:-1 2 3}; do
                run beauty-default-s$seed "S4Rec, --preset default" $B --preset default --seed $seed
            done ;;
        ksweep)
            for k in 32 64 256 512; do
                run beauty-k$k-s1 "K=$k" $B $OLD_B --n-clusters $k --seed 1
            done ;;
        ml-1m)
            run ml1m-search-nogr-s1 "S4Rec" $M --preset ml-1m $BEST --seed 1
            run ml1m-sr-s1 "SR-only" $M --preset ml-1m --ablation sr-only --seed 1
            run ml1m-s4rec-s1 "S4Rec, all five terms" $M $OLD_M --seed 1 ;;
        ml-1m-seeds | ml-1m-sr-seeds | ml-1m-s4rec-seeds)  # seeds 2 and 3 on ML-1M (or SR-only / S4Rec alone)
            if [[ $group != ml-1m-s4rec-seeds ]]; then
                for seed in ${SEEDS:-2 3}; do
                    run ml1m-sr-s$seed "SR-only" $M --preset ml-1m --ablation sr-only --seed $seed
                done
            fi
            if [[ $group != ml-1m-sr-seeds ]]; then
                for seed in ${SEEDS:-2 3}; do
                    run ml1m-search-nogr-s$seed "S4Rec" $M --preset ml-1m $BEST --seed $seed
                done
            fi ;;
        bce-sr | bce-s4rec)  # the paper's conditions: SASRec's BCE loss, the paper's weights
            BCE="--data $DATA/Beauty.txt --sr-loss bce --epochs 300 --eval-every 2"
            for seed in ${SEEDS:-1 2 3}; do
                if [[ $group == bce-sr ]]; then
                    run beauty-bce-sr-s$seed "SR-only (bce)" $BCE --preset paper --ablation sr-only --seed $seed
                else
                    run beauty-bce-s4rec-s$seed "S4Rec (bce)" $BCE --preset paper --seed $seed
                fi
            done ;;
        bce-best)  # the S4Rec row's setting (--preset beauty) under SASRec's loss, against SR-only (bce)
            BCE="--data $DATA/Beauty.txt --sr-loss bce --epochs 300 --eval-every 2"
            for seed in ${SEEDS:-1}; do
                run beauty-bce-best-s$seed "S4Rec (bce), --preset beauty" $BCE --preset beauty --seed $seed
            done ;;
        bce-why)  # which term holds S4Rec (bce) back: 40-epoch runs at seed 1, read on validation
            W="--data $DATA/Beauty.txt --sr-loss bce --epochs 40 --eval-every 2 --preset paper --seed 1"
            run beauty-bce-why-nogr-s1 "S4Rec (bce) w/o GR, 40 epochs" $W --lam 0
            run beauty-bce-why-nockd-s1 "S4Rec (bce) w/o CKD, 40 epochs" $W --beta2 0
            run beauty-bce-why-nockdgr-s1 "S4Rec (bce) w/o CKD and GR, 40 epochs" $W --beta2 0 --lam 0 ;;
        search)  # the self-supervised terms' suspects, on Beauty validation (seed 1)
            P="--preset beauty --proj-head mlp --augment length"
            run beauty-search-nogr-s1 "S4Rec" $B $P --lam 0 --seed 1
            run beauty-search-scl-s1 "search: mlp head, length views, contrast only" $B $P --alpha 0 --beta2 0 --lam 0 --seed 1
            run beauty-search-proj-s1 "search: mlp head, length views" $B $P --seed 1
            run beauty-search-ckd-s1 "search: mlp head, length views, tau3 0.05" $B $P --tau3 0.05 --seed 1 ;;
        search-ckd)  # the search setting with the distillation switched on (tau3 at the paper's 0.1)
            P="--preset beauty --proj-head mlp --augment length"
            run beauty-search-nogr-ckd-s1 "search: mlp head, length views, no adversary, tau3 0.1" $B $P --lam 0 --tau3 0.1 --seed 1 ;;
        table3)  # the paper's Table 3 rows that the S4Rec row's setting lacks (Beauty, seed 1)
            P="--preset beauty $BEST"
            for seed in ${SEEDS:-1}; do
                run beauty-t3-srcsd-s$seed "SR+CSD" $B $P --ablation sr-csd --seed $seed
                run beauty-t3-nocsd-s$seed "S4Rec w/o CSD (keeps L_clust)" $B $P --ablation no-csd --seed $seed
                run beauty-t3-kmeans-s$seed "SR+CSD, K-means prototypes" $B $P --alpha 0 --prototypes kmeans --seed $seed
            done ;;
        *) echo "unknown group: $group (beauty seeds five-terms ablations default ksweep ml-1m ml-1m-seeds ml-1m-sr-seeds ml-1m-s4rec-seeds bce-sr bce-s4rec bce-best bce-why search search-ckd table3)" >&2; exit 2 ;;
    esac
done
[[ -n ${DRY_RUN:-} ]] && exit 0
for dataset in Beauty ml-1m; do
    [[ -f benchmarks/results/accuracy-$dataset.json ]] && python -m benchmarks.accuracy table --dataset $dataset
done
