"""Test-only helpers: tiny model configs per family, the slow reference S2-Attn, tiny models and launch set-ups."""
