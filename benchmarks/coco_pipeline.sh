#!/usr/bin/env bash
# The shipped COCO pipelines end to end on CPU at their real geometry (600/1000, 80 classes), with a
# COCO-like synthetic set and stand-in backbone weights (NOT ImageNet weights): each stage's wall
# time and peak RSS (GNU time's %M: the largest process of the stage, DataLoader workers included).
#
#   benchmarks/coco_pipeline.sh WORKDIR [TRAIN VAL UNLABELED]     (default 8 8 8)
#
# Only data.root, step counts (--max-steps 2) and backbone weights are overridden. Run from the
# repository root; set OMP_NUM_THREADS to fix the torch threads. Results: docs/results.md.
set -euo pipefail
W=${1:?usage: benchmarks/coco_pipeline.sh WORKDIR [TRAIN VAL UNLABELED]}
N_TRAIN=${2:-8}; N_VAL=${3:-8}; N_UNLABELED=${4:-8}
mkdir -p "$W"
W=$(cd "$W" && pwd)
TIMES="$W/stage_times.tsv"
: > "$TIMES"

stage() {  # stage NAME COMMAND...: run, keep stdout/stderr in WORKDIR/NAME.log, append "NAME wall_s maxrss_kb"
  local name=$1; shift
  /usr/bin/time -o "$W/$name.time" -f "%e %M" "$@" > "$W/$name.log" 2>&1 || { tail -n 20 "$W/$name.log"; exit 1; }
  printf '%s\t%s\n' "$name" "$(cat "$W/$name.time")" >> "$TIMES"
}

DATA=(--set "data.root=$W/coco")
stage data        python -m sadpipe make-toy-data "$W/coco" --preset coco --train "$N_TRAIN" --val "$N_VAL" \
                      --unlabeled "$N_UNLABELED"
stage weights_r101 python -m sadpipe make-backbone-weights --arch resnet101 "$W/resnet101.pth"
stage weights_r50  python -m sadpipe make-backbone-weights --arch resnet50 "$W/resnet50.pth"
rm -rf "$W/r101" "$W/cache.zarr" "$W/r50_sad"
stage train_teacher python -m sadpipe train-teacher --config pipelines/coco_r101_teacher.toml --out "$W/r101" \
                      --max-steps 2 --device cpu "${DATA[@]}" --set "teacher.model.backbone_weights=$W/resnet101.pth"
stage dump_teacher  python -m sadpipe dump-teacher --config pipelines/coco_sad_r50.toml --teacher "$W/r101/final.pt" \
                      --out "$W/cache.zarr" --device cpu "${DATA[@]}"
stage train_student python -m sadpipe train-student --config pipelines/coco_sad_r50.toml --cache "$W/cache.zarr" \
                      --out "$W/r50_sad" --max-steps 2 --device cpu "${DATA[@]}" \
                      --set "student.model.backbone_weights=$W/resnet50.pth"
stage evaluate      python -m sadpipe evaluate --config pipelines/coco_sad_r50.toml \
                      --checkpoint "$W/r50_sad/final.pt" --device cpu "${DATA[@]}"

printf '| stage | wall s | peak RSS (GB) |\n|---|---|---|\n'
awk -F'\t' '{split($2, v, " "); printf "| %s | %.0f | %.2f |\n", $1, v[1], v[2] / 1048576}' "$TIMES"
