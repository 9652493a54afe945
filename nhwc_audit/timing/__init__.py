"""Timing stage: a model in; measured seconds out. ``bandwidth`` times one NCHW->NHWC copy on
the audited device (bytes into seconds for every estimate); ``measure`` times the NCHW, naive
channels_last and repaired models side by side and attributes copy kernels to graph nodes.
"""
