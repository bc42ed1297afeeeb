#!/usr/bin/env bash
# Build the vSphere test double (tests/doubles/vcsim/main.go) into .cache/vcsim/standby-vcsim.
# Uses Debian's Go and govmomi 0.24 sources in GOPATH mode; installs nothing itself (needs the
# apt packages golang-go golang-github-vmware-govmomi-dev golang-github-google-uuid-dev).
# Skips the build when the binary is newer than main.go.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$root/tests/doubles/vcsim/main.go"
cache="$root/.cache/vcsim"
bin="$cache/standby-vcsim"
if [[ -x "$bin" && "$bin" -nt "$src" ]]; then
    exit 0
fi
command -v go >/dev/null || { echo "build-vcsim: go not found (apt-get install golang-go)" >&2; exit 1; }
[[ -d /usr/share/gocode/src/github.com/vmware/govmomi/simulator ]] || {
    echo "build-vcsim: govmomi sources missing (apt-get install golang-github-vmware-govmomi-dev)" >&2
    exit 1
}
pkg="$cache/gopath/src/standby-vcsim"
mkdir -p "$pkg" "$cache/gocache"
cp "$src" "$pkg/main.go"
cd "$pkg"
GO111MODULE=off GOPATH="$cache/gopath:/usr/share/gocode" GOPROXY=off GOFLAGS= \
    GOCACHE="$cache/gocache" go build -o "$bin.tmp" .
mv -f "$bin.tmp" "$bin"
echo "build-vcsim: built $bin"
