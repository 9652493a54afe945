"""Analyze stage: node records in (:mod:`nhwc_audit.records`), conclusions out. Pure functions,
no torch execution, no I/O.

``findings`` (the rules: break, revert, mixed, conversion, backward, each traced to its root
cause), ``hints`` (one table of fix hints), ``analysis`` (NCHW regions, hotspots, fixes grouped
by root cause, the summary; :func:`~nhwc_audit.analyze.analysis.analyze` runs them all),
``verdict`` (convert or not), ``divergence`` (fake against real), ``displaced`` (a copy the
NCHW model makes one op earlier, for the NCHW baseline).
"""
