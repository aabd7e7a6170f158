"""Guest networks on the host: names (pure), links, definitions of named networks, checks
before a launch, a guest's NICs, isolated networks and their hub, NAT networks.
Nothing is imported here: `python -m kvmrun.net.hub` must stay light."""
