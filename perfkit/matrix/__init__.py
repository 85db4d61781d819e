"""The benchmark matrix: profiles, options and their resolution, the plan, shards, worker processes, jobs, summary."""
