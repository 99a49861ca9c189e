#!/usr/bin/env bash
# benches/run.sh — side-by-side load benchmark of meshgate (issue 6, "Benchmarks").
#
# NOT run by CI: CI runs the debug test suite only. Run it by hand:
#
#     bash benches/run.sh            # full run: 5 repetitions, ~12 minutes after the builds
#     bash benches/run.sh --quick    # smoke test: 2 repetitions, short runs (~2 minutes)
#
# In ONE run, on this machine, it measures three paths with the same upstream (nginx serving
# a 1 KiB static file on loopback):
#   direct    client → upstream
#   nginx     client → nginx A (TLS, verifies the client cert) → mTLS → nginx B → upstream
#   meshgate  client → meshgate east (workload mTLS) → QUIC → meshgate west
#             (Cedar + quota + decision log) → upstream, with the decision log in
#             `durability = "process"` mode (the default)
#   meshgate-power   the same with a second pair in `durability = "power"` mode
#             (every answer waits for the fdatasync of its decision's batch)
# Every certificate comes from our own issuer (`meshgate identity init/issue`).
# The load generator is `oha` at a fixed rate with latency correction, and unthrottled for
# the maximum rate. Paths alternate within each repetition; the report gives medians, paired
# differences (proxied run minus the adjacent direct run) and ratios meshgate ÷ nginx pair.
#
# Needs: the Rust toolchain, python3, curl, nginx (installed with apt-get if missing, as
# root) and oha (installed with `cargo install oha --locked` if missing, several minutes).
# Everything listens on 127.0.0.1 only; every process it starts is stopped on exit; every
# load run is bounded by `timeout`.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: benches/run.sh [--quick] [--reps N] [--duration SECS] [--perf] [--stages] [--keep] [--results DIR]

  --quick          smoke test: 2 repetitions, 3 s runs
  --reps N         repetitions (default 5; at least 5 for figures worth quoting)
  --duration SECS  length of each measured run (default 10)
  --perf           after the measured runs, profile both gateways with `perf record`
                   during one extra saturation run (flat profile into the results)
  --stages         only: start one pair, send 2000 requests at 200 rps, print where one
                   request's time goes stage by stage on each gateway, and stop
  --keep           keep the temporary directory (configs, certificates, logs)
  --results DIR    where to write the results (default target/meshgate-bench/<UTC time>)

environment:
  CARGO_TARGET_DIR      honoured for the build and the default results directory
  MESHGATE_BENCH_BIN    use this meshgate binary instead of building (for work on the script)
  MESHGATE_BENCH_LABEL  names the build in the report when the tree is not a git checkout
EOF
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPS=5
DUR=10
WARM=3
QUICK=0
PERF=0
STAGES=0
KEEP=0
RESULTS=""
RATE=1000            # fixed request rate of the latency runs
LAT_CONNS=16         # connections of the latency runs
SAT_CONNS=64         # connections of the saturation (maximum rate) runs

