"""Propagate stage: the private model and sample in; one :class:`~nhwc_audit.records.NodeRecord`
per node out (layouts, shapes, bytes, module path, source line, hidden copies). It records;
it never judges.

``chain`` (fx -> export -> eager recording, each capture checked against eager), ``runner``
(how a run executes: seed, autocast, the shared-weight guard, fake mode), ``interpreter``
(``LayoutProp``, an fx Interpreter), ``eager`` (the dispatch-level recorder for models no graph
captures), ``dispatch`` (hidden copies, in-place writes, the weight guard), ``replay``,
``replay_state``, ``replay_values``, ``call_keys`` and ``skeleton`` (the fx check without a second
forward or kept activations), ``compare`` (the one comparison of values), ``backward`` (gradient layouts).
"""
