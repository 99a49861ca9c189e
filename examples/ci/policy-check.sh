#!/usr/bin/env bash
# A CI job for a change to a policy directory: the three checks of the README's
# "Changing a policy safely", each one a gate (a non-zero exit fails the job).
#
#   examples/ci/policy-check.sh OLD NEW [STATE]
#
# OLD    the policies as merged (e.g. a checkout of the main branch)
# NEW    the policies of the change
# STATE  a gateway state directory whose decision log holds recent traffic (optional)
#
# Environment:
#   MESHGATE   the meshgate binary (default: `meshgate` on the PATH)
#   CASES      a `policy test` cases file: when set, the change may grant access, and the
#              new cases say which (instead of proving that it grants none)
#   SINCE      how much recorded traffic to replay (default: 7d)
#   CVC5       the SMT solver, when not on the PATH nor installed by scripts/install-cvc5.sh
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "usage: $0 OLD NEW [STATE]" >&2
  exit 2
fi
old=$1 new=$2 state=${3:-}
mg=${MESHGATE:-meshgate}

echo "== 1. the new policies are valid"
"$mg" policy validate "$new"

echo "== review aid: what changed"
"$mg" policy diff "$old" "$new" || [ $? -eq 1 ]  # 1: the sets differ, as expected

if [ -n "${CASES:-}" ]; then
  echo "== 2. access grows on purpose: the cases say how"
  "$mg" policy test "$new" "$CASES"
else
  echo "== 2. the change grants no new access, for every request"
  "$mg" policy prove "$old" "$new" --no-new-access
fi

if [ -n "$state" ]; then
  echo "== 3. no recorded decision of the last ${SINCE:-7d} flips"
  "$mg" policy replay --log "$state" --policies "$new" --since "${SINCE:-7d}"
fi
echo "== all checks passed"
