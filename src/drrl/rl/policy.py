"""The rank policy: a small Transformer over the sequence of rank decisions of one forward pass.

Decision i is (layer ℓ_i, segment s_i) in layer-major order. It may attend to decision j only if
s_j ≤ s_i and j comes first (j ≤ i): a later segment of an earlier layer saw later tokens, so
attending to it would leak them into an earlier segment's rank. Unsafe buckets (guardrail) get −inf
logits. Exploration is an ε-mixture with the uniform distribution over the allowed buckets, and the
log-probability of what was sampled is taken under that mixture, so PPO's ratios stay honest.

Deciding a forward pass layer by layer, the controller extends the sequence with :meth:`RankPolicy.extend`: the new
decisions attend to the cached keys and values of the earlier ones, so a pass costs O(N) new rows against the N
decisions so far instead of re-encoding all N at every layer (O(N) policy passes of O(N) rows each). PPO re-encodes
whole sequences with :meth:`RankPolicy.forward`; both give the same logits (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EpsilonSchedule:
    """ε decays linearly from ``start`` to ``end`` over ``decay_steps`` policy updates."""

    start: float = 0.1
    end: float = 0.0
    decay_steps: int = 1000

    def __call__(self, step: int) -> float:
        frac = min(max(step, 0) / max(self.decay_steps, 1), 1.0)
        return self.start + (self.end - self.start) * frac


def decision_mask(segments: torch.Tensor) -> torch.Tensor:
    """(N,) segment index of each decision (in decision order) -> (N, N) bool, True where i may NOT see j."""
    n = len(segments)
    order = torch.arange(n, device=segments.device)
    allowed = (order[None, :] <= order[:, None]) & (segments[None, :] <= segments[:, None])
    return ~allowed


@dataclass
class PolicyCache:
    """The keys and values of the decisions encoded so far, per encoder layer ((heads, N, d_head) each), and their
    segment indices (N,): what :meth:`RankPolicy.extend` attends to."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    segments: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.segments is None else len(self.segments)


class RankPolicy(nn.Module):
    """Policy and value heads over rank buckets.

    Args:
        n_features: per-decision features (kept energy at every bucket, sequence statistics).
        n_buckets: number of rank buckets (actions).
        n_layers: layers of the model (layer embedding).
        d_model, n_head, n_layer_enc, max_segments: size of the encoder and of the segment embedding.
    """

    def __init__(
        self,
        n_features: int,
        n_buckets: int,
        n_layers: int,
        *,
        d_model: int = 64,
        n_head: int = 4,
        n_layer_enc: int = 2,
        max_segments: int = 256,
    ):
        super().__init__()
        self.n_buckets, self.max_segments = n_buckets, max_segments
        self.inp = nn.Linear(n_features, d_model)
        self.layer_emb = nn.Embedding(n_layers, d_model)
        self.prev_emb = nn.Embedding(n_buckets + 1, d_model)  # index n_buckets: no previous decision
        self.seg_emb = nn.Embedding(max_segments, d_model)
        enc = nn.TransformerEncoderLayer(d_model, n_head, 2 * d_model, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(enc, n_layer_enc, enable_nested_tensor=False)
        self.pi = nn.Linear(d_model, n_buckets)
        self.v = nn.Linear(d_model, 1)

    def _embed(self, feats, layers, segments, prev) -> torch.Tensor:
        x = self.inp(feats) + self.layer_emb(layers) + self.prev_emb(prev)
        return x + self.seg_emb(segments.clamp(max=self.max_segments - 1))

    def forward(self, feats, layers, segments, prev, allowed):
        """feats (N, F); layers, segments, prev (N,) int64 (prev = n_buckets when none); allowed (N, nb) bool.
        Returns masked logits (N, nb) and values (N,)."""
        x = self._embed(feats, layers, segments, prev)
        h = self.encoder(x.unsqueeze(0), mask=decision_mask(segments)).squeeze(0)
        logits = self.pi(h).masked_fill(~allowed, float("-inf"))
        return logits, self.v(h).squeeze(-1)

    @torch.no_grad()
    def extend(self, cache: PolicyCache, feats, layers, segments, prev, allowed):
        """:meth:`forward`'s logits and values for n new decisions appended to the ``cache``d ones (which it
        extends): the same result as re-encoding the whole sequence, at the cost of the new rows only. Runs the
        encoder's pre-norm layers by hand on their own weights (inference only: no gradient)."""
        x = self._embed(feats, layers, segments, prev)
        n = len(segments)
        seg_all = segments if cache.segments is None else torch.cat([cache.segments, segments])
        see = seg_all[None, :] <= segments[:, None]  # (n, N): earlier decisions of no later segment, and itself
        see[:, len(seg_all) - n :] &= torch.ones(n, n, dtype=torch.bool, device=see.device).tril()
        for i, layer in enumerate(self.encoder.layers):
            sa = layer.self_attn
            heads, dh = sa.num_heads, sa.embed_dim // sa.num_heads
            q, k, v = (
                t.view(n, heads, dh).transpose(0, 1)
                for t in F.linear(layer.norm1(x), sa.in_proj_weight, sa.in_proj_bias).chunk(3, -1)
            )
            if len(cache):
                k, v = torch.cat([cache.keys[i], k], 1), torch.cat([cache.values[i], v], 1)
                cache.keys[i], cache.values[i] = k, v
            else:
                cache.keys.append(k), cache.values.append(v)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=see)
            x = x + sa.out_proj(o.transpose(0, 1).reshape(n, sa.embed_dim))
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))
        cache.segments = seg_all
        return self.pi(x).masked_fill(~allowed, float("-inf")), self.v(x).squeeze(-1)


def mixture_log_probs(logits: torch.Tensor, allowed: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """log of (1 − ε)·softmax(logits) + ε·uniform(allowed), (N, nb); −inf on masked buckets."""
    eps = torch.as_tensor(eps, dtype=logits.dtype, device=logits.device)
    if eps.dim() == 1:
        eps = eps[:, None]
    p = (1 - eps) * logits.softmax(-1) + eps * allowed / allowed.sum(-1, keepdim=True).clamp(min=1)
    # log(0) on a masked bucket would make its gradient 0/0 (NaN everywhere after backward): take the log of 1
    # there, then mask
    return torch.where(allowed, p, 1.0).clamp(min=0).log().masked_fill(~allowed, float("-inf"))


def sample(logits, allowed, eps: float, generator: torch.Generator | None = None, greedy: bool = False):
    """Sample bucket indices from the ε-mixture (or take the argmax). Returns (actions, log-probs)."""
    logp = mixture_log_probs(logits, allowed, 0.0 if greedy else eps)
    if greedy:
        a = logp.argmax(-1)
    else:
        a = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return a, logp.gather(-1, a[:, None]).squeeze(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the masked softmax, (N,)."""
    logp = F.log_softmax(logits, -1)
    return -(logp.exp() * logp.masked_fill(~torch.isfinite(logp), 0)).sum(-1)
