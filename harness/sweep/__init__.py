"""``python -m harness sweep``: a matrix of (model, format, point, job) run as Ray tasks.

A plan (:mod:`harness.sweep.plan`) expands into jobs, each the argument list of a CLI subcommand;
:mod:`harness.sweep.tasks` runs one job through the subcommand's own functions; :mod:`harness.sweep.run`
schedules them on Ray and stores every document atomically at a path derived from the hash of the
job's definition (:mod:`harness.sweep.store`), so a re-run resumes; :mod:`harness.sweep.report`
writes the summary and heatmaps and gates two sweeps job by job.
"""
