#!/usr/bin/env bash
# Submits a replay to Slurm: the members as a job array, the rest as a job that waits for it.
#   scripts/slurm_replay.sh REPLAY DATA OUT [extra sbatch options...]
set -euo pipefail
replay=${1:?usage: slurm_replay.sh REPLAY DATA OUT [sbatch options]}
data=${2:?dataset folder}
out=${3:?shared output folder}
shift 3
here=$(cd "$(dirname "$0")/.." && pwd)
members=$(grep -cE '^[[:space:]]*\[\[[[:space:]]*member[[:space:]]*\]\]' "$replay" || true)
if [ "$members" -eq 0 ]; then
  echo "$replay: no [[member]] entries" >&2
  exit 2
fi
array=$(sbatch --parsable "$@" --array=0-$((members - 1)) "$here/deploy/slurm/replay.sbatch" members "$replay" "$data" "$out")
rest=$(sbatch --parsable "$@" --dependency=afterok:"$array" "$here/deploy/slurm/replay.sbatch" rest "$replay" "$data" "$out")
echo "members: job array $array ($members tasks); rest: job $rest (after the array succeeds)"
