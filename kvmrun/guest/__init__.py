"""The light guest wing: what runs beside every guest (the supervisor) and what every
command that talks to a running guest needs. Standard library and kvmrun's ground floor
only (tests/unit/test_layers.py checks it): one supervisor per guest must stay small.

    rundir      the run directory, its state record, identity-checked liveness, the lock
    launch      the versioned launch record
    qmp         the synchronous QMP client
    shutdown    the shutdown ladder
    ending      why a guest ended, and the one end-of-guest clean-up
    netrecord   the network record of a guest and its teardown
    notify      sd_notify, the unit a process runs in, a directory watch (dnotify)
    supervisor  the supervisor process (python -m kvmrun.guest.supervisor)
    console     relaying a terminal to the serial console
"""
