"""Helpers for targets that keep replicas as qcow2 chains in a directory they can reach as
files (the physical/KVM target; the vSphere target's NFS datastore): qcow2 allocation maps,
per-thread libnbd handles, and overlay chains kept with qemu-img. Binaries and bindings are
loaded on use, so importing this package costs nothing."""
