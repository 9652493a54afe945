"""An audit's findings: pure functions of node records, no torch, no I/O (the rest: :mod:`.analysis`).

The rules (one place each):

* break      the node raised on channels_last input (recorded by propagation).
* latent     a view of an NCHW input that raises when that input is channels_last (propagation
             re-runs views of NCHW tensors on a channels_last copy): fixing the revert upstream
             exposes it, so it is grouped with that revert.
* mixed      spatial inputs disagree (one channels_last, one NCHW; or a slice of either): activations, or a stored tensor
             (parameter, buffer, constant) read as data (:func:`.moves.data_inputs`; a 2D/3D one broadcast: :mod:`.reads`).
* revert     a copy into row-major (NCHW) order of a tensor whose memory runs along the channels
             (an NHWC input and an NCHW output, a rank >= 4 view of one made contiguous), or of a
             stored table in the order the conversion gave it (:mod:`.tables`).
* conversion an NCHW input, a channels_last output, data moved (e.g. a conv whose channels_last
             weights make it re-adopt NHWC from an NCHW input); or a node whose own layouts look
             fine but that copied data internally (copies seen at ATen level while it ran: a conv
             with padding_mode='circular', a kernel's copy of a channel slice dense in no order, or
             of a map's ``flatten(2)``, not row-major in channels_last, into row-major order).
* (intrinsic) a revert or conversion a convolution's kernel makes inside of its weight or of what
             it made (a CPU slow backend's copy of a Conv3d's weight into NCHW): no model change removes it.
* backward   with train=True: what a node's backward re-lays, or its kernels copy inside (a CPU
             channels_last convolution's weight gradient: intrinsic, no model change removes it).

Bytes are what channels_last adds: a node that also moves data when the model runs NCHW, as built
(``NodeRecord.nchw_bytes``, the NCHW baseline run's: ``.contiguous()`` after a permute, a conv
re-laying a transposed map, a matmul's copy inside, a copy NCHW makes upstream in the same line,
:func:`.displaced.displaced`) is charged the difference (:func:`.moves.baselined`).

A view (``permute``) or an in-place op moves no data: never a revert or a conversion (in-place
operands that disagree in layout are mixed; ``buf[...].copy_(x)`` copies across layouts). Ambiguous
tensors (C == 1, H == W == 1) decide nothing, but a convolution's output by its strides, nor do
those the conversion leaves as they are (:func:`.origin.conversion_free`: a relative-position bias)."""

from __future__ import annotations

from collections.abc import Sequence

from ..channels import conv_layout, relay_bytes
from ..dtypes import casts_first
from ..layout import along_w, channels_innermost, reorders, row_major
from ..records import GEMM_OPS, Finding, FindingKind, HiddenCopy, Layout, NodeRecord
from . import hint_keys as H
from . import moves
from . import origin as origins
from .exposed import exposed
from .finding_record import Ctx, make_finding, recomputed
from .hints import HintTable, default_hints
from .kernel_hints import average_pool, backward_hint, forward_inside, inside_hint
from .moves import computed_weight, revert_bytes, writes_in_place
from .origin import SKIP_OPS, conversion_free, disagreeing, feeds_a_weight, odd_order_from_map, origin_of
from .reads import as_read
from .reductions import reduces_across, reduction_revert, revert_hint
from .reshapes import exits_spatial, folds_tokens, is_reshape, viewed_as
from .tables import from_restrided_table, moved_out
from .zero_bytes import without_idle_reverts

__all__ = ["SKIP_OPS", "find_findings", "kernel_own"]
_NCHW_SIDE = (Layout.CONTIGUOUS, Layout.STRIDED)  # a layout change's strided end is NCHW-ordered


