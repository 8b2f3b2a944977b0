#!/usr/bin/env bash
# Load benchmark: authenticated HTTPS keep-alive requests through linkgate,
# compared in one run with
#   (a) baseline: a bare pingora + rustls proxy without auth (benches/baseline_proxy.rs)
#       target: linkgate >= 0.95x its requests/s
#   (b) HAProxy (Debian's, >= 2.5) doing the same job with jwt_verify: TLS termination,
#       HS256 check of the session token in a cookie, exp check, identity header
#       target: linkgate >= 1.2x its requests/s, p99 no worse
#   (c) linkgate answering 401 (no session cookie) vs forwarding
#       target: 401s/s >= 0.9x forwarded/s
# For each run: requests/s, p99 latency, and requests per proxy CPU-second (utime +
# stime of the proxy process, from /proc/PID/stat).
#
# Every client sends the same request: the baseline gets linkgate's session cookie too (it
# forwards it), HAProxy its HS256 token in a cookie. The proxies run side by side (an idle
# one costs nothing) and are measured in turn, ROUNDS times; the report gives each figure's
# median over the rounds, as a shared VM's neighbours skew single runs by 20 % and more.
#
# Every proxy runs pinned to PROXY_CPU with one worker thread, wrk to LOAD_CPU
# (wrk -t1), the upstream (nginx, fixed small 200) to UPSTREAM_CPU. All listeners
# are on 127.0.0.1; ports are picked free. wrk speaks HTTP/1.1 with keep-alive.
#
# INSTR=1 runs the same rounds with each proxy under valgrind's callgrind and reports user-space
# instructions per request instead: a figure that, unlike req/s on a shared VM, does not move
# with the neighbours' load (kernel time is not in it). Timings in that mode are meaningless.
# CACHE=1 (with INSTR=1) adds callgrind's cache simulation and reports first-level instruction
# and data read misses per request too: on this path they, more than instructions, set the pace
# (a pingora proxy's hot code does not fit a 32 KB instruction cache).
#
# Usage: benches/load.sh
# Environment (defaults):
#   DURATION=5s  WARMUP=1s  ROUNDS=5  CONNS=50  THREADS=1 (proxy worker threads)
#   PROXY_CPU=0  LOAD_CPU=1  UPSTREAM_CPU=$LOAD_CPU
#   ONLY=baseline,haproxy,linkgate   subset of runs (linkgate covers forwarded + 401)
#   STRICT=0     1: exit 1 when a target is missed
#   KEEP=0       1: keep the work directory (configs, logs, wrk outputs)
#   INSTR=0      1: instructions per request under callgrind (then DURATION=10s WARMUP=2s
#                ROUNDS=1 CONNS=4: each run's few TLS handshakes are counted, and cost alike)
#   CACHE=0      1 (with INSTR=1): also L1 instruction and data read misses per request
#   CARGO_TARGET_DIR=/var/tmp/linkgate-target
# Needs: wrk haproxy nginx openssl curl python3 taskset (apt-installed when missing
# and running as root).
set -euo pipefail

cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/linkgate-target}

INSTR=${INSTR:-0}
CACHE=${CACHE:-0}
[[ $CACHE == 1 && $INSTR != 1 ]] && { echo "[load] CACHE=1 needs INSTR=1" >&2; exit 1; }
if [[ $INSTR == 1 ]]; then
    DURATION=${DURATION:-10s} WARMUP=${WARMUP:-2s} ROUNDS=${ROUNDS:-1} CONNS=${CONNS:-4}
fi
DURATION=${DURATION:-5s}
WARMUP=${WARMUP:-1s}
ROUNDS=${ROUNDS:-5}
CONNS=${CONNS:-50}
THREADS=${THREADS:-1}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
UPSTREAM_CPU=${UPSTREAM_CPU:-$LOAD_CPU}
ONLY=${ONLY:-baseline,haproxy,linkgate}
STRICT=${STRICT:-0}
KEEP=${KEEP:-0}

log() { printf '[load] %s\n' "$*" >&2; }
die() {
    printf '[load] ERROR: %s\n' "$*" >&2
    exit 1
}
wants() { [[ ",$ONLY," == *",$1,"* ]]; }

