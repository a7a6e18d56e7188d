#!/usr/bin/env bash
# Live vs simulated, by hand (about 2 minutes): three times, a clean tiny run and the same run
# with the faults of simulations/scenarios/live-tiny.toml (`train --inject` reads the scenario
# file), then `phalanx simulate` of that scenario calibrated from the clean run's time per step.
# Prints, per pair, the measured and the predicted wall time and lost work (faulted minus clean).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
B=target/release/phalanx
T=${TMPDIR:-/tmp}/phalanx-live-vs-sim
S=simulations/scenarios/live-tiny.toml
ARGS=(--config configs/tiny.toml --steps 40 --pp 2 --schedule 1f1b --microbatches 2)
for i in 1 2 3; do
  rm -rf "$T-$i"; mkdir -p "$T-$i"
  $B train "${ARGS[@]}" --out "$T-$i/clean" > "$T-$i/clean.json" 2>/dev/null
  $B train "${ARGS[@]}" --out "$T-$i/fault" --inject "$S" > "$T-$i/fault.json" 2>/dev/null
  $B simulate "$S" --policy actor-restart --calibrate "$T-$i/clean.json" --out "$T-$i/sim" \
    > "$T-$i/sim.json" 2>/dev/null
  python3 - "$T-$i" "$i" <<'PY'
import json, sys
d, i = sys.argv[1], sys.argv[2]
def summary(p):
    t = open(p).read()
    return json.loads(t[t.rfind("\n{") + 1:] if "\n{" in t else t)
c, f = summary(f"{d}/clean.json"), summary(f"{d}/fault.json")
s = json.load(open(f"{d}/sim.json"))
o = s["results"][0]["outcomes"][0]
step = s["calibrated_step_seconds"]
sim_wall = o["wall_hours"] * 3600
sim_lost = sim_wall - o["steps"] * step
# lost work measured two ways: the faulted run's wall time minus the clean run's (carries both
# runs' noise), and within the faulted run alone: the time its slow steps took beyond its median
# step (per-step times from metrics.jsonl's cumulative tokens/s)
live_lost = f["wall_seconds"] - c["wall_seconds"]
rows = [json.loads(l) for l in open(f"{d}/fault/metrics.jsonl")]
tokens = f["wall_seconds"] * f["tokens_per_s"] / len(rows)
ends = [r["step"] * tokens / r["tokens_per_s"] for r in rows]
took = [ends[0]] + [b - a for a, b in zip(ends, ends[1:])]
median = sorted(took)[len(took) // 2]
within = sum(t - median for t in took if t > 1.5 * median)
print(f"run {i}: clean {c['wall_seconds']:.2f} s ({step:.3f} s/step); "
      f"live with faults {f['wall_seconds']:.2f} s, restarts {f['restarts']}, "
      f"same weights as clean: {f['params_sha256'] == c['params_sha256']}; simulated {sim_wall:.2f} s "
      f"(wall {100 * (sim_wall / f['wall_seconds'] - 1):+.1f}%); lost work simulated {sim_lost:.2f} s, "
      f"live {live_lost:.2f} s as faulted minus clean ({100 * (sim_lost / live_lost - 1):+.1f}%), "
      f"{within:.2f} s within the faulted run ({100 * (sim_lost / within - 1):+.1f}%)")
PY
done
