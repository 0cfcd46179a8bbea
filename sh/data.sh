#!/bin/sh
# Fetch the real task data into datasets/ (layout: see datasets/README.md, "Real data").
#
#   sh sh/data.sh                      download from the public GitHub repositories
#   sh sh/data.sh --from ../shared/data  copy a local copy with the same layout instead
#   options: --to DIR (default: datasets)  --force (re-download files that exist)
#
# Sources: suzgunmirac/BIG-Bench-Hard (MIT), google/BIG-bench (Apache-2.0; four tasks for the
# DLN paper's BBH protocol), yaolu/Ordered-Prompt, iesl/leopard, OrangeInSouth/DeePEn.
# The synthetic tasks need no data.
set -eu

FROM=""
TO="datasets"
FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --from) FROM="$2"; shift 2 ;;
    --to) TO="$2"; shift 2 ;;
    --force) FORCE=1; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "data.sh: unknown argument $1 (use --from DIR, --to DIR, --force)" >&2; exit 2 ;;
  esac
done

mkdir -p "$TO"

if [ -n "$FROM" ]; then
  if [ ! -d "$FROM" ]; then
    echo "data.sh: --from $FROM is not a directory" >&2; exit 1
  fi
  copied=0
  for d in bbh bigbench ordered_prompt leopard deepen; do
    if [ -d "$FROM/$d" ]; then
      mkdir -p "$TO/$d"
      cp -R "$FROM/$d/." "$TO/$d/"
      echo "copied $FROM/$d -> $TO/$d"
      copied=1
    fi
  done
  if [ "$copied" = 0 ]; then
    echo "data.sh: $FROM holds none of bbh/ ordered_prompt/ leopard/ deepen/" >&2; exit 1
  fi
  exit 0
fi

if command -v curl >/dev/null 2>&1; then
  get() { curl -fsSL --connect-timeout 20 --max-time 300 -o "$2" "$1"; }
elif command -v wget >/dev/null 2>&1; then
  get() { wget -q -T 20 -t 1 -O "$2" "$1"; }
else
  echo "data.sh: needs curl or wget (or use --from DIR)" >&2; exit 1
fi

PROBE="https://raw.githubusercontent.com/suzgunmirac/BIG-Bench-Hard/main/bbh/navigate.json"
if ! get "$PROBE" "$TO/.probe" 2>/dev/null; then
  rm -f "$TO/.probe"
  echo "data.sh: cannot reach raw.githubusercontent.com (offline?); copy a local copy instead:" >&2
  echo "  sh sh/data.sh --from DIR    (a folder with bbh/ ordered_prompt/ leopard/ deepen/)" >&2
  exit 1
fi
rm -f "$TO/.probe"

FAILED=""
# fetch REPO PATH_IN_REPO DEST: tries the main then the master branch
fetch() {
  dest="$TO/$3"
  if [ -s "$dest" ] && [ "$FORCE" = 0 ]; then return 0; fi
  mkdir -p "$(dirname "$dest")"
  for branch in main master; do
    if get "https://raw.githubusercontent.com/$1/$branch/$2" "$dest.part" 2>/dev/null; then
      mv "$dest.part" "$dest"; echo "fetched $3"; return 0
    fi
  done
  rm -f "$dest.part"
  FAILED="$FAILED $3"
}

for t in boolean_expressions causal_judgement date_understanding disambiguation_qa dyck_languages \
         formal_fallacies geometric_shapes hyperbaton logical_deduction_three_objects \
         logical_deduction_five_objects logical_deduction_seven_objects movie_recommendation \
         multistep_arithmetic_two navigate object_counting penguins_in_a_table \
         reasoning_about_colored_objects ruin_names salient_translation_error_detection snarks \
         sports_understanding temporal_sequences tracking_shuffled_objects_three_objects \
         tracking_shuffled_objects_five_objects tracking_shuffled_objects_seven_objects web_of_lies \
         word_sorting; do
  fetch suzgunmirac/BIG-Bench-Hard "bbh/$t.json" "bbh/$t.json"
done

for t in mpqa subj trec; do
  for f in train dev_subsample test; do
    fetch yaolu/Ordered-Prompt "data/$t/$f.jsonl" "ordered_prompt/$t/$f.jsonl"
  done
done

for t in disaster airline; do
  fetch iesl/leopard "data/json/$t/${t}_eval.json" "leopard/$t/${t}_eval.json"
done

for f in NaturalQuestions/dev/v1.0-simplified_simplified-nq-train.simpled_dev_100000_sample1600_seed42.jsonl \
         NaturalQuestions/test/natural-questions.jsonl \
         TriviaQA/wikipedia-dev-1900.jsonl TriviaQA/wikipedia-test-6000.jsonl \
         ARC-Challenge/train.jsonl ARC-Challenge/test.jsonl \
         GSM/data/train_sample300_seed42.cleand.jsonl GSM/data/test.cleand.jsonl \
         PIQA/physicaliqa-train-dev/dev_our.jsonl; do
  fetch OrangeInSouth/DeePEn "datasets/$f" "deepen/$f"
done
for s in $(${PYTHON:-python} -c "from dln_ens.data.loaders import MMLU_SUBJECTS; print(' '.join(MMLU_SUBJECTS))"); do
  for split in dev val test; do
    fetch OrangeInSouth/DeePEn "datasets/MMLU/$split-jsonl/$s.jsonl" "deepen/MMLU/$split-jsonl/$s.jsonl"
  done
done

# BIG-bench's original tasks for the DLN paper's BBH protocol (dln_ens/data/bigbench.py)
for t in navigate date_understanding hyperbaton logical_deduction/seven_objects; do
  fetch google/BIG-bench "bigbench/benchmark_tasks/$t/task.json" "bigbench/$t/task.json"
done

if [ -n "$FAILED" ]; then
  echo "data.sh: could not fetch:$FAILED" >&2
  echo "(offline? copy a local copy instead: sh sh/data.sh --from DIR)" >&2
  exit 1
fi
echo "data ready in $TO"
