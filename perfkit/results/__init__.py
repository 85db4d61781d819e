"""Results: reading runs' records, per-device reports, a comparison of two runs, the history of many.

The package's face. Behind it: ``load`` (results files, device names, cells), ``frame`` (the summary frame
and its figures), ``text``, ``plots`` and ``html`` (the report's words, plots and page), ``report`` (the
report folders), ``compare`` and ``history``. Every statistic is ``perfkit.stats``'s.
"""

from perfkit.results.compare import Comparison, compare_files, run_compare
from perfkit.results.history import run_history
from perfkit.results.load import Results, ResultsError, device_name, device_slug, load_results, merge_records
from perfkit.results.report import build_reports

__all__ = ["Comparison", "Results", "ResultsError", "build_reports", "compare_files", "device_name", "device_slug",
           "load_results", "merge_records", "run_compare", "run_history"]
