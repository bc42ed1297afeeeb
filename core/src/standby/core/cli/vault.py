"""`standby vault ...`: create and open vaults, keys and passphrases, check, list, restore."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from standby.core.errors import AuthError, ConfigError, IntegrityError, NotFound

from .common import JsonOpt, emit, home, out

app = typer.Typer(help="Recovery vaults: sealed, deduplicated points.", no_args_is_help=True)
passphrase_app = typer.Typer(help="The vault's passphrase.", no_args_is_help=True)
key_app = typer.Typer(help="The vault's wrapped key.", no_args_is_help=True)
app.add_typer(passphrase_app, name="passphrase")
app.add_typer(key_app, name="key")

RefOpt = Annotated[
    str | None,
    typer.Option("--passphrase", help="A secret reference (env:, file:, keyring:); else a prompt."),
]


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="vault")


def _ask(what: str, confirm: bool = False) -> str:
    if not sys.stdin.isatty():
        raise AuthError(f"{what}: no terminal to ask on; pass --passphrase env:NAME")
    value: str = typer.prompt(what, hide_input=True, confirmation_prompt=confirm)
    if not value:
        raise ConfigError(f"{what} cannot be empty")
    return value


def _passphrase(ref: str | None, what: str, confirm: bool = False) -> str:
    from standby.core.config import resolve_secret

    if ref:
        return resolve_secret(ref, "--passphrase")
    return _ask(what, confirm)


@app.command("create")
def create(
    name: str,
    store: Annotated[str, typer.Option(help="file:///path, s3://bucket/prefix, azure://...")],
    store_site: Annotated[
        str | None, typer.Option(help="The site whose credentials reach the store.")
    ] = None,
    passphrase: RefOpt = None,
    kdf_seconds: Annotated[float, typer.Option(help="Key derivation time (>= 0.5 s).")] = 0.5,
) -> None:
    """Make a vault: a random 256-bit key wrapped by the passphrase (Argon2id)."""
    import os

    from standby.core.vault.crypto import MIN_KDF_SECONDS, KeyFile, tune
    from standby.core.vault.vault import Vault, VaultConfig

    if kdf_seconds < MIN_KDF_SECONDS:
        raise ConfigError(f"--kdf-seconds must be at least {MIN_KDF_SECONDS}")
    base = home()
    cfg = VaultConfig(name, store, store_site, passphrase)
    if (VaultConfig.directory(base) / f"{name}.toml").exists():
        raise ConfigError(f"vault '{name}' already exists here")
    secret = _passphrase(passphrase, f"new passphrase of vault '{name}'", confirm=True)
    key = os.urandom(32)
    st = cfg.open_store(base)
    vid = Vault.create(st, name, key)
    cfg.register(KeyFile.wrap(key, vid, name, secret, tune(kdf_seconds)), base)
    out.print(f"vault '{name}' created in {st.url} (id {vid}); keep its key safe offline: "
              f"`standby vault key export {name} --out FILE`")  # fmt: skip


@passphrase_app.command("change")
def passphrase_change(
    name: str,
    passphrase: RefOpt = None,
    new: Annotated[str | None, typer.Option(help="The new passphrase's reference.")] = None,
) -> None:
    """Rewrap the vault key under a new passphrase (no data is touched)."""
    from standby.core.config import resolve_secret
    from standby.core.vault.vault import VaultConfig, write_private

    base = home()
    cfg = VaultConfig.load(name, base)
    keyfile = cfg.key(base)
    old = resolve_secret(passphrase, "--passphrase") if passphrase else cfg.passphrase_value(_ask)
    fresh = resolve_secret(new, "--new") if new else _ask(f"new passphrase of '{name}'", True)
    write_private(cfg.key_path(base), keyfile.rewrapped(old, fresh).to_json())
    out.print(f"vault '{name}': passphrase changed; export the key again (older key files "
              "still open it with the old passphrase)")  # fmt: skip


@key_app.command("export")
def key_export(name: str, out_file: Annotated[Path, typer.Option("--out")]) -> None:
    """Write the wrapped key file to keep offline (useless without the passphrase)."""
    from standby.core.vault.vault import VaultConfig, write_private

    cfg = VaultConfig.load(name, home())
    write_private(out_file, cfg.key(home()).to_json())
    out.print(f"vault '{name}': key written to {out_file}")


@app.command("open")
def open_(
    name: str,
    store: Annotated[str, typer.Option(help="Where the vault is.")],
    key_file: Annotated[Path, typer.Option(help="The exported key file.")],
    store_site: Annotated[str | None, typer.Option()] = None,
    passphrase: RefOpt = None,
) -> None:
    """Register an existing vault on this machine from its key file and passphrase."""
    from standby.core.vault.crypto import KeyFile
    from standby.core.vault.vault import Vault, VaultConfig

    base = home()
    try:
        keyfile = KeyFile.from_json(key_file.read_text(), str(key_file))
    except FileNotFoundError:
        raise NotFound(f"key file {key_file} not found") from None
    cfg = VaultConfig(name, store, store_site, passphrase)
    secret = _passphrase(passphrase, f"passphrase of vault '{name}'")
    key = keyfile.unwrap(secret)
    vault = Vault.open(name, cfg.open_store(base), key, keyfile.vault_id)
    protections = vault.record_ids("protections")
    cfg.register(keyfile, base)
    out.print(f"vault '{name}' opened: {len(protections)} protection(s); "
              f"`standby vault import {name} --site SITE` readies them here")  # fmt: skip


@app.command("import")
def import_(name: str, site: Annotated[str, typer.Option(help="The vault's site here.")]) -> None:
    """Record the vault's protections and points in this machine's state."""
    from standby.core.vault.adopt import adopt

    done = adopt(home(), name, site)
    for line in done:
        out.print(line)


@app.command("ls")
def ls(name: str, as_json: JsonOpt = False) -> None:
    """Protections, points and sizes (logical, stored, deduplication)."""
    from standby.core.vault.adopt import inventory
    from standby.core.vault.vault import Vault

    vault = Vault.opened(name, home(), _ask)
    data = inventory(vault)
    if as_json:
        emit(data)
        return
    from standby.core.model import size_text

    for vm in data["vms"]:
        pts = ", ".join(str(p["point"]) for p in vm["points"])
        out.print(f"{vm['name']}: points {pts or '-'}; newest {size_text(vm['logical'])} logical")
    out.print(f"stored {size_text(data['stored_bytes'])} in {data['packs']} packs, "
              f"{data['chunks']} chunks; all points {size_text(data['logical_bytes'])} "
              f"logical: deduplication and compression {data['ratio']}x")  # fmt: skip


@app.command("check")
def check(
    name: str,
    read_data: Annotated[bool, typer.Option("--read-data", help="Read every chunk.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Verify every record, pack and point (and with --read-data every chunk's bytes)."""
    from standby.core.vault.gc import check as run_check
    from standby.core.vault.vault import Vault

    vault = Vault.opened(name, home(), _ask)
    rep = run_check(vault, read_data)
    data: dict[str, Any] = {
        "vault": name, "ok": rep.ok, "records": rep.records, "packs": rep.packs,
        "chunks": rep.chunks, "chunks_read": rep.chunks_read, "problems": rep.problems,
        "damaged_points": rep.damaged_points, "garbage_packs": rep.garbage_packs,
    }  # fmt: skip
    if as_json:
        emit(data)
    else:
        for p in rep.problems:
            out.print(f"problem: {p}")
        for rid, why in rep.damaged_points.items():
            out.print(f"damaged point {rid}: {'; '.join(why)}")
        out.print(f"vault '{name}': {rep.records} records, {rep.packs} packs, {rep.chunks} "
                  f"chunks ({rep.chunks_read} read): {'ok' if rep.ok else 'DAMAGED'}")  # fmt: skip
    if not rep.ok:
        raise IntegrityError(f"vault '{name}': {len(rep.problems)} problem(s), "
                             f"{len(rep.damaged_points)} damaged point(s)")  # fmt: skip


