"""The report: ``build.build_report`` writes ``report.html`` and ``report.md`` of runs and comparisons."""
