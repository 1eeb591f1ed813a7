"""Hub watcher: reports when new SAE releases cover the required tuples (installed as sasgate.watch)."""
