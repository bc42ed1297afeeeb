"""standby plugin for libvirt/KVM hosts: physical servers and "own DR site" KVM hosts."""

from __future__ import annotations
