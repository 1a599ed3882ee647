"""One module per `u2seg` command, each exposing `run(cfg) -> manifest`."""
