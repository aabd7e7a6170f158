"""The pure front end: a YAML profile becomes an immutable, typed `Profile`.

    yamlsrc   YAML with the line of every key (YAML 1.2 scalars)
    spec      small declarative value specs (validation + JSON Schema from one table)
    model     the typed, frozen records (kvmrun.records)
    keys      the table of every profile key (the public contract; `kvmrun schema`)
    rules     cross-field rules and warnings
    load      files, `extends`, `--set`, one-off flags -> Profile; Profile -> mapping

No I/O beyond reading the profile files: resolving a profile against the host (pools,
formats, files that must exist) belongs to kvmrun.storage and kvmrun.qemu.
"""

from kvmrun.profile.keys import DISK, PROFILE
from kvmrun.profile.load import apply_set, from_mapping, json_schema, load, read, to_dict
from kvmrun.profile.model import (CLOUD_INIT_FINISHED, CloudInit, Disk, Kernel, Network,
                                  Profile, Ready, Share, Shutdown, Ssh)
from kvmrun.profile.rules import referenced_files, warnings

__all__ = ["CLOUD_INIT_FINISHED", "DISK", "PROFILE", "CloudInit", "Disk", "Kernel", "Network",
           "Profile", "Ready", "Share", "Shutdown", "Ssh", "apply_set", "from_mapping",
           "json_schema", "load", "read", "referenced_files", "to_dict", "warnings"]
