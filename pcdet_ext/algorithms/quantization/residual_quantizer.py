"""Nested residual quantizer with EMA warm-up and gradient training (pure torch).

``C`` codebooks of ``K`` entries each are allocated up front; the first ``k`` entries of a
codebook work alone (nested prefixes), and any prefix of codebooks can be decoded. Which
codebooks/entries are active, the training mode and the per-entry state live in persistent
buffers, so a ``state_dict`` has one shape through every stage.

Gradient path: the network before the bottleneck is frozen, so a straight-through estimator
would give the codebooks no gradient from the task loss. The output is the sum of the gathered
code vectors ``sum_i C_i[idx_i]``, so the task loss reaches the codebooks directly. The
(cumulative, RQ-VAE style) commitment loss only trains something when a trainable input adapter
exists; without one it is not computed or reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from pcdet_ext.algorithms.quantization.nn_search import kmeans_pp, lloyd, nearest

MODES = ("ema", "gradient")


@dataclass
class RQOutput:
    quantized: torch.Tensor                  # same shape as the input
    codes: torch.Tensor                      # [N, n] long
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    stats: Dict[str, Any] = field(default_factory=dict)  # 0-dim tensors / floats, read when logged
    num_codebooks: int = 0                   # the (n, k) this output was computed at
    num_embeddings: List[int] = field(default_factory=list)


class RateChoice(Protocol):
    """Rate-aware code choice for the rows of one call (what :meth:`RateModel.bind` returns)."""

    def choose(self, c: int, k: int, residual: torch.Tensor, book: torch.Tensor, rate_lambda: float
               ) -> torch.Tensor:
        """Codes [N] of codebook ``c`` (its first ``k`` entries ``book``) for ``residual`` [N, D]:
        ``argmin ||r - e||^2 / mean||z||^2 + rate_lambda x bits(e | context)``, the mean over the
        row's frame (``residual`` at c = 0 is z); called for c = 0, 1, ... in order."""


class RateModel(Protocol):
    """Bit costs of codes in their coding contexts (e.g. ``bitstream.rate_choice.ContextRate``)."""

    def bind(self, positions: torch.Tensor) -> RateChoice:
        """The choice for rows at ``positions`` [N, 3] (sample, row, column of the BEV grid)."""


