#!/usr/bin/env bash
# The training comparisons of the model card, as resumable stages (issue 20):
#
#   bestrq      Best-RQ pretraining on the corpus audio (transcripts unused), then the same TDT fine-tuning
#               on a labelled subset twice, once from the pretrained encoder and once from scratch, equal steps
#   paraformer  the Paraformer recipe, trained with the TDT recipe's corpus, batches and schedule
#   eval        streamer eval of every finished run on the same splits (scripts/compare_models.py)
#
#   bash scripts/experiments.sh bestrq          # run (or continue) the Best-RQ comparison
#   bash scripts/experiments.sh paraformer
#   bash scripts/experiments.sh eval
#   bash scripts/experiments.sh status          # where each stage stands
#
# Every stage records its run directory in $STATE/<stage>.run; rerunning the command continues the stage
# that stopped (streamer train/pretrain --resume) and skips finished ones, so a run can be stopped with
# SIGTERM (kill -TERM <pid>) at any point and picked up in a later session, on this machine or another one
# given the run directories. Sizes are environment variables, e.g.
#   PRETRAIN_STEPS=3000 FINETUNE_STEPS=2000 bash scripts/experiments.sh bestrq
# Train nothing else and benchmark nothing while a stage runs: the two cores are the budget.
set -euo pipefail
cd "$(dirname "$0")/.."

CORPUS=${CORPUS:-data/corpus-v2}
STATE=${STATE:-runs/experiments}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-2000}
FINETUNE_STEPS=${FINETUNE_STEPS:-1500}
FINETUNE_HOURS=${FINETUNE_HOURS:-10}
PARAFORMER_STEPS=${PARAFORMER_STEPS:-3000}
EVAL_LIMIT=${EVAL_LIMIT:-200}
EVAL_CONTEXT=${EVAL_CONTEXT:-70,13}
EVAL_SPLITS=${EVAL_SPLITS:-dev,test_seen_voices,test_heldout_engine,everyday}
PRETRAIN_RECIPE=${PRETRAIN_RECIPE:-models/streamer-tdt-small/pretrain.yaml}
TDT_RECIPE=${TDT_RECIPE:-models/streamer-tdt-small/recipe.yaml}
PARAFORMER_RECIPE=${PARAFORMER_RECIPE:-models/streamer-paraformer-small/recipe.yaml}
STREAMER=${STREAMER:-.venv/bin/streamer}
mkdir -p "$STATE"

# stage NAME COMMAND...: start COMMAND (a `streamer train|pretrain --config ...` line) unless the stage has a
# run directory, in which case continue that run; the new run directory is found by its creation.
stage() {
  local name=$1; shift
  local record="$STATE/$name.run"
  if [[ -s $record ]]; then
    local run; run=$(cat "$record")
    echo "== $name: continuing $run"
    nice -n 5 "$STREAMER" "$1" --resume "$run" --runs "$STATE"
    return
  fi
  echo "== $name: starting: $*"
  local before; before=$(ls -d "$STATE"/*/ 2>/dev/null | sort || true)
  nice -n 5 "$STREAMER" "$@" --runs "$STATE" &
  local pid=$!
  local run=""
  for _ in $(seq 600); do  # the run directory appears once the corpus is read
    run=$(comm -13 <(echo "$before") <(ls -d "$STATE"/*/ 2>/dev/null | sort) | head -1)
    [[ -n $run ]] && break
    kill -0 $pid 2>/dev/null || break
    sleep 1
  done
  [[ -n $run ]] && echo "${run%/}" > "$record"
  wait $pid
}

run_of() { cat "$STATE/$1.run"; }

case ${1:-status} in
  bestrq)
    stage bestrq-pretrain pretrain --config "$PRETRAIN_RECIPE" \
      --set data.corpus_dir="$CORPUS" --set train.max_steps="$PRETRAIN_STEPS"
    common=(--config "$TDT_RECIPE" --set data.corpus_dir="$CORPUS"
            --set data.tokenizer="$CORPUS/tokenizer.model" --set data.train_hours="$FINETUNE_HOURS"
            --set train.max_steps="$FINETUNE_STEPS")
    stage bestrq-finetune-pretrained train "${common[@]}" \
      --set train.init_from="$(run_of bestrq-pretrain)/checkpoints/best.pt"
    stage bestrq-finetune-scratch train "${common[@]}"
    ;;
  paraformer)
    stage paraformer train --config "$PARAFORMER_RECIPE" \
      --set data.corpus_dir="$CORPUS" --set data.tokenizer="$CORPUS/tokenizer.model" \
      --set train.max_steps="$PARAFORMER_STEPS"
    ;;
  eval)
    models=()
    for s in bestrq-finetune-scratch bestrq-finetune-pretrained paraformer; do
      [[ -s $STATE/$s.run ]] && models+=(--model "$s=$(run_of $s)")
    done
    [[ ${#models[@]} -gt 0 ]] || { echo "no finished stage to evaluate yet" >&2; exit 1; }
    .venv/bin/python scripts/compare_models.py "${models[@]}" --corpus "$CORPUS" --splits "$EVAL_SPLITS" --offline "$EVAL_CONTEXT" \
      --limit "$EVAL_LIMIT" --out "$STATE/eval"
    ;;
  status)
    for s in bestrq-pretrain bestrq-finetune-pretrained bestrq-finetune-scratch paraformer; do
      if [[ -s $STATE/$s.run ]]; then
        run=$(run_of $s)
        step=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1])).get('step','?'))" \
               "$run/metrics.json" 2>/dev/null || echo "?")
        echo "$s: $run (step $step)"
      else
        echo "$s: not started"
      fi
    done
    ;;
  *)
    sed -n '2,20p' "$0"; exit 2 ;;
esac
