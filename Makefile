# standby: `make demo` runs the main job on embedded defaults; `make test` runs the whole suite.
# Both install what they need (Debian packages, uv, the workspace) and are safe to re-run.
SHELL := /bin/bash
export UV_PYTHON_DOWNLOADS := never
export PATH := $(HOME)/.local/bin:$(PATH)

APT_PACKAGES := libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-system \
	libvirt-daemon-system-sysv qemu-system-x86 qemu-system-common qemu-utils libvirt-clients pkg-config \
	libvirt-dev python3-libnbd libnbd-bin python3-dev gcc make cpio rsync restic \
	borgbackup tini golang-go golang-github-vmware-govmomi-dev golang-github-google-uuid-dev nbdkit samba \
	ovmf

# QEMU daemons whose parent exits go to init, and libvirt's destroy waits until they are
# reaped; this machine's init reaps every ~2 s (systemd at once). `tini -s` reaps them at once.
REAP := tini -s --

.PHONY: setup demo demo-azure demo-plan demo-vmware demo-hyperv demo-aws demo-vault test lint bench bench-azure bench-rpo bench-rto bench-vmware bench-hyperv bench-aws bench-vault clean

setup:
	@bash scripts/setup.sh $(APT_PACKAGES)

demo: setup
	@$(REAP) bash scripts/demo.sh

demo-azure: setup
	@$(REAP) bash scripts/demo-azure.sh

demo-plan: setup
	@$(REAP) bash scripts/demo-plan.sh

demo-vmware: setup
	@$(REAP) bash scripts/demo-vmware.sh

demo-hyperv: setup
	@$(REAP) bash scripts/demo-hyperv.sh

demo-aws: setup
	@$(REAP) bash scripts/demo-aws.sh

demo-vault: setup
	@$(REAP) bash scripts/demo-vault.sh

lint: setup
	uv run ruff check .
	uv run ruff format --check .
	uv run mypy

test: setup lint
	$(REAP) uv run pytest -q

bench: setup
	$(REAP) uv run python benchmarks/bench_physical.py

bench-azure: setup
	$(REAP) uv run python benchmarks/bench_azure.py

bench-rpo: setup
	$(REAP) uv run python benchmarks/bench_rpo.py

bench-rto: setup
	$(REAP) uv run python benchmarks/bench_rto.py

bench-vmware: setup
	$(REAP) uv run python benchmarks/bench_vmware.py

bench-hyperv: setup
	$(REAP) uv run python benchmarks/bench_hyperv.py

bench-aws: setup
	$(REAP) uv run python benchmarks/bench_aws.py

bench-vault: setup
	$(REAP) uv run python benchmarks/bench_vault.py

clean:
	rm -rf .venv demo-work .pytest_cache .mypy_cache .ruff_cache
