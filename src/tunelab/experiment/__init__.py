"""Orchestration: what a comparison runs (the job, one run per method) and the experiment folder it writes."""