def _backward_findings(ctx: Ctx, r: NodeRecord) -> list[Finding]:
    """What this node's backward moves between layouts (train=True) beyond what it moves when the model
    runs NCHW: what its kernels copy of what they computed or of their weights (``HiddenCopy.result``: a
    CPU convolution's weight gradient; intrinsic, no model change removes it) beyond what they copy so
    there; the rest (gradients re-laid, a saved slice made dense) beyond the rest."""
    readers = [ctx.by_name[u] for u in r.users if u in ctx.by_name]
    users = ", ".join(sorted({u.op_name for u in readers})) or "the loss"
    out = []
    for inside, nchw in ((False, r.nchw_backward_bytes), (True, r.nchw_backward_inside)):
        copies = [c for c in r.backward if c.result is inside]
        nbytes = sum(c.bytes for c in copies) - nchw
        if nbytes <= 0:
            continue
        lead = max(copies, key=lambda c: c.bytes)
        # (a kernel's copy of what it computed, its weight gradient, is its own whatever feeds it the gradient:
        # a group of them named one source for convolutions of several, a new user's trial)
        ops = ", ".join(dict.fromkeys(c.op for c in copies)) + ("" if inside else f"; its gradient comes from {users}")
        out.append(
            make_finding(
                ctx,
                r,
                FindingKind.BACKWARD,
                layout_in=lead.layout_in,
                nbytes=nbytes,
                shape=lead.shape,
                detail=ops,
                hint_op=backward_hint(copies, inside, pooled=any(map(average_pool, (r, *readers)))),
                intrinsic=inside,
            )
        )
    return out


def kernel_own(r: NodeRecord, stored: Layout = Layout.CHANNELS_LAST) -> list[HiddenCopy]:
    """What its convolution's kernel copied of its own (``r.inside``) but of a weight not laid out as the
    run lays out stored weights (``stored``: channels_last, or NCHW as built): one computed in forward, a
    tensor attribute, a constant the conversion leaves NCHW, whose re-lay the rules charge (a mixed op)."""
    ruled = {i.meta.shape for i in r.inputs[1:2] if not i.is_param or i.meta.layout is not stored}
    return [c for c in r.inside if c.shape not in ruled]


def _inside_findings(ctx: Ctx, r: NodeRecord) -> list[Finding]:
    """What its convolution's kernel copied of its weight or of what it made (:func:`kernel_own`: the
    CPU's slow backends copy a channels_last weight into NCHW every call) beyond what the same node's
    kernels copy so when the model runs NCHW: intrinsic, the kernel's own doing at this shape."""
    own = kernel_own(r)
    nbytes = sum(c.bytes for c in own) - r.nchw_inside
    if not own or nbytes <= 0:
        return []
    lead = max(own, key=lambda c: c.bytes)
    kind = FindingKind.REVERT if lead.layout_out in _NCHW_SIDE else FindingKind.CONVERSION
    weight, x = (r.inputs[1].meta.shape if len(r.inputs) > 1 else None), (r.inputs[0].meta.shape if r.inputs else ())
    what = ", ".join(
        dict.fromkeys(("its weight " if c.shape == weight else "") + "x".join(map(str, c.shape)) for c in own)
    )
    return [
        make_finding(
            ctx,
            r,
            kind,
            layout_in=lead.layout_in,
            nbytes=nbytes,
            shape=lead.shape,
            detail=f"it copies {what}",
            hint_op=forward_inside(own, x),
            intrinsic=True,
        )
    ]


