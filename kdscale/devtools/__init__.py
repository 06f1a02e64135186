"""Developer tools that run in CI: the import-layer checker (``check_layers``)."""
