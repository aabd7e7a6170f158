"""libvirt domain XML, both ways: leave libvirt without losing a VM, or go back.

    _xml       a hardened XML reader (no DTDs, no entities) that keeps each element's line
               and remembers which elements and attributes were read
    domain     `convert(xml)`: a domain definition -> a plain profile mapping, the list of
               what could not be mapped (losses, each with its XML path) and what was
               approximated (notes); `kvmrun.profile.from_mapping` validates the mapping
    machine    <os>, <features>, <cpu>, <clock> and the on_* events of that mapping
    devices    its <devices> (NICs, shares, consoles, display, boot order …)
    disks      its <disk>s (disks and the CD-ROM)
    export     `to_xml(profile)`: a Profile -> domain XML that `virsh define` accepts

Pure apart from reading the XML, checking which disk paths exist and asking
kvmrun.storage.pools whether a pool exists. Defining a converted VM (and copying its UEFI
variables) is kvmrun.ops.libvirt; the verbs are in kvmrun.cli.libvirt (convert) and
kvmrun.cli.defined (import, export --format libvirt).
"""
