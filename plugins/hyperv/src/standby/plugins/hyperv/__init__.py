"""standby-hyperv: Hyper-V hosts over WinRM (PowerShell, JSON answers)."""
