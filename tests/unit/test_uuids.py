"""The UUIDs kvmrun spells out itself (the uuid module imports platform: ~3 ms of every start
of a changed profile): each is what the uuid module makes of it."""

from __future__ import annotations

import uuid

import pytest

from kvmrun.profile.model import name_uuid
from kvmrun.qemu import varstore


@pytest.mark.parametrize("name", ["kvmrun:web1", "kvmrun:", "kvmrun:ä-vm.1", "x" * 300])
def test_a_name_uuid_is_uuid5_in_the_url_namespace(name):
    assert name_uuid(name) == str(uuid.uuid5(uuid.NAMESPACE_URL, name))


def test_the_efi_global_variable_guid_is_stored_as_efi_stores_it():
    assert varstore.EFI_GLOBAL_VARIABLE == uuid.UUID(
        "8be4df61-93ca-11d2-aa0d-00e098032b8c").bytes_le
