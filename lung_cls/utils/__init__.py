"""Small shared helpers: atomic file writes, clean user-facing errors, OmegaConf resolvers."""

from lung_cls.utils.io import atomic_savez, atomic_write_json, atomic_write_text, write_csv_atomic

__all__ = ["atomic_savez", "atomic_write_json", "atomic_write_text", "write_csv_atomic"]
