#!/usr/bin/env bash
# The resume matrix: every supported change of cluster shape, run A uninterrupted against run B
# checkpointed at step 4 and resumed on the other shape to step 8 (tests/e2e/_resume_pairs.py), on
# CPU over gloo with tiny models; prints one table row a pair (the README's resume table).
#   bash tools/resume_matrix.sh [pytest args, e.g. -k tp2]
# About 1-2 minutes a pair on 2 CPU cores.
set -uo pipefail
cd "$(dirname "$0")/.."
table=$(mktemp /tmp/megakto-resume-table.XXXXXX)
MEGAKTO_RESUME_TABLE="$table" OMP_NUM_THREADS=1 python -m pytest -q -p no:cacheprovider \
    tests/e2e/resume_matrix_*.py "$@"
status=$?
python -m tests.e2e._resume_pairs "$table"
rm -f "$table"
exit $status
