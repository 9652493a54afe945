"""Capture stage: an ``nn.Module`` in, a graph out (``Capture``: root module + fx graph), with
each node's module path, module type, op mode and user source line (:mod:`.context`).

``fx.trace`` (torch.fx symbolic trace) and ``export.export`` (torch.export, non-strict);
``source`` holds the one rule for "the user's line". Nothing here runs the model on data:
running it is the propagate stage's job, which also owns the fallback chain between captures.
"""
