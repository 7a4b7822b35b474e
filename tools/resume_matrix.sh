#!/usr/bin/env bash
# The resume matrix: every supported change of cluster shape, run A uninterrupted against run B
# checkpointed at step 4 and resumed on the other shape to step 8 (tests/e2e/_resume_pairs.py), on
# CPU over gloo with tiny models; prints one table row a pair (the README's resume table).
#   bash tools/resume_matrix.sh [--floor] [pytest args, e.g. -k tp2]
# --floor also runs each target layout uninterrupted and prints how far it is from run A: the rounding
# of another layout's arithmetic, which no resume can go below. About 1-2 minutes a pair on 2 CPU
# cores (twice that with --floor).
set -uo pipefail
cd "$(dirname "$0")/.."
table=$(mktemp /tmp/megakto-resume-table.XXXXXX)
floor=
if [ "${1:-}" = "--floor" ]; then floor=1; shift; fi
MEGAKTO_RESUME_FLOOR="$floor" MEGAKTO_RESUME_TABLE="$table" OMP_NUM_THREADS=1 python -m pytest -q -p no:cacheprovider \
    tests/e2e/resume_matrix_*.py "$@"
status=$?
python -m tests.e2e._resume_pairs "$table"
rm -f "$table"
exit $status
