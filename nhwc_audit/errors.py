"""Errors raised by nhwc-audit.

Every error a user can act on is a subclass of :class:`NhwcAuditError`; the CLI maps
them to exit code 2 and prints ``str(error)`` as one line (the full traceback only with
``--debug``). The tree::

    NhwcAuditError
    ├── UsageError            bad option value (malformed --input, unknown --dtype, ...)
    ├── TargetLoadError       the spec "pkg.mod:attr" could not be turned into a model
    ├── TraceError            the model could not be captured as a graph
    ├── PropagationError      the sample could not be run through the captured graph
    ├── ConversionError       the model could not be copied or converted to channels_last
    ├── ReportWriteError      a report file could not be written
    └── ChannelsLastError     raised by ``check()``: the model does not stay channels_last

``SharedWeightWrite`` is internal (never reaches a user): the audit caught the model
about to write to a weight it shares with the user's model, and starts again on copies. It
derives from ``BaseException``, like ``KeyboardInterrupt``: a signal to the audit, not an
error, so no ``except Exception`` (the audit's own or the model's) can swallow it. Its
subclass ``ValueDependentShapes`` says the same of an op whose output shape depends on values
read from weights whose values the shared copy permutes.

This module imports nothing from the package (and nothing heavy).
"""

from __future__ import annotations

__all__ = [
    "ChannelsLastError",
    "ConversionError",
    "NhwcAuditError",
    "PropagationError",
    "ReportWriteError",
    "SharedWeightWrite",
    "TargetLoadError",
    "TraceError",
    "UsageError",
    "ValueDependentShapes",
    "first_line",
    "model_advice",
    "said",
]


def first_line(e: BaseException) -> str:
    """``Type: first line of the message`` for one-line error reports.

    >>> first_line(ValueError("bad shape; more on the next line"))
    'ValueError: bad shape; more on the next line'
    """
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def said(e: BaseException) -> str:
    """:func:`first_line`, without the type for nhwc-audit's own errors (their message says it all).

    >>> said(UsageError("bad spec"))
    'bad spec'
    """
    text = str(e).strip()
    return text.splitlines()[0] if isinstance(e, NhwcAuditError) and text else first_line(e)


def model_advice(e: BaseException) -> str:
    """What to change for the model's own error ``e`` at the audited shapes: where its message names
    the cause, that (BatchNorm in training given one value per channel, a batch of 1 reaching a 1 x 1
    map, which eager raises too); else where a shape or dtype error comes from.

    >>> model_advice(ValueError("Expected more than 1 value per channel when training, got [1, 8, 1, 1]"))[:40]
    'BatchNorm in training needs more than on'
    >>> model_advice(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))[:35]
    'for a shape or dtype error, check t'
    """
    if "Expected more than 1 value per channel when training" in str(e):
        return (
            "BatchNorm in training needs more than one value per channel (a batch of 1 reaching a 1x1 map): "
            "audit a batch of 2 or more (--input 2x3x224x224), or the model in eval mode (model.eval())"
        )
    return (
        "for a shape or dtype error, check the input shapes (--input: random float tensors), or give inputs of "
        "other dtypes (integer ids, timesteps) from a build function that returns (model, inputs)"
    )


class NhwcAuditError(Exception):
    """Base of every error nhwc-audit raises on purpose; the message says what to change."""


class UsageError(NhwcAuditError):
    """An option has a value nhwc-audit cannot use (e.g. ``--input 1x3xax224``)."""


class TargetLoadError(NhwcAuditError):
    """The spec ``pkg.module:attr`` could not be imported, found, called or used as a model."""


class TraceError(NhwcAuditError):
    """The model could not be captured as a graph (torch.fx symbolic tracing failed).

    ``plain`` is what failed without the advice for an audit (a repair, which needs the graph, gives its own).
    """

    def __init__(self, message: str, *, plain: str | None = None):
        super().__init__(message)
        self.plain = plain or message


class PropagationError(NhwcAuditError):
    """Running the sample through the captured graph failed at a node.

    ``node`` is the graph node's name and ``node_format`` its ``format_node()`` text.
    """

    def __init__(self, message: str, *, node: str | None = None, node_format: str | None = None):
        super().__init__(message)
        self.node = node
        self.node_format = node_format


class ConversionError(NhwcAuditError):
    """The model could not be copied or converted to channels_last."""


class ReportWriteError(NhwcAuditError):
    """A report file could not be written (missing folder, no permission, ...)."""


class ChannelsLastError(NhwcAuditError):
    """``check()`` found nodes that leave channels_last; ``offenders`` lists the findings.

    The message has one line per offender: module path, op, source line and fix hint.
    """

    def __init__(self, message: str, *, offenders: tuple[object, ...] = ()):
        super().__init__(message)
        self.offenders = offenders


class SharedWeightWrite(BaseException):
    """The model was about to write in place to a weight the audit shares with the user's
    model (``op``); raised before the write happens. Internal: the audit re-runs on copies."""

    def __init__(self, op: str):
        super().__init__(f"the model writes to its own weights in forward ({op})")
        self.op = op


class ValueDependentShapes(SharedWeightWrite):
    """The model was about to run an op whose output shape depends on tensor values (``op``:
    ``nonzero``, boolean-mask indexing) on weights the audit reads restrided, whose values come
    out permuted: the shapes would not be the model's. Raised before the op runs; the audit
    starts again on copies of the weights, as for a write."""

    def __init__(self, op: str):
        BaseException.__init__(self, f"shapes depend on tensor values ({op})")
        self.op = op
