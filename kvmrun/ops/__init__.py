"""Operations: what the verbs do, over the layers below (launch, power, inspect, defined VMs,
networks as a whole, systemd units, doctor, ssh). The CLI and the web UI are thin faces
over these functions; nothing here prints or exits."""
