"""`kvmrun ui`: the local web front end (server, websocket bridges, static pages)."""
