"""Which models exist and what is on disk: the registry, model references, local folders, list/show/rm, tiny models."""
