#!/usr/bin/env bash
# ksmplus demo: four python3 workers that each build the same 64 MiB of reference data, first
# without ksmplus, then under the shim with the agent and ksmd. Prints what each worker holds and
# what KSM merged, from the kernel's own per-process counters (/proc/PID/ksm_stat).
# Needs root (it switches ksmd on, and restores every setting it changed on exit).
set -euo pipefail
cd "$(dirname "$0")/.."
WORKERS=${WORKERS:-4} SHARED_MIB=${SHARED_MIB:-64} OWN_MIB=${OWN_MIB:-16}
KSM=/sys/kernel/mm/ksm

die() { echo "demo: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root: the demo switches ksmd on (and restores it afterwards)"
[ -w "$KSM/run" ] || die "this kernel has no writable $KSM (CONFIG_KSM)"
command -v python3 >/dev/null || die "python3 is needed for the workload"

echo "==> building (release)"
cargo build --release -q -p ksmplus-preload -p ksmplus-agentd
LIB=$PWD/target/release/libksmplus.so
BIN=$PWD/target/release

tmp=$(mktemp -d /tmp/ksmplus-demo.XXXXXX)
exec 9>/tmp/ksmplus-ksmd.lock
flock 9   # ksmd is shared: wait for any test or benchmark using it
declare -A saved
for f in run pages_to_scan sleep_millisecs; do saved[$f]=$(cat "$KSM/$f"); done
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for f in pages_to_scan sleep_millisecs run; do echo "${saved[$f]}" > "$KSM/$f"; done
    rm -rf "$tmp"
}
trap cleanup EXIT

echo 5000 > $KSM/pages_to_scan; echo 10 > $KSM/sleep_millisecs; echo 1 > $KSM/run

cat > "$tmp/policy.toml" <<POLICY
track = ["python3"]
POLICY
"$BIN/ksmplus-agentd" --socket "$tmp/agent.sock" --policy "$tmp/policy.toml" 2>"$tmp/agent.log" &
pids+=($!)

# start_workers ENV... : starts the workers with the given environment, waits until each is ready.
start_workers() {
    wpids=(); holds=()
    for i in $(seq 1 "$WORKERS"); do
        mkfifo "$tmp/in.$i"
        env "$@" python3 scripts/demo_workload.py "$SHARED_MIB" "$OWN_MIB" "$i" \
            <"$tmp/in.$i" >"$tmp/out.$i" &
        wpids+=($!); pids+=($!)
        exec {fd}>"$tmp/in.$i"; holds+=("$fd")
    done
    for i in $(seq 1 "$WORKERS"); do
        for _ in $(seq 1 600); do grep -q ready "$tmp/out.$i" 2>/dev/null && break; sleep 0.1; done
        grep -q ready "$tmp/out.$i" || die "worker $i did not get ready"
    done
}
stop_workers() {
    for fd in "${holds[@]}"; do eval "exec $fd>&-"; done
    rm -f "$tmp"/in.*
    for p in "${wpids[@]}"; do wait "$p" 2>/dev/null || true; done
}
field() { awk -v k="$2" '$1==k {print $2}' "/proc/$1/ksm_stat" 2>/dev/null || echo 0; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
merging_total() { local t=0; for p in "${wpids[@]}"; do t=$((t + $(field "$p" ksm_merging_pages))); done; echo $t; }
report() {
    printf '%-8s %10s %12s %12s %12s\n' pid "RSS MiB" "merging pg" "rmap_items" "profit MiB"
    local rss=0 m=0
    for p in "${wpids[@]}"; do
        local r mp; r=$(rss_kib "$p"); mp=$(field "$p" ksm_merging_pages)
        rss=$((rss + r)); m=$((m + mp))
        awk -v p="$p" -v r="$r" -v mp="$mp" -v ri="$(field "$p" ksm_rmap_items)" \
            -v pr="$(field "$p" ksm_process_profit)" \
            'BEGIN { printf "%-8s %10d %12d %12d %12.1f\n", p, r / 1024, mp, ri, pr / 1048576 }'
    done
    local sharing; sharing=$(cat $KSM/pages_sharing)
    awk -v rss="$rss" -v m="$m" -v sh="$sharing" 'BEGIN {
        printf "total RSS %d MiB; %d of its pages (%.1f MiB) are backed by shared KSM pages\n", rss / 1024, m, m * 4 / 1024
        printf "memory freed (ksmd pages_sharing): %.1f MiB = %.1f %% of the workers'"'"' RSS\n", sh * 4 / 1024, rss ? sh * 4 * 100 / rss : 0 }'
}

echo
echo "==> $WORKERS workers, each with the same ${SHARED_MIB} MiB of reference data + ${OWN_MIB} MiB of its own: WITHOUT ksmplus"
start_workers KSMPLUS_DISABLE=1
sleep 5
report
stop_workers

echo
echo "==> the same workers under ksmplus (LD_PRELOAD=libksmplus.so, agent tracking python3)"
start_workers LD_PRELOAD="$LIB" KSMPLUS_SOCKET="$tmp/agent.sock"
last=-1; stable=0; t0=$SECONDS
while [ $((SECONDS - t0)) -lt 180 ]; do
    m=$(merging_total)
    printf '  after %3ds: %d pages merging\n' $((SECONDS - t0)) "$m"
    # Converged: within 1 % of the previous reading three times in a row.
    if [ "$m" -gt 0 ] && [ $((m > last ? m - last : last - m)) -le $((m / 100)) ]; then
        stable=$((stable + 1))
    else
        stable=0
    fi
    [ $stable -ge 3 ] && break
    last=$m; sleep 3
done
report
echo
echo "==> ksmplusctl status"
"$BIN/ksmplusctl" --socket "$tmp/agent.sock" status || true
stop_workers
