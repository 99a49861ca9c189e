#!/usr/bin/env bash
# benches/prove.sh — how long `meshgate policy prove` takes (issue 14). NOT run by CI.
#
#     bash benches/prove.sh [MESHGATE]     # default: target/release/meshgate
#
# Times each property on the example policies (`examples/policies`), on each cluster's
# policies of the demo (`examples/demo/policies/*`) and on a generated set of 200 policies
# (50 each of: namespace reads with a path and mTLS, one workload's writes with a header,
# trust-domain reads of services labelled public before a date, forbids of internal paths and
# guest claims), where NEW narrows one policy of OLD. Each line: the set, the property, the
# answer, the prover's own time (`ms` of `--json`: compilation + solver, 8 queries or more)
# and the command's wall time (start-up, loading and validation included).
# Needs cvc5 >= 1.3.1 (`scripts/install-cvc5.sh`).
set -euo pipefail
cd "$(dirname "$0")/.."
mg=${1:-target/release/meshgate}
[ -x "$mg" ] || { echo "no $mg: cargo build --release first" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

gen() { # gen N NARROWED > file
  local n=$1 narrowed=$2 i ns svc cl extra
  for ((i = 0; i < n; i++)); do
    ns=team$((i % 20)) svc=svc$i
    cl=$(case $((i % 3)) in 0) echo east ;; 1) echo west ;; *) echo north ;; esac)
    extra=""
    [ "$i" -eq "$narrowed" ] && extra='context.source_cluster == "east" && '
    case $((i % 4)) in
    0) printf '@id("p%d")\n@quota("100/s burst 20")\npermit (principal in Namespace::"east.example/%s", action in Action::"read", resource == Service::"%s.%s.%s")\nwhen { %scontext.mtls && context.path like "/v1/%s/*" };\n\n' \
      "$i" "$ns" "$svc" "$ns" "$cl" "$extra" "$svc" ;;
    1) printf '@id("p%d")\npermit (principal == Workload::"spiffe://east.example/ns/%s/sa/writer%d", action in [Action::"POST", Action::"PUT"], resource == Service::"%s.%s.%s")\nwhen { %scontext.path == "/v1/%s" && context.headers.hasTag("x-change") };\n\n' \
      "$i" "$ns" "$i" "$svc" "$ns" "$cl" "$extra" "$svc" ;;
    2) printf '@id("p%d")\npermit (principal in TrustDomain::"east.example", action == Action::"GET", resource in Namespace::"west.example/%s")\nwhen { %sresource.hasTag("public") && resource.getTag("public") == "yes" && context.time < datetime("2030-01-01") };\n\n' \
      "$i" "$ns" "$extra" ;;
    *) printf '@id("p%d")\nforbid (principal, action, resource == Service::"%s.%s.%s")\nwhen { context.path like "/internal/*" || (context.has_claims && context.claims.hasTag("role") && context.claims.getTag("role") == "guest") };\n\n' \
      "$i" "$svc" "$ns" "$cl" ;;
    esac
  done
}
mkdir -p "$work/old200" "$work/new200"
gen 200 -1 >"$work/old200/set.cedar"
gen 200 100 >"$work/new200/set.cedar"

row() { # row LABEL ARGS...
  local label=$1 start end out code ms answer
  shift
  start=$(date +%s%N)
  set +e
  out=$("$mg" policy prove "$@" --json 2>&1)
  code=$?
  set -e
  end=$(date +%s%N)
  ms=$(printf '%s' "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ms"])' 2>/dev/null || echo "-")
  case $code in 0) answer=proved ;; 1) answer=refuted ;; *) answer="error $code" ;; esac
  printf '%-28s %-34s %-8s %8s ms %8s ms\n' "$label" "${*: -1}" "$answer" "$ms" $(((end - start) / 1000000))
}

printf '%-28s %-34s %-8s %11s %11s\n' "set" "property" "answer" "prover" "wall"
ex=examples/policies
row "examples/policies" "$ex" "$ex" --no-new-access
row "examples/policies" "$ex" "$ex" --equivalent
row "examples/policies" "$ex" --never-errors
row "examples/policies" "$ex" --always-denies 'spiffe://east.example/ns/batch/*'
for d in examples/demo/policies/*/; do
  d=${d%/}
  row "demo/${d##*/}" "$d" "$d" --no-new-access
  row "demo/${d##*/}" "$d" --never-errors
done
row "demo north -> north-shadow" examples/demo/policies/north examples/demo/policies/north-shadow --no-new-access
row "200 policies (1 narrowed)" "$work/old200" "$work/new200" --no-new-access
row "200 policies (1 narrowed)" "$work/old200" "$work/new200" --equivalent
row "200 policies" "$work/new200" --never-errors
row "200 policies" "$work/new200" --always-denies 'spiffe://east.example/ns/team3/*'
echo "($("$mg" --version), $(nproc) cores, $(date -u +%Y-%m-%d))"
