"""Signed negative-result bundles: export, verify, keys (installed as sasgate.archive)."""
