#!/usr/bin/env bash
# The formation's soak: one seeded random panic or hang per step for 300 steps of micro
# (--pp 2 --ep 2 --schedule dualpipe --microbatches 4), then the same run without faults; the
# two must end with the same params_sha256. Prints both summaries' key figures.
#
#   bash scripts/soak.sh [SEED] [STEPS]     (build first: cargo build --release)
set -euo pipefail
seed=${1:-20261130}
steps=${2:-300}
bin=${PHALANX:-target/release/phalanx}
dir=$(mktemp -d /tmp/phalanx-soak.XXXXXX)
python3 - "$seed" "$steps" > "$dir/plan.toml" <<'PY'
import random, sys
r = random.Random(int(sys.argv[1]))
print("step_timeout_ms = 2000\n")
for step in range(1, int(sys.argv[2]) + 1):
    kind = "panic" if r.random() < 0.67 else "hang"
    actor = r.choice(["gpu", "stage", "expert"])
    phase = r.choice(["forward", "backward", "weight", "optimizer"])
    if actor == "gpu" and phase == "optimizer":
        phase = "forward"
    print(f'[[fault]]\nat_step = {step}\nactor = "{actor}"\nphase = "{phase}"\n'
          f'rank = {r.randrange(2)}\nkind = "{kind}"\n')
PY
run() {
  "$bin" train --config configs/micro.toml --pp 2 --ep 2 --schedule dualpipe --microbatches 4 \
    --steps "$steps" --out "$dir/$1" "${@:2}" > "$dir/$1.json" 2> "$dir/$1.log"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); dm=d.get('detections_ms') or [0]; \
print(sys.argv[2], d['params_sha256'], 'restarts', d['restarts'], 'replayed', d['replayed_steps'], \
'fired', d.get('faults_fired'), 'detected ms', min(dm), '-', max(dm), 'wall s', round(d['wall_seconds'], 1))" \
    "$dir/$1.json" "$1"
}
run faulted --inject "$dir/plan.toml"
run clean
a=$(python3 -c "import json; print(json.load(open('$dir/faulted.json'))['params_sha256'])")
b=$(python3 -c "import json; print(json.load(open('$dir/clean.json'))['params_sha256'])")
[ "$a" = "$b" ] && echo "same weights: $a" || { echo "DIFFERENT weights: $a vs $b"; exit 1; }
