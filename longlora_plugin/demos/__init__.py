"""The embedded CPU demos behind ``longlora demo``: the passkey context extension (default) and ``--quick``."""
