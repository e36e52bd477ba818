"""The lifecycle of sources: forget samples or a source, add a source, serve with access rights."""
