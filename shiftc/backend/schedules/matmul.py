"""Register-blocked CPU schedules for matmul-like PrimFuncs with symbolic extents.

Matches a fused PrimFunc whose first block is ``C[..., m, n] += A[..., m, k] * B[..., k, n]``
(one reduction axis, float32, any number of leading "outer" axes, any of which may be symbolic)
followed by injective epilogue blocks (bias add, residual add, SiLU gating, scale + mask, ...).

Two micro-kernels (BLIS-style, expressed with TIR primitives)::

    gemm (m > 1):
    A_pad = A padded along m to a multiple of MR   (only when m is not known to divide)
    parallel for (outer..., n_o, m_o):             # one MR x NR tile of C per iteration
        acc[MR, NR] = 0                            # < 1024 bytes -> alloca -> registers
        for k:
            unroll m_i < MR:  unroll n_v:  vector(lanes) acc[m_i, n] += A[m, k] * B[k, n]
        epilogue(acc) -> output tile               # fused elementwise ops, vectorised

    gemv (m == 1, decode):
    parallel for (outer..., n_o):                  # one row, an NG-wide tile (NG >= NR)
        acc[NG] = 0
        for k:  unroll n_v:  vector(lanes) acc[n] += A[k] * B[k, n]
        epilogue(acc) -> output

With a symbolic m both are generated and the function body is ``if m == 1: gemv else: gemm``
(one branch per call), so decode does not pay the MR-row padding (MR x the FMAs, an A copy) and
streams the weight with several panels in flight. Static shapes use the same kernels: a static
unit m (``[1, K]``, ``[1, 1, K]``) is removed by block normalisation, the output is then indexed
``C[0, n]`` and the gemv kernel runs; a small static m gets ``ceil(m / MR)`` equal row tiles
(m = 3: one 3-row tile, m = 8: two 4-row tiles), so it is not padded to MR. ``pad_einsum`` pads m (and, if needed, n) so
the register tile never carries a predicate inside the k loop.

The accumulator is a "global"-scope buffer of under 1024 bytes on purpose: TVM lowers such a
constant-size allocation to an LLVM alloca, which SROA promotes to registers once the tile loops
are unrolled. A "local" or larger allocation becomes a TVMBackendAllocWorkspace call per tile;
LLVM then cannot prove it does not alias A_pad and stores the whole tile on every k step (this
alone cost 2x on GEMM). Hence AVX-512 uses MR x NR = 6 x 32 (12 zmm accumulators, 768 bytes)
rather than 8 x 32 or 4 x 64 (exactly 1024 bytes).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.ir.expr import TensorLoad as _BufferLoad
from tvm.target import Target
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule

from .common import is_llvm, normalized, parallel_outer, vars_in, vectorize_innermost


def _match_mac(block: tirx.SBlock):
    """(C, A, B) buffer loads if ``block`` computes C = C + A * B (in either operand order)."""
    store = block.body
    if not isinstance(store, tirx.BufferStore):
        return None
    value = store.value
    if not isinstance(value, tirx.Add):
        return None
    lhs, rhs = value.a, value.b
    if isinstance(rhs, _BufferLoad) and rhs.source.same_as(store.buffer):
        lhs, rhs = rhs, lhs
    if not (isinstance(lhs, _BufferLoad) and lhs.source.same_as(store.buffer)):
        return None
    if not isinstance(rhs, tirx.Mul):
        return None
    a, b = rhs.a, rhs.b
    if not (isinstance(a, _BufferLoad) and isinstance(b, _BufferLoad)):
        return None
    if block.init is None:
        return None
    return store, a, b


def _max_acc_floats() -> int:
    # TVM places a constant-size "global" allocation below 1024 bytes on the stack (an LLVM alloca,
    # which SROA turns into registers once the tile loops are unrolled). Anything larger, and any
    # "local" allocation, becomes a TVMBackendAllocWorkspace call per tile: LLVM then cannot
    # prove the accumulator does not alias A, and stores the whole tile back on every k step.
    return 1024 // 4 - 1


class Matmul(ScheduleRule):
    """C[..., m, n] = sum_k A[..., m, k] * B[..., k, n] (+ injective epilogue).

    Two micro-kernels, one function: ``gemm`` (an MR x NR register tile, m padded to MR) and
    ``gemv`` (one row, a wide n tile, no padding, several weight panels streamed at once). With a
    static m the matching one is used; with a symbolic m (decode and prefill share the function)
    both are generated and the body branches on ``m == 1`` once per call.
    """

    def __init__(self, lanes: int = 16, mr: int = 6, nvec: int = 2, gemv_nvec: int = 8, parallel: bool = True):
        self.lanes = lanes
        self.mr = mr
        self.nvec = nvec
        self.gemv_nvec = gemv_nvec
        self.parallel = parallel

    def apply(self, func, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not is_llvm(target):
            return None
        try:
            return self.schedule(func)
        except Exception:  # a pattern we do not handle: leave the function to other rules
            return None

    def packable(self, func) -> tuple[int, int] | None:
        """(param index of B, NR) when B is a static 2-D [K, N] parameter the rule can pack."""
        try:
            info = self._analyze(func)
        except Exception:
            return None
        if info is None or not info["packable"]:
            return None
        return info["b_param"], info["nr"]

    def schedule(self, func, pack: bool = False):
        """A schedule (or a ``.mod`` holder) for ``func``; ``pack``: B is read as [N/NR, K, NR]."""
        info = self._analyze(func)
        if info is None or (pack and not info["packable"]):
            return None
        m_ext = info["m_ext"]
        if info["m_pos"] is None or (isinstance(m_ext, int) and m_ext == 1):
            sch = self._schedule(func, info, "gemv", pack)
        elif isinstance(m_ext, int):
            sch = self._schedule(func, info, "gemm", pack)
        else:
            gemm = self._schedule(func, info, "gemm", pack)
            gemv = self._schedule(func, info, "gemv", pack)
            sch = s_tir.Schedule(_branch(gemm.mod["main"], gemv.mod["main"], m_ext))
        if pack:
            # B[k, n] -> Bp[n // NR, k, n % NR]: each NR-wide panel is one contiguous stream.
            # Applied once to the whole function, so both kernels read the same packed buffer.
            _pack_b(sch, sch.mod["main"].params[info["b_param"]], info["nr"])
        return sch

    # -- analysis ---------------------------------------------------------------------------
    def _analyze(self, func):
        got = normalized(func)
        if got is None:
            return None
        sch, infos = got
        main = infos[0]
        if main.dom_kind() != "S" * (len(main.iters) - 1) + "R":
            return None
        if any(not bi.is_injective() for bi in infos[1:]):
            return None
        block = sch.get(main.block_rv)
        mac = _match_mac(block)
        if mac is None:
            return None
        store, load_a, load_b = mac
        if store.buffer.dtype != "float32":
            return None
        iter_vars = [iv.var for iv in block.iter_vars]
        k_var = iter_vars[-1]
        spatial = iter_vars[:-1]
        uses_a = vars_in(load_a.indices)
        uses_b = vars_in(load_b.indices)
        if k_var not in uses_a or k_var not in uses_b:
            return None
        # B is the operand indexed by n; n must be the last spatial axis and B's innermost index.
        n_var = spatial[-1]
        if n_var in uses_a and n_var not in uses_b:
            load_a, load_b = load_b, load_a
            uses_a, uses_b = uses_b, uses_a
        if n_var in uses_a or n_var not in uses_b:
            return None
        if not (isinstance(load_b.indices[-1], tirx.Var) and load_b.indices[-1].same_as(n_var)):
            return None
        # Output must be indexed by the spatial axes in order (C[..., m, n]). Static unit axes
        # (m == 1, a leading batch of 1) are gone from the normalised block and index C with a
        # constant 0: C[0, n] is a one-row product, scheduled by the gemv kernel below.
        var_indices = [i for i in store.indices if not (isinstance(i, tirx.IntImm) and i.value == 0)]
        if len(var_indices) != len(spatial) or not all(
            isinstance(i, tirx.Var) and i.same_as(v) for i, v in zip(var_indices, spatial)
        ):
            return None
        # m: the innermost spatial axis (before n) that indexes A only
        m_pos = next((pos for pos in range(len(spatial) - 2, -1, -1)
                      if spatial[pos] in uses_a and spatial[pos] not in uses_b), None)
        n_pos = len(spatial) - 1
        n_ext = _int(main.iters[n_pos].dom)
        m_ext = _int(main.iters[m_pos].dom) if m_pos is not None else 1
        nr = _pick_tile(n_ext, self.lanes, self.nvec)
        b_buf = load_b.source
        b_param, packable = _weight_param(func, load_b, k_var, n_ext, nr, self.lanes)
        return {
            "n_iters": len(iter_vars),
            "n_spatial": len(spatial),
            "m_pos": m_pos,
            "n_pos": n_pos,
            "m_ext": m_ext,
            "n_ext": n_ext,
            "nr": nr,
            "b_param": b_param,
            "b_name": b_buf.name,
            "packable": packable,
            "names": [bi.name for bi in infos],
        }

    # -- scheduling -------------------------------------------------------------------------
    def _tile(self, info, variant: str, pack: bool) -> tuple[int, int]:
        """(rows, columns) of the register tile."""
        if variant == "gemm":
            mr, nr = self.mr, info["nr"]
            # the accumulator tile must stay below TVM's stack-allocation limit
            while mr > 1 and mr * nr > _max_acc_floats():
                mr -= 1
            if isinstance(info["m_ext"], int):
                # static m: as many row tiles as MR needs, rows spread evenly over them, so a
                # small m (2..MR) runs unpadded and m = 8 pads to 2 x 4 rows, not 2 x 6
                tiles = -(-info["m_ext"] // mr)
                mr = -(-info["m_ext"] // tiles)
        else:
            mr = 1
            nr = _pick_gemv_tile(info["n_ext"], self.lanes, self.gemv_nvec, info["nr"] if pack else None)
        return (1 if info["m_pos"] is None else mr), nr

    def _schedule(self, func, info, variant: str, pack: bool):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        main = infos[0]
        lanes = self.lanes
        n_pos, m_pos = info["n_pos"], info["m_pos"]
        mr, nr = self._tile(info, variant, pack)

        padding = [1] * info["n_iters"]
        padding[n_pos] = nr
        if m_pos is not None and mr > 1:
            padding[m_pos] = mr
        names_before = {bi.name for bi in infos}
        if any(p > 1 for p in padding):
            sch.pad_einsum(main.block_rv, padding)
        epilogues, producers = _epilogues_and_producers(sch, main, infos, names_before)
        main_rv = main.block_rv
        # Inline all epilogues but the last.
        for b in epilogues[:-1]:
            sch.compute_inline(b)
        last = epilogues[-1] if epilogues else None

        loops = sch.get_loops(main_rv)
        k_loop = loops[-1]
        outer = list(loops[: info["n_spatial"]])
        n_loop = outer[n_pos]
        n_o, n_i = sch.split(n_loop, [None, nr])
        if m_pos is not None and mr > 1:
            m_loop = outer[m_pos]
            m_o, m_i = sch.split(m_loop, [None, mr])
            rest = [l for p, l in enumerate(outer) if p not in (m_pos, n_pos)]
            sch.reorder(*rest, n_o, m_o, k_loop, m_i, n_i)
            par = rest + [n_o, m_o]
        else:
            # gemv: m (extent 1 at run time, or absent) stays an outer loop
            rest = [l for p, l in enumerate(outer) if p != n_pos]
            sch.reorder(*rest, n_o, k_loop, n_i)
            par = rest + [n_o]
            m_i = None
        tile = sch.fuse(*par) if len(par) > 1 else par[0]
        if self.parallel:
            sch.parallel(tile)
        if last is None:
            sch.cache_write(main_rv, 0, "global")
            last = sch.get_consumers(main_rv)[0]
        else:
            sch.set_scope(main_rv, 0, "global")
        sch.reverse_compute_at(last, tile, preserve_unit_loops=True)
        if m_i is not None:
            sch.unroll(m_i)
        n_iv, n_vec = sch.split(n_i, [None, lanes]) if nr % lanes == 0 and nr > lanes else (None, n_i)
        if n_iv is not None:
            sch.unroll(n_iv)
        sch.vectorize(n_vec)
        sch.decompose_reduction(main_rv, k_loop)
        # epilogue: vectorise its innermost (n) loop
        vectorize_innermost(sch, last, lanes)
        # padding copies (A_pad / B_pad): plain parallel copies at the root
        for b in producers:
            if sch.get_loops(b):
                parallel_outer(sch, b, lanes, self.parallel)
        return sch


def _int(e):
    return e.value if isinstance(e, tirx.IntImm) else e


def _epilogues_and_producers(sch, main, infos, names_before: set) -> tuple[list, list]:
    """After pad_einsum: the blocks after the matmul (the copy out of the padded accumulator first,
    then the original epilogues) and the padding copies before it."""
    acc_buffer = sch.get(main.block_rv).writes[0].source
    epilogues = [bi.block_rv for bi in infos[1:]]
    producers = []
    copy_out = None
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        stmt = sch.get(b)
        if stmt.name_hint in names_before:
            continue
        if any(r.source.same_as(acc_buffer) for r in stmt.reads):
            copy_out = b
        else:
            producers.append(b)
    return ([copy_out] if copy_out is not None else []) + epilogues, producers


def _weight_param(func, load_b, k_var, n_ext, nr: int, lanes: int) -> tuple[int | None, bool]:
    """(index of B among the function's parameters or None, whether B can be packed at compile
    time: a static 2-D [K, N] parameter read as B[k, n], N a multiple of the tile)."""
    b_buf = load_b.source
    b_param = None
    for idx, p in enumerate(func.params):
        if p.same_as(b_buf):
            b_param = idx
    shape = [int(d) if isinstance(d, tirx.IntImm) else None for d in b_buf.shape]
    packable = (
        b_param is not None
        and len(shape) == 2
        and None not in shape
        and isinstance(n_ext, int)
        and n_ext % nr == 0
        and nr % lanes == 0
        and len(load_b.indices) == 2
        and isinstance(load_b.indices[0], tirx.Var)
        and load_b.indices[0].same_as(k_var)
    )
    return b_param, packable


def _pick_tile(n_ext, lanes: int, nvec: int) -> int:
    """The widest tile (in vectors, at most ``nvec``) that divides n; pad n only for odd sizes."""
    if not isinstance(n_ext, int):
        return lanes * nvec
    for nv in range(nvec, 0, -1):
        if n_ext % (nv * lanes) == 0:
            return nv * lanes
    return min(lanes * nvec, ((n_ext + lanes - 1) // lanes) * lanes)


def _pick_gemv_tile(n_ext, lanes: int, nvec: int, panel: int | None) -> int:
    """n tile of the one-row kernel: up to ``nvec`` vectors (several packed panels, each its own
    sequential stream), dividing n, preferring an even number of tiles of at least 8 (threads)."""
    if panel is not None:
        cands = [nv * lanes for nv in range(nvec, 0, -1) if (nv * lanes) % panel == 0 or panel % (nv * lanes) == 0]
    else:
        cands = [nv * lanes for nv in range(nvec, 0, -1)]
    if not isinstance(n_ext, int):
        return cands[0] if panel is None else min(cands[0], max(panel, lanes))
    div = [c for c in cands if n_ext % c == 0]
    for ok in (lambda t: t >= 8 and t % 2 == 0, lambda t: t >= 8, lambda t: True):
        for c in div:
            if ok(n_ext // c):
                return c
    return _pick_tile(n_ext, lanes, nvec)


def _branch(gemm_func, gemv_func, m_ext):
    """One PrimFunc: ``if m == 1: <gemv body> else: <gemm body>`` under one root block (the
    buffers of both kernels allocated there), so later schedule primitives see both kernels."""
    from tvm.s_tir.stmt import SBlock, SBlockRealize

    gemm_root, gemv_root = gemm_func.body.block, gemv_func.body.block
    cond = m_ext == 1
    cond = cond.asobject() if hasattr(cond, "asobject") else cond
    body = tirx.IfThenElse(cond, gemv_root.body, gemm_root.body)
    allocs = list(gemv_root.alloc_buffers) + list(gemm_root.alloc_buffers)
    root = SBlock([], [], [], "root", body, None, allocs)
    return gemm_func.with_body(SBlockRealize([], True, root))


def _pack_b(sch, b_buffer, panel: int) -> None:
    """Read B[k, n] as Bp[n // NR, k, n % NR] everywhere in the (scheduled) function."""

    def find(block):
        for child in sch.get_child_blocks(block):
            stmt = sch.get(child)
            for i, r in enumerate(stmt.reads):
                if r.source.same_as(b_buffer):
                    return child, i
            found = find(child)
            if found is not None:
                return found
        return None

    block, idx = find(sch.get_sblock("root"))
    sch.transform_layout(block, ("read", idx), lambda k, n: (n // panel, k, n % panel))
