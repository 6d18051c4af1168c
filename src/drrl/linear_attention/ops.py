"""Delta-rule ops for DeltaNet and Gated DeltaNet in pure PyTorch: the token recurrence, one decode step, the
chunkwise WY form used for training, and the per-token rank utilisation of the state.

Per batch and head, with keys k_t ∈ R^K (unit-norm: the caller normalises q and k), values v_t ∈ R^V,
β_t ∈ (0, 1) and log-decay g_t ≤ 0 (α_t = exp(g_t); α_t = 1 for DeltaNet, ``g=None``):

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,    o_t = s · S_tᵀ q_t,    S_t ∈ R^{K×V}.

Chunkwise form (Yang et al. 2024). Write S_t = α_t S_{t−1} + k_t u_tᵀ with u_t = β_t (v_t − α_t S_{t−1}ᵀ k_t).
In a chunk of C tokens entered with state S, let G_i = Σ_{j≤i} g_j (within the chunk), γ_i = exp(G_i) and
Γ_ij = exp(G_i − G_j) for i ≥ j (0 above the diagonal). Unrolling gives S_i = γ_i S + Σ_{j≤i} Γ_ij k_j u_jᵀ,
hence u_i = β_i v_i − β_i γ_i Sᵀ k_i − Σ_{j<i} β_i Γ_ij (k_iᵀ k_j) u_j, i.e. with K_β = diag(β) K, V_β = diag(β) V

    (I + L) U' = V_β − diag(γ) K_β S,    L = strict_tril(Γ ⊙ K_β Kᵀ),

so U' = U − W S with W = (I + L)⁻¹ diag(γ) K_β and U = (I + L)⁻¹ V_β (one unit-lower-triangular solve,
for all chunks at once), and

    O = s · (diag(γ) Q S + (Γ ⊙ tril(Q Kᵀ)) U'),    S ← γ_C S + (diag(Γ_C·) K)ᵀ U'.

Only U' = U − W S and the state update run in a loop over chunks. DeltaNet is g = 0 (Γ = 1 on and below the
diagonal, γ = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from drrl.linalg.spectrum import effective_rank, stable_rank

Tensor = torch.Tensor


def _compute_dtype(*xs: Tensor | None) -> torch.dtype:
    """float32 at least: bf16/half inputs compute in float32, float64 inputs stay float64."""
    dt = torch.float32
    for x in xs:
        if x is not None:
            dt = torch.promote_types(dt, x.dtype)
    return dt


def _check(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, state: Tensor | None) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both have shape (B, H, T, K), got {tuple(q.shape)} and {tuple(k.shape)}")
    b, h, t, dk = q.shape
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have shape (B, H, T, V) = ({b}, {h}, {t}, V), got {tuple(v.shape)}")
    for name, x in (("beta", beta), ("g", g)):
        if x is not None and x.shape != q.shape[:3]:
            raise ValueError(f"{name} must have shape (B, H, T) = ({b}, {h}, {t}), got {tuple(x.shape)}")
    if t < 1:
        raise ValueError("the sequence must hold at least one token (T ≥ 1)")
    want = (b, h, dk, v.shape[-1])
    if state is not None and tuple(state.shape) != want:
        raise ValueError(f"initial_state must have shape (B, H, K, V) = {want}, got {tuple(state.shape)}")


def _step(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, s: Tensor, scale: float):
    """One token on (..., K) / (..., V) / (...) inputs and state (..., K, V), all in the compute dtype."""
    if g is not None:
        s = s * g.exp()[..., None, None]  # α_t S_{t−1}
    u = beta.unsqueeze(-1) * (v - torch.einsum("...k,...kv->...v", k, s))  # β_t (v_t − α_t S_{t−1}ᵀ k_t)
    s = s + k.unsqueeze(-1) * u.unsqueeze(-2)
    return scale * torch.einsum("...k,...kv->...v", q, s), s


def _scan(q, k, v, beta, g, s, scale, keep_states: bool = False):
    """Run the token loop on (B, H, T, ·) inputs already in the compute dtype.

    Returns o (B, H, T, V) and the final state (B, H, K, V), or every state (B, H, T, K, V) with keep_states.
    """
    outs, states = [], []
    for i in range(q.shape[2]):
        o, s = _step(q[:, :, i], k[:, :, i], v[:, :, i], beta[:, :, i], None if g is None else g[:, :, i], s, scale)
        outs.append(o)
        if keep_states:
            states.append(s)
    return torch.stack(outs, 2), (torch.stack(states, 2) if keep_states else s)


def delta_rule_step(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, state: Tensor, *, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """One decode step of the delta rule (batched over heads, no loops).

    Args:
        q, k: (B, H, K), k unit-norm. v: (B, H, V). beta: (B, H) in (0, 1). g: (B, H) log-decay ≤ 0, or None.
        state: (B, H, K, V), float32 (float64 is kept).
        scale: readout scale, default K^{-1/2}.

    Returns:
        (o, new_state): o (B, H, V) and new_state (B, H, K, V), both in the compute dtype (float32 at least);
        the caller casts o.
    """
    if q.dim() != 3 or k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"q, k must be (B, H, K) and v (B, H, V), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    for name, x in (("beta", beta), ("g", g)):
        if x is not None and x.shape != q.shape[:2]:
            raise ValueError(f"{name} must have shape (B, H) = {tuple(q.shape[:2])}, got {tuple(x.shape)}")
    if tuple(state.shape) != (*q.shape, v.shape[-1]):
        raise ValueError(f"state must have shape (B, H, K, V) = {(*q.shape, v.shape[-1])}, got {tuple(state.shape)}")
    dt = _compute_dtype(q, k, v, beta, g, state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cast = lambda x: None if x is None else x.to(dt)
    return _step(cast(q), cast(k), cast(v), cast(beta), cast(g), state.to(dt), scale)


def delta_rule_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The delta rule as a loop over tokens: the reference form and the decoding form.

    Args:
        q, k: (B, H, T, K), k unit-norm. v: (B, H, T, V). beta: (B, H, T) in (0, 1).
        g: (B, H, T) log-decay ≤ 0 (Gated DeltaNet), or None (DeltaNet).
        scale: readout scale, default K^{-1/2}.
        initial_state: (B, H, K, V) or None (zeros).
        output_final_state: also return S_T.

    Returns:
        (o, final_state): o (B, H, T, V) in v's dtype, final_state (B, H, K, V) in the compute dtype (float32,
        or float64 for float64 inputs) or None. Computed in float32 at least.
    """
    _check(q, k, v, beta, g, initial_state)
    dt = _compute_dtype(q, k, v, beta, g, initial_state)
    b, h, _, dk = q.shape
    scale = dk**-0.5 if scale is None else scale
    s = q.new_zeros(b, h, dk, v.shape[-1], dtype=dt) if initial_state is None else initial_state.to(dt)
    cast = lambda x: None if x is None else x.to(dt)
    o, s = _scan(cast(q), cast(k), cast(v), cast(beta), cast(g), s, scale)
    return o.to(v.dtype), (s if output_final_state else None)


