"""Jobs: one module per stage, over a shared job context (cdm.jobs.context)."""