while [[ $# -gt 0 ]]; do
    case "$1" in
    --quick) QUICK=1; REPS=2; DUR=3; WARM=1 ;;
    --reps) REPS=${2:?--reps needs a number}; shift ;;
    --duration) DUR=${2:?--duration needs seconds}; shift ;;
    --perf) PERF=1 ;;
    --stages) STAGES=1 ;;
    --keep) KEEP=1 ;;
    --results) RESULTS=${2:?--results needs a directory}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument \`$1\`" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
[[ $REPS =~ ^[0-9]+$ && $REPS -ge 1 ]] || { echo "run.sh: --reps must be a positive number" >&2; exit 2; }
[[ $DUR =~ ^[0-9]+$ && $DUR -ge 1 ]] || { echo "run.sh: --duration must be whole seconds" >&2; exit 2; }

say() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { say "error: $*"; exit 1; }

# ---------------------------------------------------------------------------- cleanup
PIDS=()          # every long-running process this script started
SAMPLER=""       # the memory sampler of the load run in progress
LOADGEN=""       # the oha run in progress (waited on in the background, so a signal is seen at once)
WORK=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local p
    for p in $SAMPLER $LOADGEN; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $KEEP -eq 1 || $rc -ne 0 ]]; then
            say "temporary directory kept: $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted: stopping everything"; exit 130' INT TERM
set -E   # the ERR trap below also fires in functions: no silent exit from `set -e`
trap 'say "error: \`$BASH_COMMAND\` failed (exit $?) at line $LINENO"' ERR

# ---------------------------------------------------------------------------- tools
command -v python3 >/dev/null || die "python3 is needed (the statistics helper)"
command -v curl >/dev/null || die "curl is needed (readiness checks); bash scripts/install-test-tools.sh"
command -v cargo >/dev/null || die "cargo is needed"

if ! command -v nginx >/dev/null; then
    [[ $EUID -eq 0 ]] || die "nginx is missing; install it (apt-get install -y nginx) or run as root"
    say "installing nginx from Debian's packages"
    apt-get install -y nginx >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y nginx >/dev/null; }
fi
NGINX=$(command -v nginx)

if ! command -v oha >/dev/null; then
    say "installing oha (cargo install oha --locked; several minutes on 2 cores)"
    cargo install oha --locked >&2
    export PATH="$HOME/.cargo/bin:$PATH"
fi
OHA=$(command -v oha)
# Older oha versions spell the JSON switch `--json`.
if "$OHA" --help 2>&1 | grep -q -- '--output-format'; then
    OHA_JSON=(--output-format json)
else
    OHA_JSON=(--json)
fi
"$OHA" --help 2>&1 | grep -q -- '--cacert' || die "oha at $OHA has no --cert/--key/--cacert; cargo install oha --locked --force"

if [[ -n ${MESHGATE_BENCH_BIN:-} ]]; then
    MG=$(realpath "$MESHGATE_BENCH_BIN")   # for working on this script: skips the build
    say "using $MG (MESHGATE_BENCH_BIN), not building"
else
    say "building meshgate (cargo build --release)"
    (cd "$REPO" && cargo build --release --bin meshgate >&2) || die "cargo build --release failed"
    MG="${CARGO_TARGET_DIR:-$REPO/target}/release/meshgate"
fi
[[ -x $MG ]] || die "no binary at $MG"

# ---------------------------------------------------------------------------- work dir
WORK=$(mktemp -d /tmp/meshgate-bench.XXXXXX)
chmod 755 "$WORK"    # nginx workers (user nobody/www-data) read the static file from here
[[ -n $RESULTS ]] || RESULTS="${CARGO_TARGET_DIR:-$REPO/target}/meshgate-bench/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$RESULTS/oha"
RESULTS=$(cd "$RESULTS" && pwd)
say "work dir $WORK, results in $RESULTS"
# A private copy: a concurrent `cargo build --release` must not swap the binary mid-run.
cp "$MG" "$WORK/meshgate"
MG="$WORK/meshgate"

# Free loopback ports (TCP and UDP both free, as the QUIC tunnel needs UDP).
read -r P_UP P_NA P_NB P_EW P_ET P_EA P_WW P_WT P_WA Q_EW Q_ET Q_EA Q_WW Q_WT Q_WA < <(python3 - 15 <<'EOF'
import socket, sys
n = int(sys.argv[1]); held = []; ports = []
while len(ports) < n:
    t = socket.socket(); t.bind(("127.0.0.1", 0)); p = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", p))
    except OSError:
        t.close(); continue
    held += [t, u]; ports.append(p)
print(*ports)
EOF
)

# Polls `cmd…` until it succeeds (readiness), failing fast if process `pid` died.
wait_until() {
    local what=$1 pid=$2 secs=$3; shift 3
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        kill -0 "$pid" 2>/dev/null || die "$what exited during start-up (see $WORK/logs)"
        ((SECONDS < deadline)) || die "$what not ready after ${secs}s (see $WORK/logs)"
        sleep 0.1
    done
}
mkdir -p "$WORK/logs"

# ---------------------------------------------------------------------------- identities
say "issuing certificates with meshgate's issuer"
ID="$WORK/id"
mkdir -p "$ID"
"$MG" identity init --state "$WORK/east" --trust-domain east.example >/dev/null
"$MG" identity init --state "$WORK/west" --trust-domain west.example >/dev/null
"$MG" identity bundle --state "$WORK/east" >"$ID/east-bundle.json"
"$MG" identity bundle --state "$WORK/west" >"$ID/west-bundle.json"
"$MG" identity bundle --state "$WORK/east" --format pem >"$ID/east-bundle.pem"
"$MG" identity bundle --state "$WORK/west" --format pem >"$ID/west-bundle.pem"
# The client (same identity for both proxied paths), and the two nginx proxies: A in east,
# B in west, each with a listener certificate for localhost/127.0.0.1.
"$MG" identity issue --state "$WORK/east" --spiffe-id spiffe://east.example/ns/shop/sa/web \
    --out "$ID/web" --ttl 24h >/dev/null
"$MG" identity issue --state "$WORK/east" --spiffe-id spiffe://east.example/ns/edge/sa/nginx-a \
    --dns-name localhost --ip 127.0.0.1 --out "$ID/nginx-a" --ttl 24h >/dev/null
"$MG" identity issue --state "$WORK/west" --spiffe-id spiffe://west.example/ns/edge/sa/nginx-b \
    --dns-name localhost --ip 127.0.0.1 --out "$ID/nginx-b" --ttl 24h >/dev/null
CLIENT_TLS=(--cert "$ID/web/svid.pem" --key "$ID/web/key.pem" --cacert "$ID/east-bundle.pem")

# ---------------------------------------------------------------------------- nginx
# One prefix per instance; `daemon off` keeps the master our child, so its pid is $!.
nginx_conf() { # name, server block
    local dir="$WORK/nginx-$1"
    mkdir -p "$dir/logs"
    cat >"$dir/nginx.conf" <<EOF
worker_processes auto;
daemon off;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
$2
}
EOF
}
start_nginx() { # name → sets NGINX_PID
    local dir="$WORK/nginx-$1"
    "$NGINX" -t -q -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log" \
        || die "nginx $1: invalid configuration ($dir/nginx.conf)"
    "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log" \
        >"$WORK/logs/nginx-$1.out" 2>&1 &
    NGINX_PID=$!
    PIDS+=("$NGINX_PID")
}

say "starting the upstream (nginx, 1 KiB static file) on 127.0.0.1:$P_UP"
mkdir -p "$WORK/www"
head -c 1024 /dev/zero | tr '\0' 'x' >"$WORK/www/body"
chmod -R a+rX "$WORK/www"
nginx_conf upstream "    server {
        listen 127.0.0.1:$P_UP reuseport backlog=4096;
        location / { root $WORK/www; default_type application/octet-stream; try_files /body =404; }
    }"
sed -i 's/^worker_processes auto;/worker_processes 1;/' "$WORK/nginx-upstream/nginx.conf"
start_nginx upstream
UP_PID=$NGINX_PID
wait_until "upstream nginx" "$UP_PID" 20 curl -fsS "http://127.0.0.1:$P_UP/v1/orders/1"

say "starting the nginx mTLS pair: A on :$P_NA → B on :$P_NB"
nginx_conf b "    upstream app { server 127.0.0.1:$P_UP; keepalive 64; }
    server {
        listen 127.0.0.1:$P_NB ssl reuseport backlog=4096;
        ssl_certificate $ID/nginx-b/svid.pem;
        ssl_certificate_key $ID/nginx-b/key.pem;
        ssl_client_certificate $ID/east-bundle.pem;   # A's identity comes from east
        ssl_verify_client on;
        ssl_verify_depth 3;
        ssl_protocols TLSv1.3;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
    }"
nginx_conf a "    upstream pair_b { server 127.0.0.1:$P_NB; keepalive 64; }
    server {
        listen 127.0.0.1:$P_NA ssl reuseport backlog=4096;
        ssl_certificate $ID/nginx-a/svid.pem;
        ssl_certificate_key $ID/nginx-a/key.pem;
        ssl_client_certificate $ID/east-bundle.pem;   # workloads of east
        ssl_verify_client on;
        ssl_verify_depth 3;
        ssl_protocols TLSv1.3;
        location / {
            proxy_pass https://pair_b;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_ssl_certificate $ID/nginx-a/svid.pem;
            proxy_ssl_certificate_key $ID/nginx-a/key.pem;
            proxy_ssl_trusted_certificate $ID/west-bundle.pem;
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 3;
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            proxy_ssl_protocols TLSv1.3;
        }
    }"
start_nginx b
NB_PID=$NGINX_PID
start_nginx a
NA_PID=$NGINX_PID
NGINX_URL="https://localhost:$P_NA/v1/orders/1"
wait_until "nginx pair" "$NA_PID" 20 curl -fsS --cacert "$ID/east-bundle.pem" \
    --cert "$ID/web/svid.pem" --key "$ID/web/key.pem" "$NGINX_URL"
# A client without a certificate must be refused by A (the pair really does mTLS).
if curl -fsS --cacert "$ID/east-bundle.pem" "$NGINX_URL" >/dev/null 2>&1; then
    die "nginx A accepted a client without a certificate"
fi

# ---------------------------------------------------------------------------- meshgate
say "starting meshgate: east workload :$P_EW → QUIC :$P_WT → west → upstream"
mkdir -p "$WORK/policies"
cat >"$WORK/policies/bench.cedar" <<'EOF'
// The benchmark's client may read orders in west; the quota is charged on every request
// but is far above the offered load.
@id("bench-web-reads-orders")
@quota("1000000/s burst 100000")
permit (
  principal == Workload::"spiffe://east.example/ns/shop/sa/web",
  action in Action::"read",
  resource == Service::"orders.shop.west"
)
when { context.mtls };

@id("no-admin-paths")
forbid (principal, action, resource)
when { context.path like "/admin/*" || context.path == "/admin" };
EOF
"$MG" policy validate "$WORK/policies" >"$WORK/logs/policy-validate.out" 2>&1 \
    || die "benchmark policies invalid: $(cat "$WORK/logs/policy-validate.out")"
# One pair: west (the destination) and east, each in its own copy of the state, with the
# decision log in the given durability mode.
mg_pair() { # name durability east-workload east-tunnel east-admin west-workload west-tunnel west-admin
    local name=$1 mode=$2
    mkdir -p "$WORK/$name"
    cp -a "$WORK/east" "$WORK/$name/east"
    cp -a "$WORK/west" "$WORK/$name/west"
    cat >"$WORK/$name/west.toml" <<EOT
cluster = "west"
trust_domain = "west.example"
state_dir = "$WORK/$name/west"

[listeners]
workload = "127.0.0.1:$6"
tunnel = "127.0.0.1:$7"
admin = "127.0.0.1:$8"

[policy]
dir = "$WORK/policies"

[audit]
durability = "$mode"

[[services]]
name = "orders"
namespace = "shop"
endpoints = ["127.0.0.1:$P_UP"]
export_to = ["east"]
timeout = "5s"

[[peers]]
cluster = "east"
trust_domain = "east.example"
gateways = ["127.0.0.1:$4"]
bundle = "$ID/east-bundle.json"
EOT
    cat >"$WORK/$name/east.toml" <<EOT
cluster = "east"
trust_domain = "east.example"
state_dir = "$WORK/$name/east"

[listeners]
workload = "127.0.0.1:$3"
tunnel = "127.0.0.1:$4"
admin = "127.0.0.1:$5"

[policy]
dir = "$WORK/policies"

[audit]
durability = "$mode"

[[peers]]
cluster = "west"
trust_domain = "west.example"
gateways = ["127.0.0.1:$7"]
bundle = "$ID/west-bundle.json"
services = ["orders.shop"]
EOT
    "$MG" gateway --config "$WORK/$name/west.toml" >"$WORK/logs/$name-west.out" 2>&1 &
    PAIR_WEST=$!
    PIDS+=("$PAIR_WEST")
    "$MG" gateway --config "$WORK/$name/east.toml" >"$WORK/logs/$name-east.out" 2>&1 &
    PAIR_EAST=$!
    PIDS+=("$PAIR_EAST")
    wait_until "meshgate $name west" "$PAIR_WEST" 60 curl -fsS "http://127.0.0.1:$8/readyz"
    wait_until "meshgate $name east" "$PAIR_EAST" 60 curl -fsS "http://127.0.0.1:$5/readyz"
    local url="https://localhost:$3/v1/orders/1"
    wait_until "meshgate $name pair" "$PAIR_EAST" 60 curl -fsS --cacert "$ID/east-bundle.pem" \
        --cert "$ID/web/svid.pem" --key "$ID/web/key.pem" -H "host: $MG_HOST" "$url"
    curl -fsS -D "$WORK/logs/$name-head.txt" -o /dev/null --cacert "$ID/east-bundle.pem" \
        --cert "$ID/web/svid.pem" --key "$ID/web/key.pem" -H "host: $MG_HOST" "$url"
    grep -qi '^x-meshgate-decision-id:' "$WORK/logs/$name-head.txt" \
        || die "meshgate $name answered without x-meshgate-decision-id (enforcement not on the path?)"
}

# Where one request's time goes, stage by stage, from a gateway's stage counters.
stage_table() { # label admin-port
    curl -fsS "http://127.0.0.1:$2/metrics" | python3 -c '
import re, sys
label = sys.argv[1]
secs, runs = {}, {}
for line in sys.stdin:
    m = re.match(r"meshgate_stage_(seconds|runs)_total\{stage=\"([a-z_]+)\"\} ([0-9.e+-]+)", line)
    if m:
        (secs if m.group(1) == "seconds" else runs)[m.group(2)] = float(m.group(3))
print(f"| stage ({label}) | runs | mean µs |")
print("|---|---:|---:|")
for stage, n in runs.items():
    if n:
        print(f"| {stage} | {n:.0f} | {secs.get(stage, 0) / n * 1e6:.1f} |")
' "$1"
}

export RUST_LOG=${RUST_LOG:-warn}   # the gateway's default: no per-request access log
MG_HOST="orders.shop.west.mesh"
mg_pair process process "$P_EW" "$P_ET" "$P_EA" "$P_WW" "$P_WT" "$P_WA"
EAST_PID=$PAIR_EAST
WEST_PID=$PAIR_WEST
MG_URL="https://localhost:$P_EW/v1/orders/1"

if [[ $STAGES -eq 1 ]]; then
    say "stages: 2000 requests at 200 rps through the process-mode pair"
    "$OHA" -n 2000 -q 200 -c 4 --no-tui "${OHA_JSON[@]}" "${CLIENT_TLS[@]}" --host "$MG_HOST" \
        "$MG_URL" >"$RESULTS/stages-oha.json" 2>"$WORK/logs/oha.err" || die "oha failed"
    {
        echo "Mean wall time per run of each stage (source stages on east, destination"
        echo "stages and the decision on west; admit and record run on both):"
        echo
        stage_table "east" "$P_EA"
        echo
        stage_table "west" "$P_WA"
    } | tee "$RESULTS/stages.md"
    exit 0
fi

mg_pair power power "$Q_EW" "$Q_ET" "$Q_EA" "$Q_WW" "$Q_WT" "$Q_WA"
EAST2_PID=$PAIR_EAST
WEST2_PID=$PAIR_WEST
MG2_URL="https://localhost:$Q_EW/v1/orders/1"

# ---------------------------------------------------------------------------- measuring
NGINX_PIDS=("$NA_PID" $(pgrep -P "$NA_PID") "$NB_PID" $(pgrep -P "$NB_PID"))
MG_PIDS=("$EAST_PID" "$WEST_PID")
MG2_PIDS=("$EAST2_PID" "$WEST2_PID")
CLK_TCK=$(getconf CLK_TCK)

pids_of() {
    case "$1" in
    direct) echo "" ;;
    nginx) echo "${NGINX_PIDS[*]}" ;;
    meshgate) echo "${MG_PIDS[*]}" ;;
    meshgate-power) echo "${MG2_PIDS[*]}" ;;
    esac
}
# utime+stime (clock ticks) summed over pids: fields 14 and 15 of /proc/<pid>/stat.
cpu_ticks() {
    local sum=0 p rest
    for p in "$@"; do
        rest=$(<"/proc/$p/stat") || die "process $p is gone"
        rest=${rest##*) }
        read -r -a f <<<"$rest"
        sum=$((sum + f[11] + f[12]))
    done
    echo "$sum"
}
# "RSS PSS MAXRSS" (KiB): RSS and PSS summed over pids, and the largest RSS of one of them.
# RSS counts pages shared between nginx's master and workers once per process; PSS divides
# them among the sharers (fairer to many processes).
mem_kib() {
    local p
    for p in "$@"; do cat "/proc/$p/smaps_rollup" || die "process $p is gone"; done \
        | awk '/^Rss:/ {r += $2; if ($2 > m) m = $2} /^Pss:/ {s += $2} END {print r + 0, s + 0, m + 0}'
}
alive_check() {
    local p
    for p in "$UP_PID" "${NGINX_PIDS[@]}" "${MG_PIDS[@]}" "${MG2_PIDS[@]}"; do
        kill -0 "$p" 2>/dev/null || die "process $p died during the benchmark (see $WORK/logs)"
    done
}
url_of() { case "$1" in direct) echo "http://127.0.0.1:$P_UP/v1/orders/1" ;; nginx) echo "$NGINX_URL" ;; meshgate) echo "$MG_URL" ;; meshgate-power) echo "$MG2_URL" ;; esac; }
oha_args_of() {
    case "$1" in
    direct) OHA_PATH_ARGS=() ;;
    nginx) OHA_PATH_ARGS=("${CLIENT_TLS[@]}") ;;
    meshgate | meshgate-power) OHA_PATH_ARGS=("${CLIENT_TLS[@]}" --host "$MG_HOST") ;;
    esac
}

SEQ=0
RUNS="$RESULTS/runs.tsv"
printf 'seq\tphase\trep\tpath\tfile\tcpu_ticks\trss_max_kib\tpss_max_kib\tloadavg1\trss_one_max_kib\n' >"$RUNS"

# run_oha PHASE REP PATH SECONDS MODE(fixed|max): one bounded oha run, CPU and RSS sampled.
run_oha() {
    local phase=$1 rep=$2 path=$3 secs=$4 mode=$5
    local file="$RESULTS/oha/$(printf '%03d' "$SEQ")-$phase-r$rep-$path.json"
    local pids; read -r -a pids <<<"$(pids_of "$path")"
    local load=()
    if [[ $mode == fixed ]]; then
        load=(-q "$RATE" -c "$LAT_CONNS" --latency-correction)
    else
        load=(-c "$SAT_CONNS")
    fi
    oha_args_of "$path"
    alive_check
    local t0=0 memfile="$WORK/mem.$SEQ" sampler=""
    echo "0 0 0" >"$memfile"
    if [[ ${#pids[@]} -gt 0 ]]; then
        t0=$(cpu_ticks "${pids[@]}")
        # Stops by itself when this script or a measured process is gone.
        (   rmax=0 pmax=0 omax=0
            while kill -0 "$$" 2>/dev/null; do
                for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || exit 0; done
                read -r r p o < <(mem_kib "${pids[@]}" 2>/dev/null) || exit 0
                ((r > rmax)) && rmax=$r
                ((p > pmax)) && pmax=$p
                ((o > omax)) && omax=$o
                echo "$rmax $pmax $omax" >"$memfile.tmp" && mv -f "$memfile.tmp" "$memfile"
                sleep 0.25
            done ) &
        sampler=$!
        SAMPLER=$sampler
    fi
    local rc=0
    timeout --kill-after=5 $((secs + 60)) "$OHA" -z "${secs}s" "${load[@]}" --no-tui "${OHA_JSON[@]}" \
        "${OHA_PATH_ARGS[@]}" "$(url_of "$path")" >"$file" 2>"$WORK/logs/oha.err" &
    LOADGEN=$!
    wait "$LOADGEN" || rc=$?
    LOADGEN=""
    local dt=0
    if [[ -n $sampler ]]; then
        kill "$sampler" 2>/dev/null || true
        wait "$sampler" 2>/dev/null || true
        SAMPLER=""
        dt=$(($(cpu_ticks "${pids[@]}") - t0))
    fi
    [[ $rc -eq 0 ]] || die "oha failed ($rc) on $path: $(head -c 500 "$WORK/logs/oha.err")"
    if [[ $phase != warmup ]]; then
        local rmax=0 pmax=0 omax=0
        read -r rmax pmax omax <"$memfile" || die "no memory sample for run $SEQ"
        printf '%d\t%s\t%d\t%s\t%s\t%d\t%d\t%d\t%s\t%d\n' "$SEQ" "$phase" "$rep" "$path" \
            "$(basename "$file")" "$dt" "$rmax" "$pmax" "$(cut -d' ' -f1 /proc/loadavg)" "$omax" >>"$RUNS"
    fi
    SEQ=$((SEQ + 1))
}

say "warming up every path (${WARM}s each, not recorded)"
for path in direct nginx meshgate meshgate-power; do run_oha warmup 0 "$path" "$WARM" fixed; done

# Idle RSS: after the warm-up, no load.
{
    printf 'path\trss_idle_kib\tpss_idle_kib\trss_one_idle_kib\n'
    printf 'nginx\t%s\t%s\t%s\n' $(mem_kib "${NGINX_PIDS[@]}")
    printf 'meshgate\t%s\t%s\t%s\n' $(mem_kib "${MG_PIDS[@]}")
    printf 'meshgate-power\t%s\t%s\t%s\n' $(mem_kib "${MG2_PIDS[@]}")
} >"$RESULTS/idle.tsv"

loadavg_start=$(cut -d' ' -f1-3 /proc/loadavg)
# What else is using the CPU right now (the machine is shared).
ps -eo pcpu,etime,comm --sort=-pcpu | head -12 >"$RESULTS/busy-at-start.txt" || true
say "latency: $REPS reps × (direct, 3 proxied, direct), ${DUR}s each at $RATE rps, $LAT_CONNS connections"
for rep in $(seq 1 "$REPS"); do
    case $((rep % 3)) in
    1) order=(direct nginx meshgate meshgate-power direct) ;;
    2) order=(direct meshgate meshgate-power nginx direct) ;;
    0) order=(direct meshgate-power nginx meshgate direct) ;;
    esac
    for path in "${order[@]}"; do
        run_oha latency "$rep" "$path" "$DUR" fixed
    done
    say "  latency rep $rep/$REPS done (load $(cut -d' ' -f1 /proc/loadavg))"
done

say "maximum rate: $REPS reps × 4 paths, ${DUR}s each, $SAT_CONNS connections, unthrottled"
for rep in $(seq 1 "$REPS"); do
    case $((rep % 4)) in
    1) order=(direct nginx meshgate meshgate-power) ;;
    2) order=(nginx meshgate meshgate-power direct) ;;
    3) order=(meshgate meshgate-power direct nginx) ;;
    0) order=(meshgate-power direct nginx meshgate) ;;
    esac
    for path in "${order[@]}"; do
        run_oha saturation "$rep" "$path" "$DUR" max
    done
    say "  saturation rep $rep/$REPS done (load $(cut -d' ' -f1 /proc/loadavg))"
done
loadavg_end=$(cut -d' ' -f1-3 /proc/loadavg)

# The decision log really was on: west counted its decisions.
curl -fsS "http://127.0.0.1:$P_WA/metrics" | grep '^meshgate_requests' >"$RESULTS/west-metrics.txt" || true
{
    stage_table "east, process mode" "$P_EA"
    echo
    stage_table "west, process mode" "$P_WA"
    echo
    stage_table "west, power mode" "$Q_WA"
} >"$RESULTS/stages.md" 2>/dev/null || true

if [[ $PERF -eq 1 ]]; then
    if command -v perf >/dev/null; then
        # 1. Where the CPU goes at saturation: a flat profile (the release build has symbols
        #    but no frame pointers, so no call graphs), per gateway and per thread.
        say "profiling both gateways (perf record during a ${DUR}s saturation run, not recorded)"
        perf_pids=()
        for gw in east:$EAST_PID west:$WEST_PID; do
            perf record -F 999 -o "$RESULTS/perf-${gw%%:*}.data" -p "${gw#*:}" \
                >"$WORK/logs/perf-${gw%%:*}.out" 2>&1 &
            perf_pids+=($!)
            PIDS+=($!)
        done
        run_oha warmup 0 meshgate "$DUR" max
        for p in "${perf_pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
        for p in "${perf_pids[@]}"; do wait "$p" 2>/dev/null || true; done
        for gw in east west; do
            for sort in symbol dso comm; do
                perf report -i "$RESULTS/perf-$gw.data" --no-children --stdio --sort "$sort" \
                    --percent-limit 0.3 2>/dev/null \
                    | grep -v '^#' | grep -v '^$' | sed 's/ *$//' \
                    >"$RESULTS/perf-$gw-$sort.txt" || true
            done
        done
        # 2. Where the time goes at 1000 rps: system calls of the destination gateway
        #    (count and latency, e.g. the decision log's fsyncs) during a fixed-rate run.
        say "tracing west's system calls (perf trace -s during a ${DUR}s run at $RATE rps, not recorded)"
        perf trace -s -p "$WEST_PID" -o "$RESULTS/perf-trace-west.txt" >/dev/null 2>&1 &
        trace_pid=$!
        PIDS+=("$trace_pid")
        run_oha warmup 0 meshgate "$DUR" fixed
        cp "$RESULTS/oha/$(printf '%03d' $((SEQ - 1)))-warmup-r0-meshgate.json" \
            "$RESULTS/perf-trace-oha.json" 2>/dev/null || true
        kill -INT "$trace_pid" 2>/dev/null || true
        wait "$trace_pid" 2>/dev/null || true
    else
        say "perf not installed: --perf skipped"
    fi
fi

# ---------------------------------------------------------------------------- report
mg_version() {
    local rev
    if rev=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null); then
        git -C "$REPO" diff --quiet HEAD 2>/dev/null && echo "$rev" || echo "$rev (+uncommitted changes)"
    else
        echo "${MESHGATE_BENCH_LABEL:-unknown (not a git checkout)}"
    fi
}
cat >"$RESULTS/machine.txt" <<EOF
date_utc	$(date -u +%Y-%m-%dT%H:%M:%SZ)
nproc	$(nproc)
cpu	$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
kernel	$(uname -r)
loadavg_start	$loadavg_start
loadavg_end	$loadavg_end
nginx	$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')
oha	$("$OHA" --version 2>&1 | head -1)
meshgate	$(mg_version)
mode	$([[ $QUICK -eq 1 ]] && echo quick || echo full), reps=$REPS, duration=${DUR}s, rate=$RATE, latency_conns=$LAT_CONNS, saturation_conns=$SAT_CONNS
clk_tck	$CLK_TCK
EOF
BENCH_RATE=$RATE BENCH_SAT_CONNS=$SAT_CONNS python3 "$REPO/benches/report.py" "$RESULTS" | tee "$RESULTS/report.md"
say "results: $RESULTS (report.md, runs.tsv, oha/*.json)"
