"""Pure core of cdm: torch and the standard library only (no Lightning, Hydra or file I/O)."""
