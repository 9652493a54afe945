"""Report stage: an :class:`~nhwc_audit.result.AuditReport` in; text, JSON and HTML out. Never
runs torch.

``text`` (every presentation rule in words: headline, counts, labels, units), ``serialize``
(JSON schema ``nhwc-audit/1``), ``html`` (view model + jinja2 templates, one self-contained
file; the notebook view), ``console`` (rich renderables for the terminal), ``files`` (atomic
writes).
"""
