"""The built-in job kinds (none yet: probes, cohort pulls, exports, worklist resolves and retrievals move
onto the jobs table next)."""
