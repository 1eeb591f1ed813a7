"""One module per DVC stage (installed as sasgate.stages); each has run(params, paths)."""
