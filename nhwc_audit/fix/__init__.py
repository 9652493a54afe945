"""Repair stage: a model (and, when there is one, the audit's fx graph) in; a repaired
channels_last GraphModule and a :class:`~nhwc_audit.fix.repair.RepairLog` out.

``rewrites`` (what can be rewritten, in priority order), ``equivalence`` (same outputs and
gradients, float64 or calibrated), ``repair`` (try, re-measure, check, keep).
"""
