#!/usr/bin/env bash
# The recovery vault on an embedded libvirt host and the Azure doubles (Azurite + fake ARM):
#   a KVM VM protected into a directory vault (sealed, deduplicated, compressed); its sizes;
#   `vault check --read-data`; the vault opened on a "new machine" (a fresh STANDBY_HOME)
#   with the exported key file and the passphrase; the VM failed over from the vault to the
#   KVM DR host and to Azure.
# Everything lives under ./demo-work/vault.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${STANDBY_DEMO_DIR:-$PWD/demo-work}/vault
export STANDBY_HOME="$W/home"
SRC="qemu:///embed?root=$W/src-host"
DR="qemu:///embed?root=$W/dr-host"
# shellcheck source=scripts/demo-lib.sh
source scripts/demo-lib.sh
lab() { uv run --no-sync python -m standby.plugins.physical.lab "$@"; }
# the passphrase comes from a secret reference, never an argument (a demo one here)
export DEMO_VAULT_PASSPHRASE="demo: a long passphrase kept in a password manager"

step "fresh demo directory $W"
rm -rf "$W"
mkdir -p "$W" "$STANDBY_HOME/sites"

step "the Azure doubles (for the failover to Azure at the end)"
bg uv run --no-sync python tests/doubles/serve_azure.py --dir "$W/azure" >"$W/azure.log" 2>&1
wait_ready "$W/azure/ready" "$W/azure.log"
# shellcheck disable=SC1091
source "$W/azure/env"

step "a vault in a directory: a random 256-bit key wrapped by the passphrase (Argon2id)"
standby vault create dv --store "file://$W/vault-store" --passphrase env:DEMO_VAULT_PASSPHRASE
standby vault key export dv --out "$W/dv.key"
echo "the key file (keep it offline; useless without the passphrase):"
sed -e 's/"wrapped": ".\{12\}[^"]*"/"wrapped": "…"/' "$W/dv.key"

step "sites: the source host, the DR host, and the vault (failover runs on the DR host)"
standby sites add src --plugin physical --set uri="\"$SRC\""
standby sites add dr --plugin physical --set uri="\"$DR\"" --set pool_dir="\"$W/dr-pool\"" \
  --set domain_type='"qemu"'
standby sites add vault --plugin vault --set vault='"dv"' --set run_on='"dr"'
standby sites check vault

step "two VMs on the source host with the same base image (app01, app02)"
for vm in app01 app02; do
  lab --uri "$SRC" create "$vm" --dir "$W/src-disks" --disk vda:128
  lab --uri "$SRC" write "$vm" vda $((1*MiB)) $((24*MiB)) --pattern 0x11
done
lab --uri "$SRC" write app01 vda $((64*MiB)) $((4*MiB)) --pattern 0x22

step "protect both into the vault; the second stores only what the first did not"
standby protect app01 --from src --to vault --rpo 15m --retain 3
standby protect app02 --from src --to vault --rpo 15m --retain 3
standby replicate app01
standby replicate app02
lab --uri "$SRC" write app01 vda $((100*MiB)) 65536 --pattern 0x33
standby replicate app01
standby vault ls dv

step "vault check --read-data: every pack, chunk and point verified"
standby vault check dv --read-data

step "nothing in the store names a VM or holds its bytes in the clear"
find "$W/vault-store" -type f | sed "s|$W/||" | sort | head -8
if grep -rl app01 "$W/vault-store" >/dev/null; then echo "LEAK"; exit 1; fi
echo "no object name or content mentions app01"

step "a drill: app01 from the vault to the KVM DR host, then cleaned up"
standby failover app01 --test
standby failover cleanup app01

step "a new machine: a fresh STANDBY_HOME, the key file and the passphrase"
NEW="$W/new-home"
mkdir -p "$NEW/sites"
cp "$STANDBY_HOME/sites/dr.toml" "$NEW/sites/"
cp "$W/azure/site.toml" "$NEW/sites/azure.toml"
STANDBY_HOME="$NEW" standby vault open dv --store "file://$W/vault-store" \
  --key-file "$W/dv.key" --passphrase env:DEMO_VAULT_PASSPHRASE
STANDBY_HOME="$NEW" standby sites add vault --plugin vault --set vault='"dv"' --set run_on='"dr"'
STANDBY_HOME="$NEW" standby vault import dv --site vault
STANDBY_HOME="$NEW" standby points app01

step "a wrong passphrase is one line and exit 4; nothing changes"
if DEMO_VAULT_PASSPHRASE=wrong STANDBY_HOME="$NEW" standby vault ls dv; then exit 1; else
  echo "exit $?"; fi

step "the new machine fails app01 over from the vault to the KVM DR host (a drill)"
STANDBY_HOME="$NEW" standby failover app01 --test
STANDBY_HOME="$NEW" standby failover cleanup app01

step "...and to Azure (a drill in Azure's isolated network)"
STANDBY_HOME="$NEW" standby vault failover app01 --to azure --test
STANDBY_HOME="$NEW" standby failover cleanup app01

step "one disk of a point to a local file for forensics, compared with the source"
STANDBY_HOME="$NEW" standby vault restore-disk dv app01 vda --out "$W/app01-vda.qcow2" \
  --format qcow2
qemu-img compare -U "$W/app01-vda.qcow2" "$(lab --uri "$SRC" disk app01 vda)"

step "demo done"
for vm in app01 app02; do lab --uri "$SRC" destroy "$vm"; done
echo "State stays in $W for a look; the doubles stop now (make demo-vault starts afresh)."
