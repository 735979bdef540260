"""Durable background jobs: one `jobs` table, claimed under a lease by job runners.

Work that outlives a request (probes, cohort pulls, exports, worklist resolves, retrievals) is a row
queued by whoever asks (app.jobs.queue.enqueue) and run by a JobRunner (app.jobs.runner) in the API
process (RADCOHORT_API_RUNS_JOBS) or in `radcohort worker --queues ...`. A claim is one compare-and-set
UPDATE; the holder renews its lease every heartbeat; a lease older than the stale time belongs to a
stopped process and the next claim takes the job over. Cancellation is a flag read at the handler's
checkpoints. Training and scoring keep their own tables on the same claim pattern (app.training.jobs).
See docs/jobs.md.
"""
