"""Integrations with the tools users train with: an audit in the user's own training loop.
``lightning``: a PyTorch Lightning callback (``pytorch-lightning`` 2.x, imported only here)."""