def _forward_findings(ctx: Ctx, r: NodeRecord) -> list[Finding]:
    if r.error is None and r.latent_error is None and not r.hidden and r.all_channels_last:
        return []  # nothing in another order, nothing copied inside: no rule below finds anything
    raw, r = r, as_read(r)  # (a 2D/3D table a pointwise op broadcasts: read as its 4D/5D view)
    if r.error is not None:
        first = next((i.meta.layout for i in r.spatial_inputs), Layout.NOT_SPATIAL)
        return [make_finding(ctx, r, FindingKind.BREAK, layout_in=first, nbytes=0)]
    if r.latent_error is not None:
        nchw = next((i for i in r.spatial_inputs if i.meta.layout is Layout.CONTIGUOUS), None)
        producer = ctx.by_name.get(nchw.producer or "") if nchw is not None else None
        origin = origin_of(producer, ctx.by_name)
        # latent only where the audit advises a change that would hand it channels_last: its NCHW input
        # comes from a revert (not an attention matmul, NCHW anyway) whose input's layout it cannot view
        reverts = origin is not None and any(f.kind is FindingKind.REVERT for f in _forward_findings(ctx, origin))
        if nchw is not None and origin is not None and reverts and (origin is not producer or exposed(r, nchw, origin)):
            return [make_finding(ctx, r, FindingKind.LATENT, layout_in=Layout.CONTIGUOUS, nbytes=0, producer=producer)]
        return []
    if r.name in ctx.free:
        return []  # its inputs are those of the NCHW model: it does what it does there
    if r.outputs and all(o.numel == 0 for o in r.outputs):  # writes nothing (an ROI op of no boxes)
        return _hidden_findings(ctx, r)
    in_place = writes_in_place(r)
    if (r.aliases_input and not in_place) or moves.allocates(r):
        # a view, an allocation: moves no data; ``buf[..].copy_(x)`` copies what it records
        return _hidden_findings(ctx, r) if moves.copies_into(r) else []
    ins = [i for i in moves.data_inputs(r, ctx.stored) if i.meta.is_spatial]
    assigned = not r.outputs and ins and r.op_name.strip("_") == "setitem"  # x[i] = y: in x's layout
    if (transposes := reduces_across(r)) is not None:  # a reduction: by the order of the dims it keeps
        return [reduction_revert(ctx, r)] if transposes else _hidden_findings(ctx, r)
    conv = r.convolves and r.outputs  # (one output channel: the format it computed in)
    out = ins[0].meta.layout if assigned else conv_layout(r.outputs[0], moves.conv_ins(r)) if conv else r.output_layout
    # written in place from a slice of an NHWC map (``z[:, :4] += y[:, :4]``, z NCHW): read across as a whole map is
    nhwc = [i for i in ins if in_place and origins.sliced_channels_last(i.meta)]
    cl_in = [i for i in ins if (i.meta.layout is Layout.CHANNELS_LAST or i in nhwc) and i.producer not in ctx.free]
    cl_in = [i for i in cl_in if not moves.converted_weight(r, i, ctx.by_name)]
    nchw_in = [i for i in ins if moves.other_side(r, i)]
    if cl_in and nchw_in:
        losers = nchw_in if out is Layout.CHANNELS_LAST else [*cl_in, *moves.strided_across(r)]  # (x.mT too)
        if 0 < (nbytes := moves.mixed_bytes(r, losers)) <= r.nchw_bytes and out is Layout.CHANNELS_LAST:
            return []  # it stays NHWC and reads no more across orders than NCHW does (x + x.mT)
        weight = computed_weight(r, nchw_in, ctx.by_name)
        stored = all(i.is_param for i in losers)  # a parameter, buffer or constant re-laid
        # op-specific mixed hints explain an NCHW first operand, else the generic one (a 2D/3D table: its own)
        plain = None if out is Layout.CONTIGUOUS else ""  # (lifted by :func:`.reads.as_read`: a 2D/3D table)
        generic = (H.LOW_RANK_TABLE if losers[0] not in raw.inputs else H.STORED_OPERAND) if stored else plain
        source = weight if weight is not None else (losers if stored else nchw_in)[0]  # the root cause
        return [
            make_finding(
                ctx,
                r,
                FindingKind.MIXED,
                layout_in=Layout.CHANNELS_LAST if out is Layout.CONTIGUOUS else Layout.CONTIGUOUS,
                nbytes=nbytes,
                producer=ctx.by_name.get(source.producer or ""),
                shape=losers[0].meta.shape,
                hint_op=H.COMPUTED_WEIGHT if weight is not None else generic,
            )
        ]
    if r.aliases_input:
        return []  # in place into its own first operand, layouts agreeing: nothing moves
    reverted = [o for o in r.outputs if row_major(o) or along_w(o) or moves.reordered(r, o, ctx.by_name)]
    if reverted and exits_spatial(r, reverted, ctx.by_name):
        return []  # a flatten out of the spatial ranks: an exit, not a finding (as in a graph)
    # an ambiguous input counts when its strides lean channels_last (kernels follow them: a C == 1 volume)
    viewed = viewed_as(r, reverted, ctx.by_name)
    # the activations, and 4D parameters the conversion re-laid (timm Hiera's position embedding, tiled)
    read = [i for i in r.inputs if not i.is_param or (i.meta.rank >= 4 and not r.convolves)]
    sources = [i for i in read if reverted and i.producer not in ctx.free and moved_out(i, viewed, ctx.by_name)]
    roots, losers = disagreeing(r, cl_in, nchw_in, sources) if reverted else ([], [])
    if roots:  # (inputs that disagree, a slice among them: :func:`.origin.disagreeing`)
        others = [i for i in read if i not in losers]
        nbytes = moves.mixed_bytes(r, cl_in) if cl_in else revert_bytes(r, losers, reverted, others)
        at, shape, kind = ctx.by_name.get(roots[0].producer or ""), losers[0].meta.shape, FindingKind.MIXED
        return [make_finding(ctx, r, kind, layout_in=Layout.CHANNELS_LAST, nbytes=nbytes, producer=at, shape=shape)]
    if reverted and not (row_major(reverted[0]) or along_w(reverted[0])):  # another order than NCHW:
        sources = [i for i in sources if reorders(i.meta, reverted[0])]  # only what changes order moves
    if not (reverted and sources) and (relaid := moves.relaid_views(r, ctx.by_name)):
        reverted, sources = [r.outputs[0]], relaid  # its format flags say nothing (C == 1 views)
    if reverted and sources and r.op_name.lower() not in GEMM_OPS:  # a GEMM computes its output's layout
        # from inputs dense in both orders (C == 1 at batch 1) a kernel computes straight into NCHW: where the
        # network leaves channels_last (the region starts here), no copy is made; the conversions downstream pay
        exit_only = all(i.meta.layout is Layout.AMBIGUOUS for i in sources)
        nbytes = 0 if exit_only else revert_bytes(r, sources, reverted, [i for i in read if i not in sources])
        hint = revert_hint(sources[0].meta, reverted[0])
        if all(i.is_param or from_restrided_table(i, ctx.by_name) for i in sources):  # the conversion restrided it
            hint = H.WEIGHT_RESHAPE if feeds_a_weight(r, ctx.by_name) else H.STORED_TABLE
        return [
            make_finding(
                ctx,
                r,
                FindingKind.REVERT,
                layout_in=sources[0].meta.layout,
                nbytes=nbytes,
                shape=reverted[0].shape,
                hint_op=hint,
            )
        ]
    # each NCHW input re-laid whole (as stored), in the dtype the kernel reads it (none where NCHW re-lays as much)
    cast_first = casts_first(r)
    nbytes = sum(relay_bytes(i.meta, (r.outputs or [i.meta])[0], conv=True, cast_first=cast_first) for i in nchw_in)
    # what a conv inside re-laid instead: the padded map of a circular or reflect padding_mode, not its input
    nbytes = max(nbytes, sum(h.bytes for h in r.hidden if h.computed and h.layout_out is Layout.CHANNELS_LAST))
    relaid_in_nchw = r.nchw_bytes >= nbytes
    if nchw_in and out is Layout.CHANNELS_LAST and not relaid_in_nchw:
        producer = ctx.by_name.get(nchw_in[0].producer or "")
        folded = H.TOKENS_TO_MAP if folds_tokens(producer) else None
        return [
            make_finding(
                ctx,
                r,
                FindingKind.CONVERSION,
                layout_in=Layout.CONTIGUOUS,
                nbytes=nbytes,
                producer=producer,
                shape=nchw_in[0].meta.shape,
                hint_op=H.ONE_CHANNEL if conv and r.output_layout is Layout.AMBIGUOUS else folded,
            )
        ]
    across = moves.read_across(r) if len(moves.data_inputs(r, ctx.stored)) > 1 else []  # (a 6D involution's too)
    if across and (nbytes := moves.reorder_bytes(r)) > r.nchw_bytes:
        # operands in dense orders no layout names (NHWC tokens of a map plus an NCHW map permuted alike)
        producer = ctx.by_name.get(across[0].producer or "")
        return [
            make_finding(ctx, r, FindingKind.MIXED, layout_in=across[0].meta.layout, nbytes=nbytes, producer=producer)
        ]
    return _hidden_findings(ctx, r)