def _dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class ResidualQuantizer(nn.Module):
    """Residual vector quantizer with nested codebooks.

    Args:
        dim: input feature size.
        num_codebooks: codebooks allocated (max depth ``C``).
        codebook_size: entries allocated per codebook (max ``K``).
        decay: EMA decay of the warm-up mode.
        schedule: entry counts the model is trained/evaluated at (strictly increasing, <= K).
        adapter_dim: if set, a trainable linear projection ``dim -> adapter_dim`` before and
            ``adapter_dim -> dim`` after quantization (codes live in ``adapter_dim``); with
            ``freeze_earlier`` it trains only during the first codebook's stages.
        operating_point_training: sample (n, k) per training batch from the active depth and the
            schedule sizes up to the active size.
        freeze_earlier: when a deeper codebook becomes active, earlier ones stop training.
        lloyd_iterations: Lloyd (k-means) iterations refining the k-means++ seeds of new entries.
        dead_threshold: an entry of the current stage whose EMA usage count falls below this share of
            the expected count under uniform use (vectors per batch / k) is restarted.
        eps: Laplace smoothing of EMA counts.
    """

    def __init__(self, dim: int = 64, num_codebooks: int = 5, codebook_size: int = 256, decay: float = 0.99,
                 schedule: Sequence[int] = (16, 32, 64, 128, 256), adapter_dim: Optional[int] = None,
                 operating_point_training: bool = True, freeze_earlier: bool = True,
                 dead_threshold: float = 0.01, eps: float = 1e-5, chunk_size: Optional[int] = None,
                 lloyd_iterations: int = 4):
        super().__init__()
        if num_codebooks < 1:
            raise ValueError(f"num_codebooks must be >= 1, got {num_codebooks}")
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        schedule = [int(s) for s in schedule]
        if not schedule or any(b <= a for a, b in zip(schedule, schedule[1:])):
            raise ValueError(f"schedule must be strictly increasing, got {schedule}")
        if schedule[0] < 1 or schedule[-1] > codebook_size:
            raise ValueError(f"schedule sizes must lie in 1..codebook_size={codebook_size}, got {schedule}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        if not 0.0 <= dead_threshold < 1.0:
            raise ValueError(f"dead_threshold is a share of the expected count per entry: expected [0, 1), "
                             f"got {dead_threshold}")
        self.dim, self.num_codebooks, self.codebook_size = dim, num_codebooks, codebook_size
        self.code_dim = adapter_dim or dim
        self.decay, self.eps, self.dead_threshold = decay, eps, dead_threshold
        self.schedule = schedule
        self.operating_point_training = operating_point_training
        self.freeze_earlier = freeze_earlier
        self.chunk_size = chunk_size
        self.lloyd_iterations = lloyd_iterations
        self._rate: Optional[tuple] = None  # (lambda, RateModel): see set_rate
        self.codebooks = nn.ParameterList(
            [nn.Parameter(torch.randn(codebook_size, self.code_dim) * 0.01) for _ in range(num_codebooks)])
        self.adapter_in = nn.Linear(dim, adapter_dim) if adapter_dim else None
        self.adapter_out = nn.Linear(adapter_dim, dim) if adapter_dim else None
        self.register_buffer("ema_count", torch.zeros(num_codebooks, codebook_size))
        self.register_buffer("ema_sum", torch.zeros(num_codebooks, codebook_size, self.code_dim))
        self.register_buffer("initialised", torch.zeros(num_codebooks, codebook_size, dtype=torch.bool))
        self.register_buffer("active_depth", torch.tensor(1))
        self.register_buffer("active_size", torch.full((num_codebooks,), schedule[0], dtype=torch.long))
        self.register_buffer("stage_start", torch.zeros(num_codebooks, dtype=torch.long))
        self.register_buffer("trained_size", torch.zeros(num_codebooks, dtype=torch.long))
        self.register_buffer("mode_id", torch.tensor(0))
        self._host: Dict[str, Any] = {}
        self._host_key: Tuple = ()
        self._apply_freezing()
        # requires_grad is not part of a state_dict: re-derive it from the loaded depth
        self.register_load_state_dict_post_hook(lambda module, keys: module._apply_freezing())

    # ---- configuration -------------------------------------------------------------------
    def _host_config(self) -> Dict[str, Any]:
        """Mode, active sizes and stage starts as Python values, read from the configuration buffers
        only when one of them changed (any in-place write, ``load_state_dict`` or a move bumps the
        key): a training step makes no device-to-host copy for them."""
        buffers = [self.mode_id, self.active_depth, self.active_size, self.stage_start, self.initialised]
        key = tuple((b.data_ptr(), b._version) for b in buffers)
        if key != self._host_key:
            depth = int(self.active_depth)
            self._host = {"mode": MODES[int(self.mode_id)], "sizes": self.active_size[:depth].tolist(),
                          "stage_start": self.stage_start.tolist(), "initialised": {}}
            self._host_key = key
        return self._host

    @property
    def mode(self) -> str:
        return self._host_config()["mode"]

    def set_mode(self, mode: str) -> None:
        """``'ema'``: the current stage's new entries follow EMA means of their residuals;
        ``'gradient'``: losses train the trainable codebooks. Entering EMA mode re-synchronises the EMA
        sums with the entries (``sum = entry x count``): gradient steps moved the entries and the
        counts, not the sums."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "ema" and self.mode != "ema":
            self._resync_ema()
        self.mode_id.fill_(MODES.index(mode))

    @torch.no_grad()
    def _resync_ema(self) -> None:
        for c, book in enumerate(self.codebooks):
            self.ema_sum[c].copy_(book.detach() * self.ema_count[c].unsqueeze(1))

    def _check_n_k(self, num_codebooks: int, num_embeddings: Union[int, Sequence[int]]) -> List[int]:
        if not 1 <= num_codebooks <= self.num_codebooks:
            raise ValueError(f"num_codebooks must be in 1..{self.num_codebooks}, got {num_codebooks}")
        sizes = [int(num_embeddings)] * num_codebooks if isinstance(num_embeddings, int) else [int(k) for k in num_embeddings]
        if len(sizes) != num_codebooks:
            raise ValueError(f"num_embeddings: expected {num_codebooks} sizes, got {len(sizes)}")
        for k in sizes:
            if not 1 <= k <= self.codebook_size:
                raise ValueError(f"num_embeddings must be in 1..{self.codebook_size}, got {k}")
        return sizes

    def set_active(self, num_codebooks: int, num_embeddings: Union[int, Sequence[int]]) -> None:
        """Use the first ``num_embeddings`` entries (one size, or one per codebook) of each of the
        first ``num_codebooks`` codebooks."""
        sizes = self._check_n_k(num_codebooks, num_embeddings)
        self.active_depth.fill_(num_codebooks)
        self.active_size[:num_codebooks] = torch.tensor(sizes, device=self.active_size.device)
        self._apply_freezing()

    def start_stage(self, codebook: int, num_embeddings: int, data: Optional[torch.Tensor] = None) -> None:
        """Begin training ``codebook`` (0-based) at ``num_embeddings`` entries (progressive training).

        Earlier codebooks keep their trained size. Entries ``[k_prev, k)`` are the stage's new entries:
        initialised from ``data`` (input vectors; their residuals at this codebook are used) by
        k-means++, or without ``data`` on the first training batch; EMA warm-up and dead-entry restarts
        touch only them. Every other codebook is closed: none of its entries is new any more.
        """
        self._open([codebook], num_embeddings, data)

    def start_together(self, num_codebooks: int, num_embeddings: int, data: Optional[torch.Tensor] = None) -> None:
        """Begin training codebooks ``0..num_codebooks-1`` together at ``num_embeddings`` entries (the
        legacy, non-progressive mode): all of them open at once, each with its new entries as in
        :meth:`start_stage`."""
        self._open(list(range(num_codebooks)), num_embeddings, data)

    def _open(self, books: List[int], num_embeddings: int, data: Optional[torch.Tensor]) -> None:
        for codebook in books:
            if not 0 <= codebook < self.num_codebooks:
                raise ValueError(f"codebook must be in 0..{self.num_codebooks - 1}, got {codebook}")
        if num_embeddings not in self.schedule and num_embeddings != self.codebook_size:
            raise ValueError(f"num_embeddings {num_embeddings} is not in the schedule {self.schedule}")
        self._resync_ema()
        self.stage_start.copy_(self.trained_size)  # close every codebook: no entry of theirs is new
        for c in books:
            self.stage_start[c] = min(int(self.trained_size[c]), num_embeddings)
        depth = max(books) + 1
        self.set_active(depth, [num_embeddings if c in books else max(int(self.trained_size[c]), 1)
                                for c in range(depth)])
        for c in books:
            self.trained_size[c] = max(int(self.trained_size[c]), num_embeddings)
        if data is not None:
            self.initialise_entries(depth - 1, data)

    def _apply_freezing(self) -> None:
        """Trainable: the deepest active codebook (every active one without ``freeze_earlier``), and the
        adapter while it serves no frozen codebook (i.e. during the first codebook's stages): moving it
        later would move every frozen cell."""
        depth = int(self.active_depth)
        for c, cb in enumerate(self.codebooks):
            trainable = c < depth and (not self.freeze_earlier or c == depth - 1)
            cb.requires_grad_(trainable)
        for adapter in (self.adapter_in, self.adapter_out):
            if adapter is not None:
                adapter.requires_grad_(depth == 1 or not self.freeze_earlier)

    @property
    def trained_depth(self) -> int:
        """How many codebooks have been trained (started) so far."""
        return int((self.trained_size > 0).sum())

    def trainable_codebooks(self) -> List[int]:
        return [c for c in range(len(self.active_sizes())) if self.codebooks[c].requires_grad]

    # ---- core ------------------------------------------------------------------------------
    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features of shape [N, {self.dim}], got {tuple(x.shape)}")
        if not torch.isfinite(x.sum()):  # one reduction in the common all-finite case (a finite sum proves it)
            bad = ~torch.isfinite(x).all(1)
            if bad.any():
                raise ValueError(f"{int(bad.sum())} of {x.shape[0]} input vectors contain NaN/inf; "
                                 "refusing to quantize (it would corrupt the codebooks)")
        x = x.float()
        return self.adapter_in(x) if self.adapter_in is not None else x

    def _codebook(self, c: int, k: int) -> torch.Tensor:
        return self.codebooks[c][:k]

    def set_rate(self, rate_lambda: float, model: Optional[RateModel] = None, in_training: bool = False) -> None:
        """Rate-aware (entropy-constrained) code choice: each code minimises
        ``||r - e||^2 / mean||z||^2 + rate_lambda x bits(e | its coding context)`` under ``model``,
        which needs the rows' ``positions`` (:meth:`encode`, :meth:`forward`); outside training only,
        unless ``in_training`` (rate-distortion training: the codebooks learn under the choice they
        are sent with). 0 (or no model) turns it off."""
        if not isinstance(rate_lambda, (int, float)) or rate_lambda < 0 or rate_lambda != rate_lambda:
            raise ValueError(f"rate lambda must be a number >= 0, got {rate_lambda!r}")
        self._rate = (float(rate_lambda), model, bool(in_training)) if rate_lambda > 0 and model is not None else None

    @property
    def rate_active(self) -> bool:
        """Whether codes are chosen rate-aware now (set, and not training unless set for training):
        then calls need ``positions``."""
        return self._rate is not None and (self._rate[2] or not self.training)

    def _residual_codes(self, z: torch.Tensor, sizes: Sequence[int], positions: Optional[torch.Tensor] = None,
                        keep: bool = True):
        """Greedy residual assignment (rate-aware with :meth:`set_rate`); returns codes [N, n] and the
        residual at each codebook (without ``keep`` only the last one: the residual is updated in place)."""
        residual = z.detach() if keep else z.detach().clone()
        choice = None
        if self.rate_active:
            if positions is None:
                raise ValueError("rate-aware coding needs the rows' positions [N, 3] (sample, row, column)")
            choice = self._rate[1].bind(positions)
        codes, residuals = [], []
        for c, k in enumerate(sizes):
            book = self._codebook(c, k).detach()
            idx = nearest(residual, book, self.chunk_size) if choice is None else \
                choice.choose(c, k, residual, book, self._rate[0])
            codes.append(idx)
            residuals.append(residual)
            if c + 1 < len(sizes):
                step = book.index_select(0, idx)
                residual = residual - step if keep else residual.sub_(step)
        return torch.stack(codes, 1) if codes else z.new_zeros((z.shape[0], 0), dtype=torch.long), residuals

    @torch.no_grad()
    def encode(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Codes [N, n] at the active (n, k); ``positions`` [N, 3] only for rate-aware coding."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = self._prepare(x)
            codes, _ = self._residual_codes(z, self.active_sizes(), positions, keep=False)
        return codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Vectors [N, dim] from codes [N, n] of the first n codebooks (any prefix); the same
        arithmetic as the forward pass, so a decoded frame equals the in-process one bit for bit."""
        if codes.dim() != 2 or not 1 <= codes.shape[1] <= self.num_codebooks:
            raise ValueError(f"codes must be [N, n] with 1 <= n <= {self.num_codebooks}, got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"code indices must lie in 0..{self.codebook_size - 1}")
        out = self._gather_sum(codes.to(self.codebooks[0].device), [self.codebook_size] * codes.shape[1])
        return self.adapter_out(out) if self.adapter_out is not None else out

    def active_sizes(self) -> List[int]:
        return list(self._host_config()["sizes"])

    def _sample_operating_point(self) -> List[int]:
        """Gradient training: (n, k) with n from the active depth (only the deepest when earlier
        codebooks are frozen) and k from the schedule sizes up to the active size, every used codebook
        truncated to k. Otherwise (EMA warm-up included: every batch of it updates the stage's new
        entries): the active sizes."""
        sizes = self.active_sizes()
        if not (self.training and self.operating_point_training and self.mode == "gradient"):
            return sizes
        n = len(sizes) if self.freeze_earlier else int(torch.randint(1, len(sizes) + 1, (1,)))
        allowed = [s for s in self.schedule if s <= sizes[n - 1]] or [sizes[n - 1]]
        k = allowed[int(torch.randint(len(allowed), (1,)))]
        if _dist_world() > 1:  # every rank trains the same operating point
            nk = torch.tensor([n, k], device=self.active_size.device)
            dist.broadcast(nk, 0)
            n, k = int(nk[0]), int(nk[1])
        return [min(s, k) for s in sizes[:n]]

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> RQOutput:
        """Quantize ``x`` [N, dim]; ``positions`` [N, 3] (sample, row, column) only for rate-aware coding."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = self._prepare(x)
            sizes = self._sample_operating_point()
            if self.training:
                self._lazy_init(z, sizes)
            codes, residuals = self._residual_codes(z, sizes, positions)
            counts = [torch.bincount(codes[:, c], minlength=k)[:k].float() for c, k in enumerate(sizes)]
            sums = {}
            if self.training:
                trainable = self.trainable_codebooks()
                sums = {c: torch.zeros(k, self.code_dim, device=z.device).index_add_(0, codes[:, c], residuals[c])
                        for c, k in enumerate(sizes) if c in trainable}
                self._ema_update(counts, sums, sizes)
            q = self._gather_sum(codes, sizes)
            if self.mode == "ema":
                q = q.detach()
            losses = self._losses(z, codes, residuals, counts, sums, sizes) if self.training else {}
            out = self.adapter_out(q) if self.adapter_out is not None else q
            stats = self._stats(counts, sizes)
            if self.training:
                stats.update(self._restart_dead(residuals, counts, sizes))
        half = x.dtype in (torch.float16, torch.bfloat16)  # under AMP the quantized features stay fp32
        return RQOutput(quantized=out if half else out.to(x.dtype), codes=codes, losses=losses, stats=stats,
                        num_codebooks=len(sizes), num_embeddings=sizes)

    def _gather_sum(self, codes: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """sum_c C_c[codes[:, c]] as one embedding_bag over the concatenated active prefixes
        (one gather forward, one sparse accumulation backward)."""
        books = torch.cat([self._codebook(c, k) for c, k in enumerate(sizes)], 0)
        offsets = torch.tensor([0] + list(sizes[:-1]), device=codes.device).cumsum(0)
        return nn.functional.embedding_bag(codes + offsets, books, mode="sum")

    def _losses(self, z, codes, residuals, counts, sums, sizes) -> Dict[str, torch.Tensor]:
        """Codebook loss ``sum_c mean ||sg(r_c) - C_c[idx_c]||^2`` over trainable codebooks, computed
        exactly from per-entry counts and residual sums (a K x D graph instead of N x D):
        ``sum_i ||r_i - C_k(i)||^2 = sum_k n_k ||C_k||^2 - 2 C_k . S_k + sum_i ||r_i||^2``.
        Commitment (cumulative, RQ-VAE) only with an adapter, the only thing it can train."""
        losses: Dict[str, torch.Tensor] = {}
        numel = max(z.shape[0] * self.code_dim, 1)
        if self.mode == "gradient" and sums:
            terms = []
            for c, s_k in sums.items():
                book = self._codebook(c, sizes[c])
                sq = (counts[c] * book.pow(2).sum(1)).sum() - 2 * (book * s_k).sum() + residuals[c].pow(2).sum()
                terms.append(sq / numel)
            losses["codebook"] = torch.stack(terms).sum()
        if self.adapter_in is not None:
            partial, terms = torch.zeros_like(z), []
            for c, k in enumerate(sizes):
                partial = partial + self._codebook(c, k)[codes[:, c]].detach()
                terms.append((z - partial).pow(2).mean())
            losses["commitment"] = torch.stack(terms).mean()
        return losses

    # ---- state updates ---------------------------------------------------------------------
    @torch.no_grad()
    def initialise_entries(self, codebook: int, data: torch.Tensor) -> None:
        """k-means++ initialisation of the uninitialised active entries of codebooks up to
        ``codebook`` from the residuals of ``data``."""
        sizes = self.active_sizes()
        if codebook >= len(sizes):
            raise ValueError(f"codebook {codebook} is not active (depth {len(sizes)})")
        self._lazy_init(self._prepare(data.detach()), sizes[:codebook + 1])

    @torch.no_grad()
    def _lazy_init(self, z: torch.Tensor, sizes: Sequence[int]) -> None:
        """One pass over the codebooks: initialise a codebook's missing entries from the current
        residual, then assign and move on to the next residual."""
        known = self._host_config()["initialised"]
        if tuple(sizes) not in known:
            known[tuple(sizes)] = bool(all(self.initialised[c, :k].all() for c, k in enumerate(sizes)))
        if known[tuple(sizes)]:
            return
        residual = z.detach()
        for c, k in enumerate(sizes):
            self._init_from(c, k, residual)
            if c + 1 < len(sizes):
                book = self._codebook(c, k).detach()
                residual = residual - book[nearest(residual, book, self.chunk_size)]

    @torch.no_grad()
    def _init_from(self, c: int, k: int, residual: torch.Tensor) -> None:
        todo = (~self.initialised[c, :k]).nonzero().flatten()
        if len(todo) == 0:
            return
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            new = torch.empty(len(todo), self.code_dim, device=residual.device)
        else:
            done = self.initialised[c, :k].nonzero().flatten()
            sample = residual[torch.randperm(residual.shape[0], device=residual.device)[:20000]]
            fixed = self.codebooks[c][done].detach()
            new = lloyd(sample, fixed, kmeans_pp(sample, fixed, len(todo)), self.lloyd_iterations, self.chunk_size)
        if _dist_world() > 1:
            dist.broadcast(new, 0)
        start = self.dead_count(residual.shape[0] * _dist_world(), k)  # alive, but a weak prior for the EMA
        self.codebooks[c].data[todo] = new
        self.ema_count[c, todo] = start
        self.ema_sum[c, todo] = new * start
        self.initialised[c, todo] = True

    @torch.no_grad()
    def _ema_update(self, counts, sums, sizes) -> None:
        """EMA usage counts of trainable codebooks (both modes: dead-entry detection, stats). In EMA
        mode also the EMA sums and entries of the current stage's new entries ``[stage_start, k)`` of
        every open codebook (the stage's one; all of them in the legacy mode): entries trained in
        earlier stages change only by gradient. All-reduced under DDP."""
        for c in sums:
            k = sizes[c]
            cnt, s_k = counts[c], sums[c]
            if _dist_world() > 1:
                cnt, s_k = cnt.clone(), s_k.clone()
                dist.all_reduce(cnt)
                dist.all_reduce(s_k)
            self.ema_count[c, :k].mul_(self.decay).add_(cnt, alpha=1 - self.decay)
            start = self._host_config()["stage_start"][c]
            if self.mode != "ema" or start >= k:
                continue
            self.ema_sum[c, start:k].mul_(self.decay).add_(s_k[start:k], alpha=1 - self.decay)
            own = self.ema_count[c, start:k]
            n = own.sum()
            smoothed = (own + self.eps) / (n + (k - start) * self.eps) * n
            self.codebooks[c].data[start:k] = self.ema_sum[c, start:k] / smoothed.unsqueeze(1)

    def dead_count(self, num_vectors: Union[float, torch.Tensor], k: int) -> Union[float, torch.Tensor]:
        """EMA usage below which an entry counts as dead: ``dead_threshold x num_vectors / k`` (a tensor
        count stays a tensor on its device)."""
        return self.dead_threshold * num_vectors / max(k, 1)

    @torch.no_grad()
    def _restart_dead(self, residuals, counts, sizes) -> Dict[str, torch.Tensor]:
        """Entries of the current stage ([stage_start, k)) whose EMA usage fell below
        :meth:`dead_count` restart from random current residuals (drawn on rank 0), with their EMA
        count reset to exactly that threshold (they must be used to stay). Entries of earlier stages
        are never touched, so smaller prefixes keep working. Fixed shapes (a candidate per entry,
        taken where dead): no device-to-host copy. Returns ``restarts_<c>`` per codebook."""
        out: Dict[str, torch.Tensor] = {}
        for c in self.trainable_codebooks():
            if c >= len(sizes):
                continue
            k, start = sizes[c], self._host_config()["stage_start"][c]
            if start >= k or residuals[c].shape[0] == 0:
                continue
            total = counts[c].sum()
            if _dist_world() > 1:
                total = total.clone()
                dist.all_reduce(total)
            limit = self.dead_count(total, k)
            dead = self.ema_count[c, start:k] < limit
            candidates = residuals[c][torch.randint(residuals[c].shape[0], (k - start,), device=residuals[c].device)]
            if _dist_world() > 1:
                dist.broadcast(candidates, 0)
            book = self.codebooks[c].data[start:k]
            book.copy_(torch.where(dead[:, None], candidates, book))
            self.ema_count[c, start:k] = torch.where(dead, limit, self.ema_count[c, start:k])
            self.ema_sum[c, start:k] = torch.where(dead[:, None], candidates * limit, self.ema_sum[c, start:k])
            out[f"restarts_{c}"] = dead.sum()
        return out

    # ---- statistics --------------------------------------------------------------------------
    @torch.no_grad()
    def _stats(self, counts, sizes: Sequence[int]) -> Dict[str, torch.Tensor]:
        """Perplexity, usage and dead share per codebook, as 0-dim tensors (read when logged)."""
        stats: Dict[str, torch.Tensor] = {}
        for c, k in enumerate(sizes):
            total = counts[c].sum()
            p = counts[c] / total.clamp_min(1)
            stats[f"perplexity_{c}"] = (-(p * p.clamp_min(1e-30).log()).sum()).exp()
            stats[f"usage_{c}"] = (counts[c] > 0).float().mean()
            limit = self.dead_count(total, k)
            stats[f"dead_{c}"] = (self.ema_count[c, :k] < limit).float().mean()
        return stats
