#!/usr/bin/env bash
# The study behind the default preset (RESULTS.md): each cell distils the seed-0 off-the-shelf student
# directly from the best teacher, at the same budget and with the same batches as the `direct` and `long`
# rows of `python train.py --seeds 0 1 2 --precision fp32 --out runs/seeds` (seed 635 = the seed those rows train with).
# The cell `--lam 1 --inherit` at the row's budget is the `direct` row itself. --lam 0 trains without the
# teacher's signal: like `long` (the same batches; the flips differ, since the adapters' first batch draws
# from the RNG), and with --inherit it is `long` from the inherited neck and head.
# Those rows, and so the cells, ran on the plain path (--precision fp32), before the fast path existed.
# Part 1: run that reproduction first (with --precision fp32); then `bash study.sh` (about 5 minutes a cell of B iterations on 2 CPU cores,
# one run at a time; a finished cell is reused). Prints one line per cell.
set -euo pipefail
cd "$(dirname "$0")"
# One cell: `distill` from STUDENT with the rows' seed (635), resumable, into OUT/NAME (log OUT/NAME.log);
# prints the AP of its last stage. The parts below wrap it with their student, folder and flags.
run_cell() {
  local student=$1 out=$2 name=$3 steps=$4; shift 4
  python train.py distill --student "$student" --keep-order --seed 635 --steps "$steps" --resume \
    --out "$out/$name" "$@" > "$out/$name.log" 2>&1 || { tail -3 "$out/$name.log"; exit 1; }
  python -c "import glob, torch; f = sorted(glob.glob('$out/$name/stage?.pt'))[-1]; \
m = torch.load(f, weights_only=True)['metrics']; \
print(f'$name'.ljust(24), ' '.join(f'{k} {100 * m[k]:5.1f}' for k in ('AP', 'APs', 'APm', 'APl')))"
}
if [ -z "${1:-}" ]; then  # part 1 only without an argument
RUN=${RUN:-runs/seeds/seed0}; POOL=${POOL:-runs/seeds/ckpt}; OUT=${OUT:-runs/study}
TEACHER=$POOL/$(python -c "import json; print(json.load(open('$RUN/order.json'))['order'][-1])").pt
B=$(python -c "import json; print(json.load(open('$RUN/results.json'))['budget_steps'])")  # the rows' budget
S=$(python -c "import json; print(json.load(open('$RUN/results.json'))['recipe']['stage_steps'])")  # per stage
ORDER=$(python -c "import json; print(' '.join('$POOL/' + t + '.pt' for t in json.load(open('$RUN/order.json'))['order']))")
cell() {  # name, iterations per stage, then distill's flags (a later --teachers replaces the final teacher)
  local name=$1 steps=$2; shift 2
  run_cell "$RUN/ckpt/ots.pt" "$OUT" "$name" "$steps" --teachers "$TEACHER" --precision fp32 "$@"
}
mkdir -p "$OUT"
cell direct_no_inherit    $B --lam 1 --no-inherit
cell long_inherit         $B --lam 0 --inherit    # inheriting alone, no distillation
cell direct_lam0.3        $B --lam 0.3 --inherit
cell direct_lam3          $B --lam 3 --inherit
# MTPD through the BGS order, with this script's seeds: identity adapters (as the preset), then 1x1 convs,
# which can absorb the change of channel basis from one independently trained teacher to the next
cell mtpd_identity        $S --lam 1 --inherit --teachers $ORDER
cell mtpd_conv_adapter    $S --lam 1 --inherit --adapter conv --teachers $ORDER
cell direct_conv_adapter  $B --lam 1 --inherit --adapter conv
# stages as long as the OTS schedule: measured on the fast path with `python train.py --stage-steps 800`
# (RESULTS.md), which runs every row
fi

