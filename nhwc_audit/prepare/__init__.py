"""Prepare stage: the user's spec, model and inputs in; a private channels_last copy and sample
out. The user's model and tensors are never modified.

``load`` (spec "pkg.mod:build_fn" -> model and example inputs; option parsing), ``copy`` (the
audit's copy: weights read in place with channels_last strides; the public ``convert``),
``fake`` (FakeTensor copies for fake mode: no weights, no compute).
"""
