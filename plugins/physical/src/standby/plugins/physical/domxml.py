"""Domain XML <-> VMSpec."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from standby.core.model import DiskSpec, Firmware, NicSpec, VMSpec

BUS_BY_PREFIX = {"vd": "virtio", "sd": "sata", "hd": "ide", "xvd": "xen"}
_DEV = re.compile(r"^(vd|sd|hd)[a-z]{1,2}$")
"""Target devs a KVM guest can have as they are; Xen's `xvdX` (EC2's device names) cannot."""


def guest_devs(names: list[str]) -> dict[str, str]:
    """The libvirt target dev for each disk, in order: a libvirt-style name (vda, sdb) is kept,
    another platform's disk key (vSphere's `disk2000`, Azure's `os`, EC2's `xvda`) gets the
    next free vdX."""
    kept = {n for n in names if _DEV.match(n)}
    free = (f"vd{chr(ord('a') + i)}" for i in range(26))
    out = {}
    for name in names:
        if name in kept:
            out[name] = name
        else:
            out[name] = next(d for d in free if d not in kept)
    return out


def bus_for(dev: str) -> str:
    for prefix, bus in BUS_BY_PREFIX.items():
        if dev.startswith(prefix):
            return bus
    return "virtio"


def parse_domain(xml: str, sizes: dict[str, int], state: str) -> VMSpec:
    """VM spec from a domain's XML; `sizes` gives each disk's capacity (from blockInfo)."""
    root = ET.fromstring(xml)
    name = root.findtext("name", "")
    uuid = root.findtext("uuid", "")
    vcpu = int(root.findtext("vcpu", "1"))
    mem = root.find("memory")
    mem_kib = int(mem.text or "0") if mem is not None else 0
    unit = (mem.get("unit", "KiB") if mem is not None else "KiB").lower()
    factor = {"kib": 1, "k": 1, "mib": 1024, "m": 1024, "gib": 1 << 20, "g": 1 << 20, "b": 0}
    memory_mib = (mem_kib * factor.get(unit, 1)) // 1024 if unit != "b" else mem_kib >> 20
    os_el = root.find("os")
    firmware = Firmware.BIOS
    extra: dict[str, str] = {}
    if os_el is not None:
        if os_el.get("firmware") == "efi" or os_el.find("loader") is not None:
            firmware = Firmware.UEFI
        for key in ("kernel", "initrd", "cmdline"):
            text = os_el.findtext(key)
            if text:
                extra[key] = text
        type_el = os_el.find("type")
        if type_el is not None and type_el.get("machine"):
            extra["machine"] = str(type_el.get("machine"))
    disks: list[DiskSpec] = []
    nics: list[NicSpec] = []
    devices = root.find("devices")
    for disk in devices.findall("disk") if devices is not None else []:
        if disk.get("device", "disk") != "disk":
            continue
        target = disk.find("target")
        if target is None or target.get("dev") is None:
            continue
        dev = str(target.get("dev"))
        driver = disk.find("driver")
        fmt = driver.get("type", "raw") if driver is not None else "raw"
        disks.append(
            DiskSpec(
                name=dev,
                size=sizes.get(dev, 0),
                format=fmt,
                change_tracking=fmt == "qcow2",
                boot=not disks,
            )
        )
    for i, iface in enumerate(devices.findall("interface") if devices is not None else []):
        mac_el = iface.find("mac")
        src = iface.find("source")
        model = iface.find("model")
        network = ""
        if src is not None:
            network = src.get("network") or src.get("bridge") or src.get("dev") or ""
        nics.append(
            NicSpec(
                name=f"nic{i}",
                mac=mac_el.get("address", "") if mac_el is not None else "",
                network=network,
                model=model.get("type", "virtio") if model is not None else "virtio",
            )
        )
    return VMSpec(
        id=uuid,
        name=name,
        cpus=vcpu,
        memory_mib=memory_mib,
        firmware=firmware,
        disks=tuple(disks),
        nics=tuple(nics),
        guest_os="linux" if "kernel" in extra else "unknown",
        power_state=state,
        extra=extra,
    )


def disk_sources(xml: str) -> dict[str, dict[str, Any]]:
    """dev -> {'file': path, 'index': n} for a running domain's disks."""
    out: dict[str, dict[str, Any]] = {}
    root = ET.fromstring(xml)
    for disk in root.iter("disk"):
        target = disk.find("target")
        src = disk.find("source")
        if target is None or src is None:
            continue
        driver = disk.find("driver")
        out[str(target.get("dev"))] = {
            "file": src.get("file") or src.get("dev"),
            "index": src.get("index"),
            "format": driver.get("type") if driver is not None else None,
        }
    return out


def swap_disks(xml: str, files: Mapping[str, Path]) -> str:
    """A domain definition with the given disks pointing at new qcow2 files."""
    root = ET.fromstring(xml)
    for disk in root.iter("disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev is None or dev not in files:
            continue
        disk.set("type", "file")
        for child in list(disk):
            if child.tag in ("source", "backingStore"):
                disk.remove(child)
        driver = disk.find("driver")
        if driver is None:
            driver = ET.SubElement(disk, "driver", {"name": "qemu"})
        driver.set("type", "qcow2")
        ET.SubElement(disk, "source", {"file": str(files[dev])})
    return ET.tostring(root, encoding="unicode")


def firmware_kinds(domcaps: str) -> set[str]:
    """The firmware kinds (`bios`, `efi`) a host's domain capabilities offer."""
    root = ET.fromstring(domcaps)
    return {
        v.text or ""
        for enum in root.iterfind("os/enum[@name='firmware']")
        for v in enum.iterfind("value")
    }