def delta_rule_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The delta rule in chunkwise WY form (training path; same outputs as :func:`delta_rule_recurrent`).

    Intra-chunk products and the triangular solve run for all chunks at once; only the state is carried
    through a loop over the ⌈T / chunk_size⌉ chunks (two small matmuls each). T need not be a multiple of
    ``chunk_size``: the last chunk is padded with k = v = β = 0, g = 0, which leaves the state unchanged.
    Differentiable with autograd.

    Args:
        q, k: (B, H, T, K), k unit-norm. v: (B, H, T, V). beta: (B, H, T) in (0, 1).
        g: (B, H, T) log-decay ≤ 0 (Gated DeltaNet), or None (DeltaNet).
        scale: readout scale, default K^{-1/2}.
        chunk_size: tokens per chunk C.
        initial_state: (B, H, K, V) or None (zeros).
        output_final_state: also return S_T.

    Returns:
        (o, final_state): o (B, H, T, V) in v's dtype, final_state (B, H, K, V) in the compute dtype (float32,
        or float64 for float64 inputs) or None. Computed in float32 at least.
    """
    _check(q, k, v, beta, g, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    dt, out_dtype = _compute_dtype(q, k, v, beta, g, initial_state), v.dtype
    b, h, t, dk = q.shape
    dv, c = v.shape[-1], chunk_size
    n = -(-t // c)
    scale = dk**-0.5 if scale is None else scale

    def chunks(x: Tensor) -> Tensor:  # (B, H, T, ...) -> (B, H, N, C, ...), zero-padded at the end
        x = x.to(dt)
        if n * c != t:
            x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, n * c - t))
        return x.unflatten(2, (n, c))

    q, k, v, beta = chunks(q) * scale, chunks(k), chunks(v), chunks(beta)
    kb, vb = k * beta.unsqueeze(-1), v * beta.unsqueeze(-1)  # K_β, V_β (B, H, N, C, ·)
    a = kb @ k.transpose(-1, -2)  # (B, H, N, C, C): β_i k_iᵀ k_j
    qk = q @ k.transpose(-1, -2)  # (B, H, N, C, C): s q_iᵀ k_j
    k_state = k
    if g is None:
        qk = qk.tril()
    else:
        gc = chunks(g).cumsum(-1)  # G (B, H, N, C)
        causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        # Γ_ij = exp(G_i − G_j) on and below the diagonal; masked before exp so nothing overflows
        gam = (gc.unsqueeze(-1) - gc.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()
        a, qk = a * gam, qk * gam  # Γ is zero above the diagonal: qk is causal
        gamma = gc.exp().unsqueeze(-1)  # γ_i (B, H, N, C, 1)
        kb, q = kb * gamma, q * gamma
        k_state = k * (gc[..., -1:] - gc).exp().unsqueeze(-1)  # Γ_Cj k_j
        chunk_decay = gc[..., -1].exp()[..., None, None]  # γ_C (B, H, N, 1, 1)
    # (I + L) [W U] = [diag(γ) K_β  V_β]: a unit lower triangular solve reads only the strictly lower triangle
    # of `a` (its gradient is strictly lower too), so a = L needs no mask
    wu = torch.linalg.solve_triangular(a, torch.cat([kb, vb], -1), upper=False, unitriangular=True)
    w, u = wu.split([dk, dv], -1)

    s = q.new_zeros(b, h, dk, dv) if initial_state is None else initial_state.to(dt)
    states, u_new = [], []
    for i in range(n):
        ui = u[:, :, i] - w[:, :, i] @ s  # U' (B, H, C, V)
        states.append(s)
        u_new.append(ui)
        s = (s if g is None else s * chunk_decay[:, :, i]) + k_state[:, :, i].transpose(-1, -2) @ ui
    o = q @ torch.stack(states, 2) + qk @ torch.stack(u_new, 2)  # (B, H, N, C, V)
    return o.flatten(2, 3)[:, :, :t].to(out_dtype), (s if output_final_state else None)


@torch.no_grad()
def state_rank_utilisation(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None) -> dict[str, Tensor]:
    """Rank of the delta-rule state S_t at every token, from the recurrence in float32 (float64 kept).

    u(S) = sr(S) / min(K, V) with stable rank sr(S) = ‖S‖_F² / ‖S‖₂², and the Roy–Vetterli effective rank
    exp(−Σ p_i log p_i), p_i = σ_i / Σ σ. All T states are stacked for one batched svdvals, which holds
    B·H·T·K·V numbers: meant for analysis at small T. ``q`` does not affect the state; it is taken so callers
    pass the same tensors as to the ops.

    Args:
        q, k: (B, H, T, K), k unit-norm. v: (B, H, T, V). beta: (B, H, T). g: (B, H, T) or None.

    Returns:
        {"stable_rank", "utilisation", "effective_rank"}: each (B, H, T); 0 where the state is zero.
    """
    _check(q, k, v, beta, g, None)
    dt = _compute_dtype(q, k, v, beta, g)
    b, h, _, dk = q.shape
    dv = v.shape[-1]
    cast = lambda x: None if x is None else x.to(dt)
    s0 = q.new_zeros(b, h, dk, dv, dtype=dt)
    _, states = _scan(cast(q), cast(k), cast(v), cast(beta), cast(g), s0, 1.0, keep_states=True)
    sigma = torch.linalg.svdvals(states)  # (B, H, T, min(K, V))
    sr = stable_rank(sigma)
    return {"stable_rank": sr, "utilisation": sr / min(dk, dv), "effective_rank": effective_rank(sigma)}


def naive_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    scale: float | None = None,
    *,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Plain float64 reference: S ← α (I − β k kᵀ) S + β k vᵀ with an explicit identity, one head at a time.

    Args: as :func:`delta_rule_recurrent`.

    Returns:
        (o, states): o (B, H, T, V) and the state after every token, states (B, H, T, K, V), both float64.
    """
    f64 = torch.float64
    q, k, v, beta = (x.to(f64) for x in (q, k, v, beta))
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    eye = torch.eye(dk, dtype=f64, device=q.device)
    o_rows, s_rows = [], []
    for bi in range(b):
        for hi in range(h):
            s = torch.zeros(dk, dv, dtype=f64) if initial_state is None else initial_state[bi, hi].to(f64)
            for ti in range(t):
                kt, bt = k[bi, hi, ti].unsqueeze(1), beta[bi, hi, ti]  # (K, 1), ()
                alpha = 1.0 if g is None else torch.exp(g[bi, hi, ti].to(f64))
                s = alpha * (eye - bt * kt @ kt.T) @ s + bt * kt @ v[bi, hi, ti].unsqueeze(0)
                o_rows.append(scale * s.T @ q[bi, hi, ti])
                s_rows.append(s)
    return torch.stack(o_rows).reshape(b, h, t, dv), torch.stack(s_rows).reshape(b, h, t, dk, dv)
