"""The VHD footer, Azure's limits, size choice and cost maths (no servers)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from standby.core.errors import ConfigError, PluginError
from standby.core.model import DiskSpec, Firmware, ProtectionInfo, Usage, VMSpec
from standby.providers.azure import compute, cost, storage, vhd

MiB = 1 << 20
GiB = 1 << 30
SIZES = [
    compute.VMSize("Standard_B1s", 1, 1024, 2),
    compute.VMSize("Standard_B2s", 2, 4096, 4),
    compute.VMSize("Standard_F2s_v2", 2, 4096, 4),
    compute.VMSize("Standard_D4s_v5", 4, 16384, 8),
    compute.VMSize("Standard_D16s_v5", 16, 65536, 32),
]


def vm(*sizes: int, cpus: int = 1, mem: int = 512, fw: Firmware = Firmware.BIOS) -> VMSpec:
    disks = tuple(DiskSpec(name=f"vd{chr(97 + i)}", size=s) for i, s in enumerate(sizes))
    return VMSpec(id="x", name="app01", cpus=cpus, memory_mib=mem, firmware=fw, disks=disks)


def no_price(size: str) -> float | None:
    return None


def test_footer_round_trip_and_checksum() -> None:
    f = vhd.new_footer(10 * MiB + 1)
    raw = f.pack()
    assert len(raw) == 512 and raw.startswith(b"conectix")
    parsed = vhd.parse_footer(raw)
    assert parsed.size == 11 * MiB and parsed.unique_id == f.unique_id
    (stored,) = struct.unpack(">I", raw[64:68])
    assert stored == (~(sum(raw) - sum(raw[64:68])) & 0xFFFFFFFF)
    assert struct.unpack(">I", raw[60:64])[0] == 2  # fixed disk
    assert struct.unpack(">Q", raw[16:24])[0] == 0xFFFFFFFFFFFFFFFF
    bad = bytearray(raw)
    bad[100] ^= 1
    with pytest.raises(PluginError, match="checksum"):
        vhd.parse_footer(bytes(bad))


def test_sizes_round_to_mib_plus_footer() -> None:
    assert vhd.virtual_size(1) == MiB
    assert vhd.virtual_size(MiB) == MiB
    assert vhd.blob_size(4 * GiB) == 4 * GiB + 512
    assert vhd.blob_size(4 * GiB + 1) == 4 * GiB + MiB + 512


@pytest.mark.parametrize(
    ("size", "chs"),
    [
        (10 * MiB, (301, 4, 17)),  # small disk: 17 sectors per track
        (128 * GiB, (65535, 16, 255)),  # beyond CHS: the maximum geometry
    ],
)
def test_geometry_follows_the_spec(size: int, chs: tuple[int, int, int]) -> None:
    assert vhd.geometry(size) == chs


def test_put_page_rules_enforced() -> None:
    storage.check_range(0, 512, MiB, "w")
    with pytest.raises(PluginError, match="aligned"):
        storage.check_range(100, 512, MiB, "w")
    with pytest.raises(PluginError, match="outside"):
        storage.check_range(MiB - 512, 1024, MiB, "w")


def test_validate_picks_the_smallest_size_and_generation() -> None:
    problems, size, notes = compute.validate(vm(GiB, cpus=2, mem=2048), SIZES, None, no_price)
    assert not problems and size == "Standard_B2s"
    assert any("generation V1" in n for n in notes)
    _, _, notes = compute.validate(vm(GiB, fw=Firmware.UEFI), SIZES, None, no_price)
    assert any("generation V2" in n for n in notes)
    # cheaper wins among equals when prices are known
    prices = {"Standard_B2s": 0.09, "Standard_F2s_v2": 0.05}
    _, size, _ = compute.validate(vm(GiB, cpus=2, mem=2048), SIZES, None, prices.get)
    assert size == "Standard_F2s_v2"
    # data disk count drives the size too
    _, size, _ = compute.validate(vm(GiB, *[GiB] * 5), SIZES, None, no_price)
    assert size == "Standard_D4s_v5"


def test_validate_lists_every_reason() -> None:
    huge = vm(5000 * GiB, 9 * (1 << 40), cpus=64, mem=1 << 20)
    problems, size, _ = compute.validate(huge, SIZES, None, no_price)
    assert size is None
    text = " | ".join(problems)
    assert "OS disk 'vda'" in text and "4095 GiB" in text
    assert "disk 'vdb'" in text and "page blob" in text
    assert "no VM size" in text
    problems, _, _ = compute.validate(vm(GiB, cpus=4), SIZES, "Standard_B1s", no_price)
    assert problems == [
        "VM size 'Standard_B1s' (1 cores, 1024 MiB, 2 data disks) is too small: the VM needs "
        "4 core(s), 512 MiB and 0 data disk(s)"
    ]
    problems, _, _ = compute.validate(vm(GiB), SIZES, "Standard_Nope", no_price)
    assert problems == ["VM size 'Standard_Nope' is not offered in this region"]


def test_largest_disk_fits_a_page_blob() -> None:
    assert vhd.blob_size(storage.MAX_DISK) <= storage.MAX_PAGE_BLOB
    assert vhd.blob_size(storage.MAX_DISK + 1) > storage.MAX_PAGE_BLOB


def test_cost_estimate_from_the_sample_table(tmp_path: Path) -> None:
    prices = cost.load_prices(None)
    p = ProtectionInfo(1, vm(64 * GiB, 200 * GiB), "src", "dr")
    est = cost.estimate([Usage(p, 10 * GiB, 2 * GiB, 3, "Standard_B2s")], prices, "Standard_LRS")
    assert est.monthly == pytest.approx(12 * 0.045)
    # B2s per hour + S6 (64 GiB) and S15 (256 GiB) disks per hour
    assert est.hourly == pytest.approx(0.0416 + (3.01 + 11.33) / 730)
    bad = tmp_path / "p.toml"
    bad.write_text("currency = 'EUR'\n")
    with pytest.raises(ConfigError, match="price table"):
        cost.load_prices(bad)


@pytest.mark.parametrize("mib", [1, 256, 4096, 65537, 102403])
def test_other_tools_read_the_exact_size_of_standby_vhds(tmp_path: Path, mib: int) -> None:
    """qemu's vpc driver takes the CHS product for creator apps it does not know: the footer's
    geometry multiplies out to the exact size (or is the maximum, which means current_size)."""
    import json
    import subprocess

    size = mib << 20
    path = tmp_path / "d.vhd"
    with path.open("wb") as f:
        f.truncate(size)
        f.seek(size)
        f.write(vhd.new_footer(size).pack())
        f.seek(mib << 19)
        f.write(b"\x5a" * 4096)
    info = subprocess.run(
        ["qemu-img", "info", "-f", "vpc", "--output=json", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(info.stdout)["virtual-size"] == size
    raw = tmp_path / "d.raw"
    with raw.open("wb") as f:
        f.truncate(size)
        f.seek(mib << 19)
        f.write(b"\x5a" * 4096)
    cmp = subprocess.run(["qemu-img", "compare", "-f", "vpc", "-F", "raw", str(path), str(raw)])
    assert cmp.returncode == 0
