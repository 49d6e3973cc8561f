#!/usr/bin/env bash
# Counts the server's instructions per call for Ping (the transport's floor) and for
# VerifyKey on a cached key, under valgrind's callgrind: instruction counts repeat from
# run to run whatever else the machine does, so a change to the hot path can be judged
# by a few hundred instructions where throughput runs differ by 10%.
#
#   bash scripts/callgrind-verify.sh [BINARY] [CALLS]
#
# BINARY defaults to target/release/keywarden (build it first); CALLS to 20000. Needs
# valgrind (Debian's valgrind) and h2load (Debian's nghttp2-client). The server runs on
# SQLite with no rate limits; only the measured calls are counted (start-up, the key's
# issue and a warm-up are zeroed out). It prints instructions per call and leaves the
# profiles (callgrind.ping, callgrind.verify) in a temporary directory for
# `callgrind_annotate --inclusive=yes`.
#
# Note: valgrind hides the CPU's SHA extensions, so SHA-256 runs in software here
# (about 3 400 instructions per hash); on a CPU with SHA-NI it costs a small fraction.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-$root/target/release/keywarden}"
calls="${2:-20000}"
for tool in valgrind callgrind_control h2load python3; do
    command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 2; }
done

dir="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
admin="kwt_$(head -c 30 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 40)"
verifier="kwt_$(head -c 30 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 40)"
sha() { printf %s "$1" | sha256sum | cut -d' ' -f1; }
cat > "$dir/keywarden.toml" <<EOF
listen = "127.0.0.1:$port"
database_url = "sqlite://$dir/keywarden.db"

[[tokens]]
name = "admin"
sha256 = "$(sha "$admin")"
roles = ["admin"]

[[tokens]]
name = "verifier"
sha256 = "$(sha "$verifier")"
roles = ["verifier"]

[rate_limits]
default = []
EOF

RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.%p" \
    "$bin" serve --config "$dir/keywarden.toml" > "$dir/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    grep -q "listening on" "$dir/server.log" && break
    sleep 1
done

export KEYWARDEN_ADDR="http://127.0.0.1:$port" KEYWARDEN_TOKEN="$admin"
export KEYWARDEN_ACTOR=profiler KEYWARDEN_ACTOR_PERMISSIONS=read
"$bin" workspaces create ws_profile --plan pro > /dev/null
key="$("$bin" keys issue --workspace ws_profile --name profile --scope read \
    --owner user:profiler -o json 2>/dev/null | python3 -c 'import json, sys; print(json.load(sys.stdin)["key"])')"
python3 - "$key" "$dir" <<'EOF'
import struct, sys
key, out = sys.argv[1].encode(), sys.argv[2]
message = b"\x0a" + bytes([len(key)]) + key  # VerifyKeyRequest.key, field 1
for name, body in (("verify", message), ("ping", b"")):
    with open(f"{out}/{name}.bin", "wb") as f:
        f.write(b"\x00" + struct.pack(">I", len(body)) + body)
EOF

load() { # load DATA METHOD CALLS
    h2load -n "$3" -c 2 -m 16 --data="$dir/$1.bin" \
        --header='content-type: application/grpc' --header='te: trailers' \
        --header="authorization: Bearer $verifier" \
        "http://127.0.0.1:$port/keywarden.v1.VerifyService/$2" | grep -q "$3 succeeded"
}
# Every answer must be VALID: a key the server did not accept would be cheaper to refuse.
"$bin" verify --token "$verifier" --scope read - <<< "$key" > /dev/null
load verify VerifyKey 2000 && load ping Ping 2000
for method in Ping VerifyKey; do
    data=ping; [ "$method" = VerifyKey ] && data=verify
    callgrind_control -z "$server" > /dev/null
    load "$data" "$method" "$calls"
    callgrind_control -d "$data" "$server" > /dev/null
done
kill "$server"; wait "$server" 2>/dev/null || true
trap - EXIT
ping_file="$(ls "$dir"/callgrind.*.1)"; verify_file="$(ls "$dir"/callgrind.*.2)"
mv "$ping_file" "$dir/callgrind.ping"; mv "$verify_file" "$dir/callgrind.verify"
per_call() { awk -v n="$calls" '/^summary:/ { printf "%.0f", $2 / n }' "$1"; }
ping="$(per_call "$dir/callgrind.ping")"; verify="$(per_call "$dir/callgrind.verify")"
echo "instructions per call: Ping $ping, VerifyKey $verify (VerifyKey's own: $((verify - ping)))"
echo "profiles: $dir/callgrind.ping $dir/callgrind.verify"