# --- Tools ---------------------------------------------------------------------------
declare -A PKG_OF=([wrk]=wrk [haproxy]=haproxy [nginx]=nginx [openssl]=openssl
    [curl]=curl [python3]=python3 [taskset]=util-linux)
[[ $INSTR == 1 ]] && PKG_OF+=([valgrind]=valgrind [callgrind_control]=valgrind)
missing=()
for cmd in "${!PKG_OF[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || [[ -x /usr/sbin/$cmd ]] || missing+=("${PKG_OF[$cmd]}")
done
if ((${#missing[@]})); then
    [[ $(id -u) -eq 0 ]] || die "missing packages: ${missing[*]} (apt-get install them)"
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
export PATH=$PATH:/usr/sbin:/sbin

if wants haproxy; then
    hv=$(haproxy -v | sed -n 's/^HAProxy version \([0-9]*\.[0-9]*\).*/\1/p' | head -1)
    [[ -n $hv ]] || die "cannot read haproxy's version"
    if ! awk -v v="$hv" 'BEGIN { split(v, a, "."); exit !(a[1] > 2 || (a[1] == 2 && a[2] >= 5)) }'; then
        die "HAProxy $hv has no jwt_verify (needs >= 2.5)"
    fi
fi

ncpu=$(nproc)
if ((ncpu < 2)); then
    log "WARNING: $ncpu CPU: proxy and load generator share it; numbers are not comparable"
    PROXY_CPU=0 LOAD_CPU=0 UPSTREAM_CPU=0
fi
CLK_TCK=$(getconf CLK_TCK)
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
read -r LOADAVG _ </proc/loadavg
if awk -v l="$LOADAVG" 'BEGIN { exit !(l > 0.5) }'; then
    log "WARNING: load average $LOADAVG: other work on this machine skews the numbers"
fi

# --- Work directory and cleanup --------------------------------------------------------
WORK=$(mktemp -d /tmp/linkgate-load.XXXXXX)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -INT "$pid" 2>/dev/null || true
    done
    sleep 0.3
    for pid in "${PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ $KEEP == 1 ]]; then
        log "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

declare -A CG_OUT
# start NAME CPU CMD...: runs CMD pinned to CPU in the background; sets $LAST_PID. With
# INSTR=1 a proxy runs under callgrind, instrumented only while measured.
start() {
    local name=$1 cpu=$2 pre=()
    shift 2
    if [[ $INSTR == 1 && $name != nginx ]]; then
        pre=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/$name.cg")
        [[ $CACHE == 1 ]] && pre+=(--cache-sim=yes)
    fi
    taskset -c "$cpu" "${pre[@]}" "$@" >"$WORK/$name.log" 2>&1 &
    LAST_PID=$!
    CG_OUT[$LAST_PID]=$WORK/$name.cg
    PIDS+=("$LAST_PID")
}

# stop PID [SIGNAL]: signal, wait up to 10 s, then SIGKILL.
stop() {
    local pid=$1 sig=${2:-INT} i
    kill -"$sig" "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# wait_up NAME PID URL: until URL answers anything over HTTP(S), or fail.
wait_up() {
    local name=$1 pid=$2 url=$3 i code tries=200
    [[ $INSTR == 1 ]] && tries=1200 # start-up under valgrind takes a while
    for ((i = 0; i < tries; i++)); do
        kill -0 "$pid" 2>/dev/null || {
            tail -20 "$WORK/$name.log" >&2
            die "$name exited during start-up (log above)"
        }
        code=$(curl -k -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true)
        [[ $code != 000 ]] && return 0
        sleep 0.1
    done
    tail -20 "$WORK/$name.log" >&2
    die "$name does not answer on $url"
}

# expect WHAT STATUS BODY_PATTERN CURL_ARGS...: one checked request before measuring.
expect() {
    local what=$1 status=$2 pattern=$3 out code
    shift 3
    out=$(curl -k -s --max-time 30 -w '\n%{http_code}' "$@") || die "$what: curl failed"
    code=${out##*$'\n'}
    [[ $code == "$status" ]] || die "$what: HTTP $code, expected $status (body: ${out%$'\n'*})"
    [[ -z $pattern || $out == *"$pattern"* ]] || die "$what: body lacks '$pattern': ${out%$'\n'*}"
    log "ok: $what -> $code"
}

cpu_ticks() { # utime + stime of a process, all threads, in clock ticks
    local stat
    stat=$(<"/proc/$1/stat")
    stat=${stat##*) }
    awk '{ print $12 + $13 }' <<<"$stat"
}

free_ports() { # N distinct free TCP ports on 127.0.0.1
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

render() { # render TEMPLATE OUT KEY=VALUE...: replaces @KEY@
    local tpl=$1 out=$2 kv expr=()
    shift 2
    for kv in "$@"; do
        expr+=(-e "s|@${kv%%=*}@|${kv#*=}|g")
    done
    sed "${expr[@]}" "$tpl" >"$out"
    if grep -q '@[A-Z_]*@' "$out"; then
        die "unfilled placeholder in $out: $(grep -o '@[A-Z_]*@' "$out" | head -1)"
    fi
}

declare -A RPS P99 RPCPU REQS NON2XX CPUS INSTRS I1MISS D1MISS
ORDER=()

# measure NAME PID URL [wrk args...]: warm-up, then one measured wrk run; appends the
# round's requests/s, p99 (ms) and requests per proxy CPU-second to NAME's lists and adds
# up its requests, non-2xx/3xx answers and proxy CPU-seconds.
measure() {
    local name=$1 pid=$2 url=$3 out t0 t1 rps reqs non2xx p99 cpus
    shift 3
    log "$name: warm-up $WARMUP, then $DURATION with $CONNS connections"
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$WARMUP" "$@" "$url" >"$WORK/$name.warmup" 2>&1 ||
        die "$name: wrk warm-up failed: $(cat "$WORK/$name.warmup")"
    out=$WORK/$name.wrk
    if [[ $INSTR == 1 ]]; then
        callgrind_control -z "$pid" >/dev/null && callgrind_control -i on "$pid" >/dev/null ||
            die "$name: callgrind_control cannot reach pid $pid"
    fi
    t0=$(cpu_ticks "$pid")
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$DURATION" --latency "$@" "$url" >"$out" 2>&1 ||
        die "$name: wrk failed: $(cat "$out")"
    t1=$(cpu_ticks "$pid")
    if [[ $INSTR == 1 ]]; then
        callgrind_control -i off "$pid" >/dev/null
        callgrind_control -d "$pid" >/dev/null
        local dump ir
        dump=$(ls -t "${CG_OUT[$pid]}".* 2>/dev/null | head -1)
        ir=$(awk '/^totals:/ { print $2 }' "$dump" 2>/dev/null)
        [[ -n $ir ]] || die "$name: no callgrind totals in '${dump}'"
        if [[ $CACHE == 1 ]]; then # events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw
            local i1 d1
            read -r i1 d1 < <(awk '/^events:/ { for (i = 2; i <= NF; i++) col[$i] = i }
                /^totals:/ { print $(col["I1mr"]), $(col["D1mr"]) }' "$dump")
            [[ -n $i1 && -n $d1 ]] || die "$name: no cache-miss totals in '${dump}'"
        fi
    fi
    awk '/Requests\/sec|99%|Non-2xx|Socket errors/' "$out" | sed 's/^ */    /' >&2

    rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
    reqs=$(awk '/ requests in / { print $1 }' "$out")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' "$out")
    p99=$(awk '$1 == "99%" {
            v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v)
            f = (u == "us") ? 0.001 : (u == "ms") ? 1 : (u == "s") ? 1000 : (u == "m") ? 60000 : 0
            printf "%.3f", v * f }' "$out")
    cpus=$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", d / hz }')
    [[ -n $rps && -n $p99 && -n $reqs ]] || die "$name: cannot parse wrk output"
    if grep -q 'Socket errors' "$out"; then
        log "WARNING: $name: $(grep 'Socket errors' "$out" | sed 's/^ *//')"
    fi
    [[ -n ${REQS[$name]:-} ]] || ORDER+=("$name")
    RPS[$name]+="$rps "
    P99[$name]+="$p99 "
    RPCPU[$name]+="$(awk -v n="$reqs" -v c="$cpus" 'BEGIN { printf "%.0f", (c > 0) ? n / c : 0 }') "
    REQS[$name]=$((${REQS[$name]:-0} + reqs))
    NON2XX[$name]=$((${NON2XX[$name]:-0} + ${non2xx:-0}))
    CPUS[$name]=$(awk -v a="${CPUS[$name]:-0}" -v b="$cpus" 'BEGIN { printf "%.2f", a + b }')
    if [[ $INSTR == 1 ]]; then
        INSTRS[$name]+="$(awk -v i="$ir" -v n="$reqs" 'BEGIN { printf "%.0f", i / n }') "
        log "    instructions per request: $(awk '{ print $NF }' <<<"${INSTRS[$name]}")"
        if [[ $CACHE == 1 ]]; then
            I1MISS[$name]+="$(awk -v i="$i1" -v n="$reqs" 'BEGIN { printf "%.0f", i / n }') "
            D1MISS[$name]+="$(awk -v i="$d1" -v n="$reqs" 'BEGIN { printf "%.0f", i / n }') "
        fi
    fi
}

median() { # median of the whitespace-separated numbers in $1
    tr ' ' '\n' <<<"$1" | awk 'NF' | sort -g | awk '{ v[NR] = $1 }
        END { if (NR == 0) print 0; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# --- Build -----------------------------------------------------------------------------
log "building release binaries (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
build_args=(--release --bench baseline_proxy)
wants linkgate && build_args+=(--bin linkgate)
cargo build "${build_args[@]}" --message-format=json-render-diagnostics >"$WORK/build.json" ||
    die "cargo build failed"
artifact() { # artifact KIND NAME -> executable path from cargo's JSON messages
    python3 - "$WORK/build.json" "$1" "$2" <<'EOF'
import json, sys
path, kind, name = sys.argv[1:]
exe = ""
for line in open(path):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and t.get("name") == name and kind in t.get("kind", []) and m.get("executable"):
        exe = m["executable"]
print(exe)
EOF
}
BASELINE_BIN=$(artifact bench baseline_proxy)
[[ -x $BASELINE_BIN ]] || die "baseline_proxy executable not found in cargo's output"
if wants linkgate; then
    LINKGATE_BIN=$(artifact bin linkgate)
    [[ -x $LINKGATE_BIN ]] || die "linkgate executable not found in cargo's output"
fi

# --- Shared material: certificate, upstream ------------------------------------------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -days 7 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost 2>/dev/null || die "openssl could not make a certificate"
cat "$WORK/cert.pem" "$WORK/key.pem" >"$WORK/haproxy.pem"

read -r UPSTREAM_PORT BASELINE_PORT HAPROXY_PORT LG_PORT LG_HTTP_PORT LG_ADMIN_PORT <<<"$(free_ports 6)"

mkdir -p "$WORK/nginx-tmp"
render benches/load/nginx.conf.in "$WORK/nginx.conf" DIR="$WORK" UPSTREAM_PORT="$UPSTREAM_PORT"
start nginx "$UPSTREAM_CPU" nginx -c "$WORK/nginx.conf" -p "$WORK" -e "$WORK/nginx.error.log"
NGINX_PID=$LAST_PID
wait_up nginx "$NGINX_PID" "http://127.0.0.1:$UPSTREAM_PORT/"
expect "upstream direct" 200 "ok subject=" "http://127.0.0.1:$UPSTREAM_PORT/"

log "cores: proxy $PROXY_CPU, wrk $LOAD_CPU, upstream $UPSTREAM_CPU; proxy threads $THREADS"

# --- linkgate: started first, so its session cookie is what every client sends ------------
COOKIE=
if wants linkgate; then
    head -c 32 /dev/urandom >"$WORK/session.key"
    openssl rand -hex 32 | tr -d '\n' >"$WORK/tenant.key"
    mkdir -p "$WORK/linkgate-state"
    render benches/load/linkgate.toml.in "$WORK/linkgate.toml" DIR="$WORK" PORT="$LG_PORT" \
        HTTP_PORT="$LG_HTTP_PORT" ADMIN_PORT="$LG_ADMIN_PORT" UPSTREAM_PORT="$UPSTREAM_PORT" \
        THREADS="$THREADS"
    "$LINKGATE_BIN" check-config --config "$WORK/linkgate.toml" || die "linkgate check-config failed"
    start linkgate "$PROXY_CPU" "$LINKGATE_BIN" serve --config "$WORK/linkgate.toml"
    LG_PID=$LAST_PID
    LG_URL=https://localhost:$LG_PORT/
    wait_up linkgate "$LG_PID" "$LG_URL"
    link=$("$LINKGATE_BIN" mint --config "$WORK/linkgate.toml" --tenant bench --sub bench \
        --host "localhost:$LG_PORT") || die "linkgate mint failed"
    link=$(tail -1 <<<"$link" | tr -d '[:space:]')
    redeem=$(curl -k -s -i --max-time 5 "$link") || die "redeeming $link failed"
    status=$(head -1 <<<"$redeem" | awk '{ print $2 }')
    [[ $status == 303 ]] || die "redeeming the magic link: HTTP $status, expected 303: $redeem"
    COOKIE=$(tr -d '\r' <<<"$redeem" | sed -n 's/^[Ss]et-[Cc]ookie: *\([^;]*\).*/\1/p' | head -1)
    [[ $COOKIE == *=* ]] || die "no session cookie in the 303: $redeem"
    log "ok: redeemed the magic link -> 303 with ${COOKIE%%=*}"
    expect "linkgate forwards with a session" 200 "ok subject=bench" -H "Cookie: $COOKIE" "$LG_URL"
    expect "linkgate refuses no session" 401 "session_required" "$LG_URL"
fi

# --- (a) baseline pingora proxy --------------------------------------------------------
BL_ARGS=()
if wants baseline; then
    start baseline "$PROXY_CPU" "$BASELINE_BIN" serve "127.0.0.1:$BASELINE_PORT" \
        "$WORK/cert.pem" "$WORK/key.pem" "127.0.0.1:$UPSTREAM_PORT" "$THREADS"
    BL_PID=$LAST_PID
    BL_URL=https://localhost:$BASELINE_PORT/
    wait_up baseline "$BL_PID" "$BL_URL"
    expect "baseline forwards" 200 "ok subject=" "$BL_URL"
    # The same request bytes as linkgate gets: the baseline forwards the cookie as it is.
    [[ -n $COOKIE ]] && BL_ARGS=(-H "Cookie: $COOKIE")
fi

# --- (b) HAProxy with jwt_verify --------------------------------------------------------
if wants haproxy; then
    HMAC_SECRET=$(openssl rand -hex 32)
    jwt() { # jwt SECRET SUB EXP_OFFSET_SECONDS: HS256 JWT
        python3 - "$@" <<'EOF'
import base64, hashlib, hmac, json, sys, time
secret, sub, off = sys.argv[1], sys.argv[2], int(sys.argv[3])
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
now = int(time.time())
body = b64(json.dumps({"sub": sub, "iat": now, "exp": now + off}, separators=(",", ":")).encode())
sig = b64(hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest())
print(f"{head}.{body}.{sig}")
EOF
    }
    TOKEN=$(jwt "$HMAC_SECRET" bench 86400)
    render benches/load/haproxy.cfg.in "$WORK/haproxy.cfg" DIR="$WORK" PORT="$HAPROXY_PORT" \
        UPSTREAM_PORT="$UPSTREAM_PORT" HMAC_SECRET="$HMAC_SECRET"
    haproxy -c -q -f "$WORK/haproxy.cfg" || die "haproxy rejects $WORK/haproxy.cfg"
    start haproxy "$PROXY_CPU" haproxy -db -f "$WORK/haproxy.cfg"
    HA_PID=$LAST_PID
    HA_URL=https://localhost:$HAPROXY_PORT/
    wait_up haproxy "$HA_PID" "$HA_URL"
    expect "haproxy forwards a valid token" 200 "ok subject=bench" -H "Cookie: session=$TOKEN" "$HA_URL"
    expect "haproxy refuses no token" 401 "" "$HA_URL"
    expect "haproxy refuses a bad signature" 401 "" -H "Cookie: session=$(jwt wrong-secret bench 86400)" "$HA_URL"
    expect "haproxy refuses an expired token" 401 "" -H "Cookie: session=$(jwt "$HMAC_SECRET" bench -60)" "$HA_URL"
fi

# --- Rounds: (a), (c) forwarded, (b), (c) 401 without a session, in turn ------------------
for ((round = 1; round <= ROUNDS; round++)); do
    log "round $round of $ROUNDS"
    # linkgate runs between the two it is compared with.
    if wants baseline; then measure baseline "$BL_PID" "$BL_URL" "${BL_ARGS[@]}"; fi
    if wants linkgate; then measure linkgate "$LG_PID" "$LG_URL" -H "Cookie: $COOKIE"; fi
    if wants haproxy; then measure haproxy "$HA_PID" "$HA_URL" -H "Cookie: session=$TOKEN"; fi
    if wants linkgate; then measure linkgate-401 "$LG_PID" "$LG_URL"; fi
done
if wants linkgate; then
    if [[ ${NON2XX[linkgate]} != 0 ]]; then
        die "linkgate: ${NON2XX[linkgate]} non-2xx answers while forwarding with a session"
    fi
    if [[ ${NON2XX[linkgate-401]} != "${REQS[linkgate-401]}" ]]; then
        die "linkgate-401: only ${NON2XX[linkgate-401]} of ${REQS[linkgate-401]} answers were not 2xx"
    fi
fi
if wants baseline && [[ ${NON2XX[baseline]} != 0 ]]; then die "baseline: ${NON2XX[baseline]} non-2xx answers"; fi
if wants haproxy && [[ ${NON2XX[haproxy]} != 0 ]]; then die "haproxy: ${NON2XX[haproxy]} non-2xx answers"; fi

# --- Report ------------------------------------------------------------------------------
if [[ $INSTR == 1 ]]; then
    echo
    echo "linkgate instruction counts: callgrind, wrk -t1 -c$CONNS -d$DURATION x $ROUNDS round(s); user space only"
    echo "(each run opens $CONNS TLS connections; their handshakes are in the counts)"
    if [[ $CACHE == 1 ]]; then
        printf '%-14s %14s %10s %12s %12s\n' name "instr/request" requests "I1 miss/req" "D1r miss/req"
    else
        printf '%-14s %14s %10s\n' name "instr/request" requests
    fi
    for n in "${ORDER[@]}"; do
        printf '%-14s %14.0f %10d' "$n" "$(median "${INSTRS[$n]}")" "${REQS[$n]}"
        if [[ $CACHE == 1 ]]; then
            printf ' %12.0f %12.0f' "$(median "${I1MISS[$n]}")" "$(median "${D1MISS[$n]}")"
        fi
        echo
    done
    echo
    irat() { # irat LABEL A B [TABLE]: ratio of the median counts in TABLE (default INSTRS)
        local -n table=${4:-INSTRS}
        printf '  %-44s %7.3f\n' "$1" "$(awk -v a="$(median "${table[$2]}")" -v b="$(median "${table[$3]}")" 'BEGIN { print a / b }')"
    }
    tables=(INSTRS)
    [[ $CACHE == 1 ]] && tables+=(I1MISS D1MISS)
    for t in "${tables[@]}"; do
        case $t in
        INSTRS) echo "instructions per request, ratios (lower is cheaper)" ;;
        I1MISS) echo "L1 instruction misses per request, ratios" ;;
        D1MISS) echo "L1 data read misses per request, ratios" ;;
        esac
        if wants linkgate && wants baseline; then irat "linkgate / baseline pingora" linkgate baseline "$t"; fi
        if wants linkgate && wants haproxy; then irat "linkgate / haproxy jwt_verify" linkgate haproxy "$t"; fi
        if wants linkgate; then irat "linkgate 401 / forwarded" linkgate-401 linkgate "$t"; fi
    done
    exit 0
fi
echo
echo "linkgate load benchmark: wrk -t1 -c$CONNS -d$DURATION x $ROUNDS rounds, HTTPS keep-alive, $THREADS proxy thread(s)"
echo "cores: proxy $PROXY_CPU, wrk $LOAD_CPU, upstream $UPSTREAM_CPU; $(nproc) CPUs, $(uname -r); load average at start $LOADAVG"
echo "medians over the rounds; each round's req/s in brackets"
printf '%-14s %12s %10s %12s %10s %12s\n' name "req/s" "p99 ms" "requests" "proxy CPU-s" "req/CPU-s"
for n in "${ORDER[@]}"; do
    printf '%-14s %12.0f %10.2f %12d %10.2f %12d   [%s]\n' "$n" "$(median "${RPS[$n]}")" \
        "$(median "${P99[$n]}")" "${REQS[$n]}" "${CPUS[$n]}" "$(median "${RPCPU[$n]}")" \
        "$(awk '{ for (i = 1; i <= NF; i++) printf "%s%.0f", (i > 1 ? " " : ""), $i }' <<<"${RPS[$n]}")"
done
echo

missed=0
# ratio LABEL A B [TARGET DIR]: A and B are per-round lists; prints the median of the
# per-round ratios A_i/B_i (the two runs of a round are back to back, so the machine's drift
# mostly cancels) and, with a TARGET, whether it is met (DIR ge: at least; le: at most).
ratio() {
    local label=$1 a=$2 b=$3 target=${4:-} dir=${5:-} r verdict=""
    r=$(median "$(awk -v a="$a" -v b="$b" 'BEGIN {
            n = split(a, x, " "); split(b, y, " ")
            for (i = 1; i <= n; i++) if (y[i] > 0) printf "%.4f ", x[i] / y[i] }')")
    r=$(awk -v r="$r" 'BEGIN { printf "%.3f", r }')
    if [[ -n $target ]]; then
        if awk -v r="$r" -v t="$target" -v d="$dir" 'BEGIN { exit !((d == "ge") ? r >= t : r <= t) }'; then
            verdict=ok
        else
            verdict=MISSED
            missed=$((missed + 1))
        fi
        verdict=$(printf 'target %s %-5s %s' "$([[ $dir == ge ]] && echo '>=' || echo '<=')" "$target" "$verdict")
    fi
    printf '  %-44s %7s   %s\n' "$label" "$r" "$verdict"
}
echo "ratios (median of the per-round ratios)"
if wants linkgate && wants baseline; then
    ratio "linkgate / baseline pingora, req/s" "${RPS[linkgate]}" "${RPS[baseline]}" 0.95 ge
    ratio "linkgate / baseline pingora, req/CPU-s" "${RPCPU[linkgate]}" "${RPCPU[baseline]}"
fi
if wants linkgate && wants haproxy; then
    ratio "linkgate / haproxy jwt_verify, req/s" "${RPS[linkgate]}" "${RPS[haproxy]}" 1.2 ge
    ratio "linkgate / haproxy jwt_verify, p99" "${P99[linkgate]}" "${P99[haproxy]}" 1.0 le
    ratio "linkgate / haproxy jwt_verify, req/CPU-s" "${RPCPU[linkgate]}" "${RPCPU[haproxy]}"
fi
if wants linkgate; then
    ratio "linkgate 401 / forwarded, req/s" "${RPS[linkgate-401]}" "${RPS[linkgate]}" 0.9 ge
    ratio "linkgate 401 / forwarded, req/CPU-s" "${RPCPU[linkgate-401]}" "${RPCPU[linkgate]}"
fi
if wants haproxy && wants baseline; then
    ratio "haproxy / baseline pingora, req/s" "${RPS[haproxy]}" "${RPS[baseline]}"
    ratio "haproxy / baseline pingora, req/CPU-s" "${RPCPU[haproxy]}" "${RPCPU[baseline]}"
fi
echo
if ((missed)); then
    echo "$missed target(s) missed"
    [[ $STRICT == 1 ]] && exit 1
else
    echo "all targets met"
fi
exit 0
