"""The benchmark matrix: profiles, options, the plan, shards, worker processes and launched jobs."""
