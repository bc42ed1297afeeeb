#!/usr/bin/env bash
# Idempotent set-up: Debian packages (only when missing), uv, the uv workspace, libnbd binding.
set -euo pipefail
cd "$(dirname "$0")/.."
export UV_PYTHON_DOWNLOADS=never DEBIAN_FRONTEND=noninteractive

missing=()
for pkg in "$@"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The end-to-end guest test downloads Debian's cloud kernel (apt-get download): it needs lists.
if ! apt-cache policy linux-image-cloud-amd64 2>/dev/null | grep -q "Candidate: [0-9]"; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
fi

if ! command -v uv >/dev/null 2>&1; then
  echo "setup: installing uv"
  if ! command -v pip3 >/dev/null 2>&1 && ! python3 -m pip --version >/dev/null 2>&1; then
    apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  python3 -m pip install -q uv 2>/dev/null || python3 -m pip install -q --break-system-packages uv
fi

# Bytecode is compiled here because PYTHONDONTWRITEBYTECODE may be set: without .pyc files
# every CLI call would spend over a second compiling its imports.
uv sync -q --all-packages --compile-bytecode
.venv/bin/python -m compileall -q core/src plugins/physical/src plugins/vmware/src plugins/hyperv/src providers/azure/src >/dev/null

# Azurite (the Azure storage double), pinned by tests/doubles/azurite/package-lock.json.
if ! command -v npm >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing nodejs and npm"
  $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
lock=tests/doubles/azurite/package-lock.json
stamp=tests/doubles/azurite/node_modules/.standby-lock
if [ ! -x tests/doubles/azurite/node_modules/.bin/azurite-blob ] || ! cmp -s "$lock" "$stamp"; then
  echo "setup: installing Azurite (npm ci)"
  (cd tests/doubles/azurite && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  cp "$lock" "$stamp"
fi

# The vSphere double: vcsim from Debian's govmomi sources with our own main.go.
bash scripts/build-vcsim.sh

# libnbd has no PyPI package: link Debian's binding into the virtualenv.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for f in nbd.py libnbdmod.cpython-311-x86_64-linux-gnu.so; do
  [ -e "$site/$f" ] || ln -sf "/usr/lib/python3/dist-packages/$f" "$site/$f"
done
# Debian ships no bytecode for nbd.py either: compile it beside the link (imported on every cycle).
.venv/bin/python -m py_compile "$site/nbd.py"
.venv/bin/python -c 'import libvirt, nbd' || { echo "setup: libvirt/nbd bindings unusable"; exit 1; }