def _hidden_findings(ctx: Ctx, r: NodeRecord) -> list[Finding]:
    assigns = not r.outputs and any(i.meta.rank >= 4 for i in r.activation_inputs)  # x[...] = y
    # a weight reshaped in forward copies out of NHWC whatever its output's rank: only activations exit
    of_weight = any(i.is_param and i.meta.rank >= 4 for i in r.inputs)
    mapped = any(h.reorder for h in r.hidden) and any(odd_order_from_map(i, ctx.by_name) for i in r.activation_inputs)
    copies = [h for h in r.hidden if mapped or not h.reorder]
    nbytes = sum(h.bytes for h in copies)
    into_nhwc = all(h.computed and h.layout_out is Layout.CHANNELS_LAST for h in copies)  # (a weight a conv re-lays)
    if (into_nhwc or all(h.reorder or h.densified for h in copies)) and nbytes <= r.nchw_bytes:
        return []  # none, reorders (a window partition's), slices made dense, re-lays into NHWC: in NCHW too
    # a reshape's copy out of the spatial ranks is an exit; one an op computes (an einsum over H and W) is not
    exit = is_reshape(r) and not any(o.rank >= 4 for o in r.outputs) and not any(h.computed for h in copies)
    if exit and not (assigns or of_weight):
        return []
    # the node left (and maybe re-entered) NHWC internally; copies out of NHWC only are a revert
    lead = next((h for h in copies if not h.reorder), copies[0])
    out_only = not lead.reorder and all(
        h.reorder or (h.layout_in is Layout.CHANNELS_LAST and h.layout_out in _NCHW_SIDE) for h in copies
    )
    # and so is a node that reads a channels_last map and writes NCHW, whatever order its copies read (w @ x)
    left = any(channels_innermost(i.meta) for i in r.spatial_inputs) and all(map(row_major, r.outputs))
    kind = FindingKind.REVERT if out_only or (left and bool(r.spatial_outputs)) else FindingKind.CONVERSION
    fold = r.op_name.lower() in GEMM_OPS and any(o.rank >= 4 for o in r.outputs)
    table = out_only and (of_weight or any(i.meta.rank >= 4 and from_restrided_table(i, ctx.by_name) for i in r.inputs))
    stored = (H.WEIGHT_RESHAPE if feeds_a_weight(r, ctx.by_name) else H.STORED_TABLE) if table else None
    hint = stored or (H.HEAD_FOLD if fold else inside_hint(copies, any(o.rank >= 4 for o in r.outputs)))
    found = make_finding(
        ctx, r, kind, layout_in=lead.layout_in, nbytes=nbytes, shape=lead.shape, hint_op=hint, hidden=True
    )
    return [found]


def find_findings(
    records: Sequence[NodeRecord],
    *,
    bandwidth: float,
    device: str = "cpu",
    hints: HintTable | None = None,
    stored: frozenset[str] | None = None,
) -> list[Finding]:
    """Every finding, in graph order (``stored``: for the model as built, the nodes of its stored tensors that are no parameters)."""
    ctx = Ctx(
        by_name={r.name: r for r in records},
        bandwidth=bandwidth,
        hints=hints if hints is not None else default_hints(),
        device=device,
        free=conversion_free(records),
        stored=stored,
        ranks=frozenset(r.outputs[0].rank for r in records if r.convolves and r.outputs) or frozenset({4}),
    )
    out = [
        f
        for r in records
        if r.op not in SKIP_OPS
        for f in recomputed(r, _forward_findings(ctx, r) + _inside_findings(ctx, r)) + _backward_findings(ctx, r)
    ]
    return without_idle_reverts(out, records, ctx.by_name)  # (0 B reverts that change nothing are none)
