# Sourced by the demos that run doubles (demo-hyperv.sh, demo-vmware.sh), after they set W.
# Each double runs in a session of its own (setsid), so stopping it stops its whole group
# (uv, python, the servers they start); VMs the demo left running would outlive their
# embedded libvirt, so they stop too (the state stays in $W).
standby() { uv run --no-sync standby "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
MiB=1048576
PIDS=()
bg() { setsid "$@" & PIDS+=($!); }
cleanup() {
  for p in "${PIDS[@]}"; do kill -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do  # a double that does not stop in 15 s is killed
    ( sleep 15; kill -9 -- "-$p" 2>/dev/null ) >/dev/null 2>&1 & dog=$!
    wait "$p" 2>/dev/null || true
    kill "$dog" 2>/dev/null || true
  done
  pkill -f "qemu-system.*$W/" 2>/dev/null || true
}
trap cleanup EXIT
wait_ready() { for _ in $(seq 150); do [ -e "$1" ] && return 0; sleep 0.2; done; cat "$2"; exit 1; }
