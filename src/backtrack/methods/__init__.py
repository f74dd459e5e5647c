"""Method families (one module per family), wired into the pipeline by `backtrack.arms`."""