@app.command("failover")
def failover(
    vm: str,
    to: Annotated[str, typer.Option("--to", help="The site to run the VM at.")],
    test: Annotated[bool, typer.Option("--test")] = False,
    unplanned: Annotated[bool, typer.Option("--unplanned")] = False,
    point: Annotated[int | None, typer.Option(help="Recovery point id (default: latest).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Fail a VM protected into a vault over to any site: --test or --unplanned."""
    from standby.core.vault.target import VaultTarget

    from .failover import _lifecycle, failover_data

    if test == unplanned:
        raise ConfigError("choose one of --test, --unplanned")
    VaultTarget.run_on_override = to
    with _lifecycle() as life:
        fo = life.failover(vm, kind="test" if test else "unplanned", point_id=point)
        data = failover_data(vm, fo)
    if as_json:
        emit(data)
    else:
        out.print(f"{vm}: {fo.kind} failover {data['failover']} running as "
                  f"[bold]{data['target_vm']}[/] at '{to}' from point {data['point']}")  # fmt: skip


@app.command("restore-disk")
def restore_disk(
    name: str,
    vm: str,
    disk: str,
    out_file: Annotated[Path, typer.Option("--out")],
    point: Annotated[int | None, typer.Option(help="Point id (default: newest).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="raw, qcow2, vhd or vhdx")] = "raw",
) -> None:
    """Write one disk of a point to a local file (forensics)."""
    from standby.core.vault.adopt import restore_disk_file
    from standby.core.vault.vault import Vault

    if fmt not in ("raw", "qcow2", "vhd", "vhdx"):
        raise ConfigError("--format must be raw, qcow2, vhd or vhdx")
    vault = Vault.opened(name, home(), _ask)
    pid, size = restore_disk_file(vault, vm, disk, point, out_file, fmt)
    out.print(f"{vm} {disk} of point {pid} ({size} bytes) written to {out_file} ({fmt})")


@app.command("sweep")
def sweep(name: str, as_json: JsonOpt = False) -> None:
    """Free the chunks no point uses (retention does it too); waits for no writer."""
    from standby.core.vault.gc import sweep as run_sweep
    from standby.core.vault.gc import vault_lock
    from standby.core.vault.vault import Vault

    vault = Vault.opened(name, home(), _ask)
    with vault_lock(name, shared=False, base=home()):
        rep = run_sweep(vault)
    data = {"vault": name, "packs_deleted": rep.packs_deleted,
            "packs_rewritten": rep.packs_rewritten, "chunks_freed": rep.chunks_freed,
            "bytes_freed": rep.bytes_freed}  # fmt: skip
    if as_json:
        emit(data)
    else:
        out.print(f"vault '{name}': {rep.chunks_freed} chunks freed ({rep.bytes_freed} B), "
                  f"{rep.packs_deleted} packs deleted, {rep.packs_rewritten} copied")  # fmt: skip
