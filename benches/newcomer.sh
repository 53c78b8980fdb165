#!/usr/bin/env bash
# Issue 16.7, measured as a newcomer meets it: a fresh clone of REPO
# (default: this checkout) with an empty cargo home, so every crate is
# downloaded as well as built, then `cargo run --release -- serve --demo`
# and the token command it prints. Prints the time to the first token.
#   benches/newcomer.sh [REPO]
set -euo pipefail
repo=${1:-$(cd "$(dirname "$0")/.." && pwd)}
work=$(mktemp -d /tmp/tb-newcomer-XXXXXX)
trap 'kill "$pid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
pid=
git clone -q "$repo" "$work/clone"
cd "$work/clone"
export CARGO_HOME="$work/cargo-home"
start=$(date +%s.%N)
cargo run --release -- serve --demo >"$work/out" 2>"$work/err" &
pid=$!
until grep -q "Fetch a token with" "$work/out" "$work/err" 2>/dev/null; do
    sleep 0.5
    kill -0 "$pid" 2>/dev/null || { echo "the demo exited:"; tail "$work/err"; exit 1; }
done
command=$(grep -h -A2 "Fetch a token with" "$work/out" "$work/err" | grep "token --socket" | head -1)
token=$(eval "$command")
end=$(date +%s.%N)
grep -h "Finished" "$work/err" | tail -1
echo "first token (${#token} bytes) after $(echo "$end - $start" | bc) s from a fresh clone"
