#!/usr/bin/env bash
# physical -> Azure on local doubles: a throwaway VM in an embedded libvirt (the source host) is
# protected to an Azure site served by Azurite (storage) and standby's fake ARM (compute and
# network), replicated, test-failed-over into an Azure VM, checked, cleaned up, and priced.
# Everything lives under ./demo-work/azure.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${STANDBY_DEMO_DIR:-$PWD/demo-work}/azure
export STANDBY_HOME="$W/home"
SRC="qemu:///embed?root=$W/src-host"
standby() { uv run --no-sync standby "$@"; }
lab() { uv run --no-sync python -m standby.plugins.physical.lab "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
MiB=1048576

step "fresh demo directory $W"
if [ -d "$W" ]; then
  lab --uri "$SRC" destroy app02 >/dev/null 2>&1 || true
  rm -rf "$W"
fi
mkdir -p "$W"

step "the Azure doubles: Azurite (blob storage, HTTPS) and the fake ARM (HTTPS, AAD tokens)"
# its own session (setsid): stopping it stops uv, python and the servers they start
setsid uv run --no-sync python tests/doubles/serve_azure.py --dir "$W/azure" >"$W/doubles.log" 2>&1 &
DOUBLES=$!
trap 'kill -- "-$DOUBLES" 2>/dev/null || true; wait $DOUBLES 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -e "$W/azure/ready" ] && break; sleep 0.2; done
[ -e "$W/azure/ready" ] || { cat "$W/doubles.log"; exit 1; }
cat "$W/doubles.log"
# shellcheck disable=SC1091
source "$W/azure/env"   # the secrets the site file references (env:...)

step "a throwaway VM 'app02' on the source host (2 qcow2 disks), running"
lab --uri "$SRC" create app02 --dir "$W/src-disks" --disk vda:256 --disk vdb:64
lab --uri "$SRC" write app02 vda $((1*MiB)) $((8*MiB)) --pattern 0x11
lab --uri "$SRC" write app02 vdb 0 $((2*MiB)) --pattern 0x22

step "two sites: the source host, and Azure (site file as an operator writes it)"
# pool_dir: where app02's replica lives when it is protected back home (failback)
standby sites add src --plugin physical --set uri="\"$SRC\"" --set pool_dir="\"$W/src-pool\"" \
  --set domain_type='"qemu"'
mkdir -p "$STANDBY_HOME/policies"
# app02 has no OS to answer an ACPI shutdown: a planned failover powers it off after 2s
printf 'rpo = "15m"\nretain = 3\nshutdown_timeout = "2s"\n' > "$STANDBY_HOME/policies/demo.toml"
mkdir -p "$STANDBY_HOME/sites"
cp "$W/azure/site.toml" "$STANDBY_HOME/sites/azure.toml"
cat "$STANDBY_HOME/sites/azure.toml"
standby sites check azure

step "protect app02 to Azure: validated against the region's VM sizes, then the full sync"
standby protect app02 --from src --to azure --policy demo
standby replicate app02

step "the guest writes; incremental cycles ship only what changed"
lab --uri "$SRC" write app02 vda $((100*MiB)) $((1*MiB)) --pattern 0x33
standby replicate app02
lab --uri "$SRC" write app02 vdb $((32*MiB)) 65536 --pattern 0x44
standby replicate app02
standby status
standby points app02

step "a write after the last point: it must NOT appear in the failover"
lab --uri "$SRC" write app02 vda $((200*MiB)) 65536 --pattern 0x66

step "test failover: managed disks imported from the point's snapshots, NIC in the isolated network"
standby failover app02 --test --json | tee "$W/failover.json"

step "the failed-over disks hold exactly the point (read from the snapshots the disks came from)"
uv run --no-sync python - "$W/failover.json" <<'PY'
import json, sys
from standby.core.config import get_site
from standby.providers.azure.target import AzureTarget
fo = json.load(open(sys.argv[1]))
target = AzureTarget(get_site("azure"))
blobs = target.clients.container
MiB = 1 << 20
checks = {
    "vda": [(1 * MiB, 0x11), (100 * MiB, 0x33), (200 * MiB, 0x00)],
    "vdb": [(0, 0x22), (32 * MiB, 0x44)],
}
uri_of = {}
for disk_id in fo["ref"]["disks"]:
    name = disk_id.rsplit("/", 1)[1]
    d = target.clients.compute.disks.get("standby-dr", name)
    uri_of[name.split("-")[1]] = d.creation_data.source_uri
for disk, want in checks.items():
    uri = uri_of[disk]
    blob, snap = uri.split(blobs.url + "/")[1].split("?snapshot=")
    client = blobs.get_blob_client(blob, snapshot=snap)
    for off, byte in want:
        got = client.download_blob(offset=off, length=65536).readall()
        assert got == bytes([byte]) * 65536, (disk, off)
    print(f"{disk}: {len(want)} ranges as expected in {blob} @ snapshot {snap}")
print("the write made after the point is not there: ok")
PY

step "clean up the test failover: everything tagged with its failover id is deleted"
standby failover cleanup app02
standby events app02 | tail -n 8

step "what this costs: storage while protected, compute after a failover (sample price table)"
standby cost app02

step "a real, planned failover to Azure: app02 shut down, final cycle, Azure VM in the DR network"
lab --uri "$SRC" write app02 vda $((230*MiB)) 65536 --pattern 0x77   # just before: not lost
standby failover app02 --planned
standby commit app02

step "re-protect: Azure -> home, layered on app02's original disks (still there, shut off)"
standby reprotect app02
step "app02 works in Azure: its guest writes 64 KiB (the demo writes into the managed disk's storage)"
uv run --no-sync python - <<'PY'
import sys
sys.path.insert(0, "tests")
from doubles.azure_arm import MANAGED, managed_blob
from standby.core.config import get_site
from standby.providers.azure.target import AzureTarget
from azure.storage.blob import BlobClient
target = AzureTarget(get_site("azure"))
disk = next(d for d in target.clients.compute.disks.list_by_resource_group("standby-dr")
            if (d.tags or {}).get("standby-disk") == "vda")
c = target.clients.container  # same storage account as the replicas (one Azurite)
blob = BlobClient(c.url.rsplit("/", 1)[0], MANAGED, managed_blob(disk.id),
                  credential=c.credential, connection_verify=target.clients.verify)
blob.upload_page(b"\x99" * 65536, offset=150 * (1 << 20), length=65536)
print(f"wrote 64 KiB at 150 MiB of managed disk {disk.name}")
PY
step "the reverse cycle reads Azure disk snapshots over a SAS and ships only what differs"
standby replicate app02 --json > "$W/back.json"
uv run --no-sync python - "$W/back.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))[0]
print(f"{r['kind']} cycle: read {r['bytes_read']} bytes from Azure, wrote {r['bytes_written']} at home")
PY

step "failback: the Azure VM stopped and deallocated, final cycle, app02 starts at home"
standby failback app02
HOME_VDA=$(lab --uri "$SRC" disk app02 vda)
qemu-io -U -r -f qcow2 -c "read -P 0x99 $((150*MiB)) 65536" "$HOME_VDA" | head -n 1
qemu-io -U -r -f qcow2 -c "read -P 0x77 $((230*MiB)) 65536" "$HOME_VDA" | head -n 1
echo "the write made in Azure and the last write before the failover are both at home"

step "commit, and protected to Azure again (the stopped Azure VM is removed; the blobs seed it)"
standby commit app02
standby reprotect app02
standby replicate app02
standby status

step "demo done"
lab --uri "$SRC" destroy app02
echo "State stays in $W for a look; the doubles stop now (make demo-azure starts afresh)."
