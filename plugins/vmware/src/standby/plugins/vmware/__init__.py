"""standby-vmware: VMware vSphere as a source (pyvmomi)."""
