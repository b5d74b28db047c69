"""Register-blocked CPU schedule for matmul-like PrimFuncs with symbolic extents.

Matches a fused PrimFunc whose first block is ``C[..., m, n] += A[..., m, k] * B[..., k, n]``
(one reduction axis, float32, any number of leading "outer" axes, any of which may be symbolic)
followed by injective epilogue blocks (bias add, residual add, SiLU gating, scale + mask, ...).

Schedule (a BLIS-style micro-kernel expressed with TIR primitives)::

    A_pad = A padded along m to a multiple of MR   (only when m is not known to divide)
    parallel for (outer..., n_o, m_o):             # one MR x NR tile of C per iteration
        acc[MR, NR] = 0                            # "local" scope -> LLVM keeps it in registers
        for k:
            unroll m_i < MR:  unroll n_v:  vector(lanes) acc[m_i, n] += A[m, k] * B[k, n]
        epilogue(acc) -> output tile               # fused elementwise ops, vectorised

``pad_einsum`` pads the m (and, if needed, n) axis so the register tile never carries a
predicate inside the k loop: a symbolic ``seq`` (decode: 1, prefill: 128) costs one small copy
of A instead of a branch per FMA. NR is a multiple of the vector width (AVX-512: 16 lanes,
AVX2: 8), n_v vectors per row of the tile, and MR rows, chosen so that MR * n_v accumulators
plus the B vectors fit the register file.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.ir.expr import TensorLoad as _BufferLoad
from tvm.target import Target
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule

from .common import is_llvm, parallel_outer, vars_in, vectorize_innermost


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


class Matmul(ScheduleRule):
    """C[..., m, n] = sum_k A[..., m, k] * B[..., k, n] (+ injective epilogue)."""

    def __init__(self, lanes: int = 16, mr: int = 4, nvec: int = 4, parallel: bool = True):
        self.lanes = lanes
        self.mr = mr
        self.nvec = nvec
        self.parallel = parallel
        self.acc_scope = "global"

    def apply(self, func, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not is_llvm(target):
            return None
        try:
            return self._apply(func)
        except Exception:  # a pattern we do not handle: leave the function to other rules
            return None

    def packable(self, func) -> tuple[int, int] | None:
        """(param index of B, NR) when B is a static 2-D [K, N] parameter the rule can pack."""
        try:
            res = self._apply(func, analyze_only=True)
        except Exception:
            return None
        return res

    def _apply(self, func, analyze_only: bool = False, pack: bool = False):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
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
        # Output must be indexed by the spatial axes in order (C[..., m, n]).
        if len(store.indices) != len(spatial) or not all(
            isinstance(i, tirx.Var) and i.same_as(v) for i, v in zip(store.indices, spatial)
        ):
            return None
        m_pos = None
        for pos in range(len(spatial) - 2, -1, -1):
            v = spatial[pos]
            if v in uses_a and v not in uses_b:
                m_pos = pos
                break

        n_pos = len(spatial) - 1
        n_ext = main.iters[n_pos].dom
        lanes, mr = self.lanes, self.mr
        nr = lanes * self.nvec
        if isinstance(n_ext, tirx.IntImm):
            n_ext = n_ext.value
        if isinstance(n_ext, int):
            # the widest tile (in vectors) that divides n; pad n only for odd sizes
            nr_pick = None
            for nv in range(self.nvec, 0, -1):
                if n_ext % (nv * lanes) == 0:
                    nr_pick = nv * lanes
                    break
            if nr_pick is None:
                nr_pick = min(nr, ((n_ext + lanes - 1) // lanes) * lanes)
            nr = nr_pick
        if m_pos is None:
            mr = 1
        if analyze_only or pack:
            b_buf = load_b.source
            b_param = None
            for idx, p in enumerate(func.params):
                if p.same_as(b_buf):
                    b_param = idx
            shape = [int(d) if isinstance(d, tirx.IntImm) else None for d in b_buf.shape]
            ok = (
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
            if analyze_only:
                return (b_param, nr) if ok else None
            if not ok:
                return None
            b_name = b_buf.name

        padding = [1] * len(iter_vars)
        padding[n_pos] = nr
        if m_pos is not None:
            padding[m_pos] = mr
        names_before = {bi.name for bi in infos}
        sch.pad_einsum(main.block_rv, padding)
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
        main_rv = main.block_rv
        if copy_out is not None:
            epilogues = [copy_out] + epilogues
        # Inline all epilogues but the last.
        for b in epilogues[:-1]:
            sch.compute_inline(b)
        last = epilogues[-1] if epilogues else None

        loops = sch.get_loops(main_rv)
        k_loop = loops[-1]
        outer = list(loops[: len(spatial)])
        n_loop = outer[n_pos]
        n_o, n_i = sch.split(n_loop, [None, nr])
        if m_pos is not None:
            m_loop = outer[m_pos]
            m_o, m_i = sch.split(m_loop, [None, mr])
            rest = [l for p, l in enumerate(outer) if p not in (m_pos, n_pos)]
            sch.reorder(*rest, n_o, m_o, k_loop, m_i, n_i)
            par = rest + [n_o, m_o]
        else:
            rest = [l for p, l in enumerate(outer) if p != n_pos]
            sch.reorder(*rest, n_o, k_loop, n_i)
            par = rest + [n_o]
            m_i = None
        tile = sch.fuse(*par) if len(par) > 1 else par[0]
        if self.parallel:
            sch.parallel(tile)
        if last is None:
            sch.cache_write(main_rv, 0, self.acc_scope)
            last = sch.get_consumers(main_rv)[0]
        else:
            sch.set_scope(main_rv, 0, self.acc_scope)
        sch.reverse_compute_at(last, tile, preserve_unit_loops=True)
        if m_i is not None:
            sch.unroll(m_i)
        n_iv, n_vec = sch.split(n_i, [None, lanes]) if nr % lanes == 0 and nr > lanes else (None, n_i)
        if n_iv is not None:
            sch.unroll(n_iv)
        sch.vectorize(n_vec)
        sch.decompose_reduction(main_rv, k_loop)
        if pack:
            # B[k, n] -> Bp[n // NR, k, n % NR]: each NR-wide panel is one contiguous stream.
            upd = sch.get(main_rv)
            idx = [i for i, r in enumerate(upd.reads) if r.source.name == b_name]
            sch.transform_layout(main_rv, ("read", idx[0]), lambda k, n: (n // nr, k, n % nr))
        # epilogue: vectorise its innermost (n) loop
        vectorize_innermost(sch, last, lanes)
        # padding copies (A_pad / B_pad): plain parallel copies at the root
        for b in producers:
            bl = sch.get_loops(b)
            if not bl:
                continue
            parallel_outer(sch, b, lanes, self.parallel)
        return sch
