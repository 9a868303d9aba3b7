"""Search strategies, behind a registry."""
