#!/bin/bash
# Instructions per cached request, counted by valgrind's callgrind: immune
# to the noise of other processes on the machine, unlike wall-clock ratios.
#
#   benches/callgrind.sh TARGET REQUESTS [IN_FLIGHT]
#
# TARGET: grpc (cached GetIdToken), http (the metadata endpoint's cached
# identity request), echo-grpc or echo-http (the deployed bench's bare
# servers). gRPC runs 8 connections with IN_FLIGHT (default 8) calls in
# flight; HTTP runs IN_FLIGHT keep-alive connections, one request each at a
# time. The server runs under callgrind with instrumentation off; after a
# warm-up (the token cached, connections open) it is switched on for exactly
# REQUESTS requests and dumped. Binaries: BROKER (default
# target/release/token-broker) and BENCH (the deployed bench executable,
# default the newest target/release/deps/deployed-*; build it with
# `cargo bench --bench deployed --no-run`). The echo-http target answers the
# body the last http run fetched (run http first).
#
# Prints the load generator's figures, the instructions per request, and
# the same without tokio's blocking pool: the metadata endpoint looks up the
# process behind each new TCP connection there, once per connection.
set -euo pipefail
TARGET=$1
N=$2
INF=${3:-8}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BROKER=${BROKER:-$ROOT/target/release/token-broker}
BENCH=${BENCH:-$(ls -t "$ROOT"/target/release/deps/deployed-* | grep -v '\.d$' | head -1)}
D=$(mktemp -d /tmp/tb-callgrind.XXXXXX)
BODY_FILE=${TMPDIR:-/tmp}/tb-callgrind-body.txt
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
EPORT=$(port)
MPORT=$(port)
AUD=https://hot-service-abc123-uc.a.run.app
"$BROKER" emulator --listen 127.0.0.1:$EPORT >"$D/emulator.log" 2>&1 &
EMU=$!
cleanup() { kill ${SRV:-} $EMU 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
cat >"$D/config.toml" <<C
[server]
socket_path = "$D/broker.sock"

[[identities]]
name = "default"
source = "metadata"
metadata_host = "127.0.0.1:$EPORT"

[metadata_endpoint]
listen = "127.0.0.1:$MPORT"
C
sleep 0.5
VG=(valgrind --tool=callgrind --instr-atstart=no "--callgrind-out-file=$D/callgrind.out")
case $TARGET in
grpc | http)
    # Default logging (info, text), stderr appended to a file, as deployed.
    env -u RUST_LOG "${VG[@]}" "$BROKER" serve --config "$D/config.toml" >/dev/null 2>>"$D/broker.log" &
    SRV=$!
    for _ in $(seq 400); do [ -S "$D/broker.sock" ] && break; sleep 0.1; done
    sleep 1
    ;;
echo-grpc)
    DEPLOYED_ROLE=echo-grpc DEPLOYED_SOCKET="$D/echo.sock" "${VG[@]}" "$BENCH" >"$D/echo.out" 2>"$D/echo.err" &
    SRV=$!
    for _ in $(seq 400); do [ -S "$D/echo.sock" ] && break; sleep 0.1; done
    ;;
echo-http)
    DEPLOYED_ROLE=echo-http DEPLOYED_BODY="$(cat "$BODY_FILE")" DEPLOYED_CONTENT_TYPE="text/html; charset=utf-8" \
        "${VG[@]}" "$BENCH" >"$D/echo.out" 2>"$D/echo.err" &
    SRV=$!
    for _ in $(seq 400); do [ -s "$D/echo.out" ] && break; sleep 0.1; done
    ;;
*) echo "unknown target $TARGET" >&2; exit 2 ;;
esac
load() {
    local total=$1
    local common=(DEPLOYED_ROLE=load DEPLOYED_IN_FLIGHT=$INF DEPLOYED_TOTAL=$total DEPLOYED_WARMUP=0)
    case $TARGET in
    grpc) env "${common[@]}" DEPLOYED_TARGET=broker DEPLOYED_SOCKET="$D/broker.sock" DEPLOYED_CONNECTIONS=8 "$BENCH" ;;
    echo-grpc)
        # The echo reply padded to about the broker's (1,250 bytes).
        env "${common[@]}" DEPLOYED_TARGET=echo DEPLOYED_SOCKET="$D/echo.sock" DEPLOYED_CONNECTIONS=8 \
            DEPLOYED_MESSAGE="$(printf 'm%.0s' $(seq ${#AUD}))" DEPLOYED_PADDING=${PADDING:-1206} "$BENCH" ;;
    http) env "${common[@]}" DEPLOYED_TARGET=http DEPLOYED_ADDR=127.0.0.1:$MPORT "$BENCH" ;;
    echo-http) env "${common[@]}" DEPLOYED_TARGET=http DEPLOYED_ADDR="$(head -1 "$D/echo.out")" "$BENCH" ;;
    esac
}
load $((INF * 4 > 200 ? INF * 4 : 200)) >/dev/null
if [ "$TARGET" = http ]; then
    curl -s -H 'Metadata-Flavor: Google' \
        "http://127.0.0.1:$MPORT/computeMetadata/v1/instance/service-accounts/default/identity?audience=https%3A%2F%2Fhot-service-abc123-uc.a.run.app&format=full" \
        >"$BODY_FILE"
fi
callgrind_control -i on $SRV >/dev/null 2>&1
load "$N" >"$D/load.out"
callgrind_control -d $SRV >/dev/null 2>&1
sleep 1
DUMP=$(ls "$D"/callgrind.out.* | sort -t. -k3 -n | head -1)
IR=$(callgrind_annotate "$DUMP" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}')
BLOCKING=$(callgrind_annotate --inclusive=yes "$DUMP" 2>/dev/null | awk '/blocking::pool::Inner::run / && !done {gsub(",", "", $1); print $1; done = 1}')
BLOCKING=${BLOCKING:-0}
# The load generator rounds REQUESTS up to a multiple of IN_FLIGHT.
read -r COUNT P50 P99 WALL <"$D/load.out"
echo "$TARGET: $COUNT requests, in flight $INF, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "  instructions per request: $((IR / COUNT)); without the blocking pool: $(((IR - BLOCKING) / COUNT))"
echo "  profile: callgrind_annotate --inclusive=yes $DUMP"
