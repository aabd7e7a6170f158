"""QEMU: the pure compile step (profile + host facts + run paths -> argv), probing the
host once per command (binaries, machine types, CPU models, firmware, the KVM boot
probe), and checking a profile against that host."""