# ---------------------------------------------------------------------------------------------------------
# Part 2, the fast path (RESULTS.md "Why MTPD loses here"): seed 0 of `python train.py` (the default
# run, the fast path), its OTS student and pool in $FAST (runs/default/ckpt after `python train.py`).
# Run as `bash study.sh fast`; about 3 minutes a cell. Each cell trains 800 iterations after OTS, like
# the rows; MTPD cells run two stages of 400.
if [ "${1:-}" = fast ]; then
  FAST=${FAST:-runs/default/ckpt}; OUT=${OUT_FAST:-runs/study_fast}; mkdir -p "$OUT"
  R50=$FAST/r50@1x.pt; R18=$FAST/r18@1x.pt
  fcell() {
    local name=$1 steps=$2; shift 2
    run_cell "$FAST/ots.pt" "$OUT" "$name" "$steps" --lam 1 "$@"
  }
  # two stages as `distill` runs them (stage i: seed 635 + i, fresh adapters and AdamW, the first inherits),
  # from any two teachers (also the same one twice), with per-stage schedules ("restart") or one schedule
  # across both ("one": warm-up only in stage 1, one LR drop at 85% of the 800 iterations)
  seq() {
    python - "$@" <<'PY'
import os, sys
import torch
import engine, train
name, sched, out, ots, *teachers = sys.argv[1:]
train_loader, val_loader = engine.loaders("data/shapes128_800", 8, 635, False)
model, spec, _ = engine.load(ots)
for i, t in enumerate(teachers):
    r = dict(train.RECIPE, lam=1.0)  # the cells' lam
    if sched == "one":
        r.update(drop_at=2.0) if i == 0 else r.update(warmup=0, drop_at=0.7)
    m = engine.fit(model, spec, f"{out}/{name}/stage{i + 1}.pt", train_loader, val_loader, 400,
                   torch.device("cpu"), 635 + i, r, [engine.load(t)[0]], desc=f"{name} {i + 1}", inherit_first=i == 0)
print(name.ljust(24), " ".join(f"{k} {100 * m[k]:5.1f}" for k in ("AP", "APs", "APm", "APl")))
PY
  }
  fcell direct_identity        800 --inherit --teachers "$R18"      # = the `direct` row
  fcell direct_noinherit       800 --no-inherit --teachers "$R18"
  fcell direct_lstsq           800 --inherit --adapter lstsq --teachers "$R18"
  fcell direct_lstsq_noinherit 800 --no-inherit --adapter lstsq --teachers "$R18"
  fcell mtpd_identity          400 --inherit --teachers "$R50" "$R18"
  fcell mtpd_conv              400 --inherit --adapter conv --teachers "$R50" "$R18"
  fcell mtpd_lstsq             400 --inherit --adapter lstsq --teachers "$R50" "$R18"
  seq mtpd_one_schedule one "$OUT" "$FAST/ots.pt" "$R50" "$R18"
  seq r18_twice restart "$OUT" "$FAST/ots.pt" "$R18" "$R18"
fi

# ---------------------------------------------------------------------------------------------------------
# Part 3 (RESULTS.md "A converged OTS student"): after `python train.py --preset converged`, stages as long
# as the OTS schedule (5000): MTPD through BGS's order, 5000 + 5000, and direct from R18@1x, 10000, as
# `distill` cells at the preset's lam and inheriting. Run as `bash study.sh converged`; about 50 minutes.
if [ "${1:-}" = converged ]; then
  C=${CONVERGED:-runs/converged/ckpt}; OUT=${OUT_CONVERGED:-runs/converged_s5000}; mkdir -p "$OUT"
  ccell() {
    local name=$1 steps=$2; shift 2
    run_cell "$C/ots.pt" "$OUT" "$name" "$steps" --lam 3 --inherit --ckpt-every 500 "$@"
  }
  ccell mtpd   5000  --teachers "$C/r50@1x.pt" "$C/r18@1x.pt"
  ccell direct 10000 --teachers "$C/r18@1x.pt"
fi

# ---------------------------------------------------------------------------------------------------------
# Part 4 (RESULTS.md "Does a capacity gap show MTPD's premise?"): after
# `python train.py --preset gap --seeds 0 1 2 --out runs/gap`, seed 0's OTS student distilled without
# inheriting, from the R18 ladder's ends and through BGS's order: does inheriting erase the distance to a
# far teacher? The direct cells have the `direct` row's seed (635), budget (2000) and batches; the MTPD cell
# distil's stage seeds (635, 636). Run as `bash study.sh gap`; about 5 minutes a cell of 2000 iterations.
if [ "${1:-}" = gap ]; then
  G=${GAP:-runs/gap}; OUT=${OUT_GAP:-runs/gap_study}; mkdir -p "$OUT"
  gcell() {
    local name=$1 steps=$2; shift 2
    run_cell "$G/seed0/ckpt/ots.pt" "$OUT" "$name" "$steps" "$@"
  }
  gcell direct_r18@2x          2000 --inherit --teachers "$G/ckpt/r18@2x.pt"     # = seed 0's `direct` row
  gcell direct_r18@2x_noinherit 2000 --no-inherit --teachers "$G/ckpt/r18@2x.pt"
  gcell direct_r18@1x_noinherit 2000 --no-inherit --teachers "$G/ckpt/r18@1x.pt"
  gcell mtpd_noinherit          1000 --no-inherit --teachers "$G/ckpt/r18@1.5x.pt" "$G/ckpt/r18@2x.pt"
fi
