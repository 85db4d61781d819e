"""Results: loading records, summaries, reports, comparisons and history."""
