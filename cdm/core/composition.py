"""Composition of per-shard denoisers into the CDM mixture (paper Prop. 3.1, Sec. 3.4), pure torch.

For a mixture p = sum_i lambda_i p_i the score of the noised marginal is (eq. 5)

    s(x, t) = sum_i w_i(x, t) s_i(x, t),  w_i = lambda_i p_t^i(x) / p_t(x) = P(z = i | x_t),

and since eps = -sigma_t * score with the same sigma_t for every shard, the same weights mix the
epsilons. Every weighting scheme below returns a [B, n] tensor whose rows are probability
vectors; `mix_epsilons` (dense) or `active_pairs` + `mix_selected` (sparse) apply them.

Conventions: shards are indexed 0..n-1; `weights` is [B, n]; per-shard epsilons are [n, B, ...].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

COMPOSITIONS = (
    "classifier", "compartmental", "knn", "average", "random", "fixed", "topk", "weight_merge",
)  # fmt: skip
"""Composition methods: router posteriors (classifier, per-shard heads, k-NN), the paper's baselines (naive
averaging, random selection), fixed user weights, top-k gating, weight-space merging."""

_ATOL = 1e-6


def _check_distribution(p: torch.Tensor, name: str) -> None:
    """Raise unless p is a 1-D, finite, non-negative vector summing to 1."""
    if p.dim() != 1 or p.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor [n], got shape {tuple(p.shape)}")
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError(f"{name} must be finite and non-negative, got {p.tolist()}")
    total = float(p.double().sum())
    if abs(total - 1.0) > _ATOL:
        raise ValueError(
            f"{name} must sum to 1 (got {total:.6g}); use normalize_priors() to normalise it"
        )


def _check_weights(weights: torch.Tensor) -> None:
    """Raise unless weights is a [B, n] tensor of finite non-negative numbers."""
    if weights.dim() != 2:
        raise ValueError(f"weights must be [B, n], got shape {tuple(weights.shape)}")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("weights must be finite and non-negative")


def _per_sample(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a [B] vector as [B, 1, ..., 1] to broadcast against a tensor with ndim dims."""
    return v.reshape(-1, *([1] * (ndim - 1)))


# --------------------------------------------------------------------------------------------
# Priors lambda
# --------------------------------------------------------------------------------------------


def normalize_priors(lam: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """lambda_i / sum_j lambda_j, the mixture weights of eq. 3 (non-negative, not all zero)."""
    lam = torch.as_tensor(lam, dtype=torch.float64) if not torch.is_tensor(lam) else lam
    if not lam.is_floating_point():
        lam = lam.double()
    if lam.dim() != 1 or lam.numel() == 0:
        raise ValueError(f"priors must be a non-empty 1-D tensor [n], got shape {tuple(lam.shape)}")
    if not torch.isfinite(lam).all() or (lam < 0).any():
        raise ValueError(f"priors must be finite and non-negative, got {lam.tolist()}")
    total = lam.sum()
    if total <= 0:
        raise ValueError("priors must not all be zero")
    return lam / total


def priors_from_sizes(sizes: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """lambda_i = |D_i| / sum_j |D_j|: the prior of the union of the shards' data (eq. 3), float64."""
    sizes = torch.as_tensor(sizes).double()
    return normalize_priors(sizes)


# --------------------------------------------------------------------------------------------
# Weights w_i(x, t)
# --------------------------------------------------------------------------------------------


def router_posterior(
    logits: torch.Tensor,
    log_prior: torch.Tensor | None = None,
    train_log_prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """w = P_lambda(z | x_t) = softmax(logits - log pi + log lambda) (Sec. 3.4, Bayes' rule).

    A classifier trained with cross-entropy on noised shard samples whose labels occur with
    frequencies pi converges to P_pi(z = i | x_t) = pi_i p_t^i(x) / sum_j pi_j p_t^j(x), so its
    logits are log p_t^i(x) + log pi_i up to a per-sample constant. Removing log pi and adding
    log lambda gives the posterior under the mixture prior lambda, which is w_i of eq. 5.

    logits: [B, n]. log_prior: log lambda, [n] or [B, n]; may hold -inf (lambda_i = 0, shard
    excluded). train_log_prior: log pi, [n], finite. None means uniform for either (a classifier
    trained on balanced batches; a uniform mixture), so both None is a plain softmax. Raw
    log-densities (log p_t^i(x)) are valid logits with train_log_prior=None.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, n], got shape {tuple(logits.shape)}")
    n = logits.shape[1]
    z = logits
    if train_log_prior is not None:
        if train_log_prior.shape != (n,):
            raise ValueError(
                f"train_log_prior must be [n={n}], got shape {tuple(train_log_prior.shape)}"
            )
        if not torch.isfinite(train_log_prior).all():
            raise ValueError("train_log_prior must be finite (every shard was seen in training)")
        z = z - train_log_prior.to(z)
    if log_prior is not None:
        if log_prior.shape[-1] != n or log_prior.dim() > 2:
            raise ValueError(f"log_prior must be [n={n}] or [B, n], got {tuple(log_prior.shape)}")
        if torch.isposinf(log_prior).any() or torch.isnan(log_prior).any():
            raise ValueError("log_prior must not hold +inf or nan")
        if torch.isneginf(log_prior).all(dim=-1).any():
            raise ValueError("log_prior gives zero prior to every shard")
        z = z + log_prior.to(z)
    return torch.softmax(z, dim=-1)


def mask_weights(weights: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """w_i 1[i allowed] / sum_j w_j 1[j allowed]: the posterior of the sub-mixture of allowed shards.

    Exact (eq. 5 for the mixture of the allowed shards with lambda renormalised over them): the
    normaliser p_t cancels. If a row has no mass left on allowed shards (the router put all of it
    on disallowed ones, or it underflowed), that row falls back to uniform over the allowed shards.
    For extreme logits prefer masking in log space: router_posterior(log_prior=-inf off-mask).
    """
    _check_weights(weights)
    n = weights.shape[1]
    if allowed.dtype != torch.bool or allowed.shape != (n,):
        raise ValueError(
            f"allowed must be a bool tensor [n={n}], got {allowed.dtype} {tuple(allowed.shape)}"
        )
    if not allowed.any():
        raise ValueError("no shard is allowed: cannot compose an empty set of shards")
    allowed = allowed.to(weights.device)
    masked = weights * allowed.to(weights.dtype)
    total = masked.sum(dim=1, keepdim=True)
    uniform = (allowed.to(weights.dtype) / allowed.sum()).expand_as(masked)
    empty = total <= 0
    return torch.where(empty, uniform, masked / torch.where(empty, torch.ones_like(total), total))


def topk_weights(
    weights: torch.Tensor, k: int | None = None, threshold: float | None = None
) -> torch.Tensor:
    """Sparse gating of eq. 5: keep the k largest w_i per row and/or those >= threshold, renormalise.

    With both given a shard is kept only if it passes both (at most k shards, each with weight >=
    threshold). The argmax of each row is always kept, so no row is emptied. Only kept shards need
    a forward pass (see `active_pairs`); the result is an approximation of eq. 5 unless the dropped
    mass is zero.
    """
    _check_weights(weights)
    n = weights.shape[1]
    if k is None and threshold is None:
        raise ValueError("topk_weights needs k and/or threshold")
    keep = torch.ones_like(weights, dtype=torch.bool)
    if k is not None:
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, n={n}], got {k}")
        top = torch.zeros_like(keep)
        top.scatter_(1, weights.topk(k, dim=1).indices, True)
        keep &= top
    if threshold is not None:
        if threshold < 0:
            raise ValueError(f"threshold must be non-negative, got {threshold}")
        keep &= weights >= threshold
    keep.scatter_(1, weights.argmax(dim=1, keepdim=True), True)
    kept = weights * keep.to(weights.dtype)
    total = kept.sum(dim=1, keepdim=True)
    # A row whose argmax is 0 has all weights 0: give the argmax everything.
    argmax_onehot = torch.zeros_like(weights).scatter_(1, weights.argmax(dim=1, keepdim=True), 1.0)
    empty = total <= 0
    return torch.where(
        empty, argmax_onehot, kept / torch.where(empty, torch.ones_like(total), total)
    )


def average_weights(batch: int, prior: torch.Tensor) -> torch.Tensor:
    """Naive averaging w_i = lambda_i (Sec. 3.4), for every sample; the CP-Delta sampler of Vyas et al.

    (copy protection, their Algorithm 3) is this with two shards. Exact only if all p_t^i agree.
    """
    _check_distribution(prior, "prior")
    return prior.unsqueeze(0).expand(batch, -1).clone()


def random_selection_weights(
    batch: int, prior: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random score selection (Sec. 3.4): one-hot w with i ~ lambda, drawn per sample at each call.

    In expectation it equals naive averaging; it costs one model evaluation per sample per step.
    """
    _check_distribution(prior, "prior")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    probs = prior.double().unsqueeze(0).expand(batch, -1)
    idx = torch.multinomial(probs, 1, replacement=True, generator=generator)
    return torch.zeros(batch, prior.numel(), dtype=prior.dtype, device=prior.device).scatter_(
        1, idx, 1.0
    )


def fixed_weights(batch: int, w: torch.Tensor) -> torch.Tensor:
    """User-chosen constant weights w_i (e.g. OOD coverage, paper Fig. 4): non-negative, sum 1."""
    _check_distribution(w, "fixed weights")
    return w.unsqueeze(0).expand(batch, -1).clone()


# --------------------------------------------------------------------------------------------
# Mixing epsilons
# --------------------------------------------------------------------------------------------


def mix_epsilons(eps: torch.Tensor | Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """eps(x, t) = sum_i w_i(x, t) eps_i(x, t) (Prop. 3.1, eq. 5 times -sigma_t); eps: [n, B, ...]."""
    if not torch.is_tensor(eps):
        eps = torch.stack(list(eps))
    _check_weights(weights)
    n, batch = weights.shape[1], weights.shape[0]
    if eps.dim() < 2 or eps.shape[0] != n or eps.shape[1] != batch:
        raise ValueError(
            f"eps must be [n={n}, B={batch}, ...] to match weights [B, n], got {tuple(eps.shape)}"
        )
    w = weights.to(eps).t().reshape(n, batch, *([1] * (eps.dim() - 2)))
    return (w * eps).sum(dim=0)


def active_pairs(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample_index, shard_index) of the pairs with w_i > 0, sorted by shard then sample.

    Each shard's samples are contiguous, so a caller can run one batched forward per shard:
    `counts = torch.bincount(shard_index, minlength=n)` and `split(counts.tolist())`.
    """
    _check_weights(weights)
    shard_index, sample_index = (weights.t() > 0).nonzero(as_tuple=True)
    return sample_index, shard_index


def mix_selected(
    eps_pairs: torch.Tensor,
    sample_index: torch.Tensor,
    shard_index: torch.Tensor,
    weights: torch.Tensor,
    batch: int | None = None,
) -> torch.Tensor:
    """Sparse Prop. 3.1: out[b] = sum over evaluated pairs (b, i) of w_bi eps_pair (index_add_).

    eps_pairs[p] is shard shard_index[p]'s epsilon for sample sample_index[p]. Every pair with
    w > 0 must be evaluated (as `active_pairs` gives); a sample whose evaluated weights do not sum
    to 1 raises, since mixing a subset silently would bias the score.
    """
    _check_weights(weights)
    if batch is None:
        batch = weights.shape[0]
    if batch != weights.shape[0]:
        raise ValueError(f"batch={batch} does not match weights [B={weights.shape[0]}, n]")
    p = eps_pairs.shape[0]
    if sample_index.shape != (p,) or shard_index.shape != (p,):
        raise ValueError(
            f"sample_index and shard_index must be [P={p}], got "
            f"{tuple(sample_index.shape)} and {tuple(shard_index.shape)}"
        )
    w = weights[sample_index, shard_index]
    covered = torch.zeros(batch, dtype=weights.dtype, device=weights.device)
    covered.index_add_(0, sample_index, w)
    if not torch.allclose(covered, torch.ones_like(covered), atol=1e-4):
        missing = (covered - 1).abs().argmax().item()
        raise ValueError(
            f"evaluated pairs carry weight {covered[missing].item():.6g} != 1 for sample {missing}: "
            "evaluate every pair with w > 0 (active_pairs) or renormalise the weights"
        )
    out = torch.zeros(batch, *eps_pairs.shape[1:], dtype=eps_pairs.dtype, device=eps_pairs.device)
    out.index_add_(0, sample_index, eps_pairs * _per_sample(w.to(eps_pairs), eps_pairs.dim()))
    return out


# --------------------------------------------------------------------------------------------
# Weight-space merging (baseline)
# --------------------------------------------------------------------------------------------


def merge_lora_weights(
    state_dicts: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """theta = sum_i w_i theta_i key by key: weight-space merging (Diffusion-Soup style baseline).

    Not the CDM mixture: one merged network is evaluated, so no eq. 5 holds. For LoRA adapters
    this averages lora_A and lora_B separately, whose product sum_ij w_i w_j B_i A_j has cross
    terms; `merge_lora_deltas` gives the merged update sum_i w_i B_i A_i instead. Floating
    tensors are averaged in float64 and cast back; other tensors must be equal and are copied.
    """
    if len(state_dicts) == 0:
        raise ValueError("merge_lora_weights needs at least one state dict")
    if len(weights) != len(state_dicts):
        raise ValueError(f"got {len(state_dicts)} state dicts but {len(weights)} weights")
    keys = set(state_dicts[0])
    for j, sd in enumerate(state_dicts[1:], start=1):
        if set(sd) != keys:
            diff = sorted(keys.symmetric_difference(sd))[:5]
            raise ValueError(f"state dict {j} has different keys from state dict 0: {diff}")
    merged: dict[str, torch.Tensor] = {}
    for key in state_dicts[0]:
        ref = state_dicts[0][key]
        for j, sd in enumerate(state_dicts):
            if sd[key].shape != ref.shape:
                raise ValueError(
                    f"{key}: shape {tuple(sd[key].shape)} in state dict {j} != {tuple(ref.shape)}"
                )
        if ref.is_floating_point():
            acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
            for w, sd in zip(weights, state_dicts, strict=True):
                acc += float(w) * sd[key].to(device=ref.device, dtype=torch.float64)
            merged[key] = acc.to(ref.dtype)
        else:
            if any(not torch.equal(sd[key], ref) for sd in state_dicts):
                raise ValueError(f"{key}: non-floating tensor differs between state dicts")
            merged[key] = ref.clone()
    return merged


def merge_lora_deltas(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """Delta W = sum_i w_i B_i A_i, the merged LoRA update as a dense matrix (float64).

    A_i: [r_i, in] (or a conv kernel [r_i, in, kh, kw]), B_i: [out, r_i] (or [out, r_i, 1, 1]);
    ranks may differ. Multiply by the adapter's scaling (alpha / r) beforehand if it differs from 1.
    Averaging A and B separately gives (sum_i w_i B_i)(sum_j w_j A_j) instead, which differs by
    the cross terms i != j. The same delta in LoRA form has rank sum_i r_i:
    B = [w_1 B_1 | ... | w_n B_n], A = [A_1; ...; A_n].
    """
    if not (len(As) == len(Bs) == len(weights)) or len(As) == 0:
        raise ValueError(
            f"need equally many (>= 1) As, Bs, weights; got {len(As)}, {len(Bs)}, {len(weights)}"
        )
    delta: torch.Tensor | None = None
    kernel: tuple[int, ...] = ()
    for j, (a, b, w) in enumerate(zip(As, Bs, weights, strict=True)):
        if a.dim() == 4:
            if b.dim() != 4 or b.shape[2:] != (1, 1):
                raise ValueError(f"adapter {j}: conv lora_A needs lora_B [out, r, 1, 1]")
            kernel = tuple(a.shape[2:])
            a2, b2 = a.flatten(1), b.flatten(1)
        elif a.dim() == 2 and b.dim() == 2:
            a2, b2 = a, b
        else:
            raise ValueError(f"adapter {j}: A and B must be 2-D (or conv 4-D), got {a.dim()}-D")
        if b2.shape[1] != a2.shape[0]:
            raise ValueError(
                f"adapter {j}: rank mismatch, B is {tuple(b.shape)} and A is {tuple(a.shape)}"
            )
        d = float(w) * (b2.double() @ a2.double())
        if delta is not None and d.shape != delta.shape:
            raise ValueError(f"adapter {j}: delta shape {tuple(d.shape)} != {tuple(delta.shape)}")
        delta = d if delta is None else delta + d
    assert delta is not None
    if kernel:
        delta = delta.reshape(delta.shape[0], -1, *kernel)
    return delta


# --------------------------------------------------------------------------------------------
# Composition methods: one small class each (cdm/conf/composition/*.yaml names them by _target_)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """What a composition method sees at one denoising step of a batch of B samples.

    prior: lambda [n], zero on disallowed shards, summing to one. log_prior: log lambda [n] over
    every loaded shard, or log P(z | y) [B, n] for class-conditional sampling. logits: the router's
    [B, n] (CPU, float) when the method names a router, else None.
    """

    x_t: torch.Tensor
    t: torch.Tensor
    prior: torch.Tensor
    log_prior: torch.Tensor
    logits: torch.Tensor | None = None
    train_log_prior: torch.Tensor | None = None
    generator: torch.Generator | None = None

    @property
    def batch(self) -> int:
        """B, the number of samples in this step."""
        return self.x_t.shape[0]


class Composition:
    """How the weights w_i(x_t, t) of Prop. 3.1 are formed; subclass it for a new method.

    ``weights(step)`` returns [B, n] (rows of non-negative numbers; the denoiser masks
    disallowed shards and renormalises); ``gate(w)`` may then sparsify the masked weights.
    Class attributes tell the sampler what to load: ``router`` names the router whose logits
    ``step.logits`` holds ("classifier" | "knn" | None); ``dense`` allows a dense step (every pair
    evaluated, e.g. one CUDA graph); ``capacity`` bounds the shards a gated row keeps (a static
    number of pairs per sample, e.g. k of top-k; None: no bound); ``merged`` composes one
    lambda-weighted merge of the shards' adapters; ``paragon`` samples the monolithic model
    trained on all private data; ``base`` samples the safe backbone alone (no adapter).
    """

    name: str = "composition"
    router: str | None = None
    dense: bool = True
    capacity: int | None = None
    merged: bool = False
    paragon: bool = False
    base: bool = False

    def weights(self, step: Step) -> torch.Tensor:
        """w [B, n] for this step."""
        raise NotImplementedError(f"{type(self).__name__} must implement weights(step)")

    def gate(self, weights: torch.Tensor) -> torch.Tensor:
        """The weights after masking; identity unless the method gates shards off."""
        return weights


class Average(Composition):
    """Naive averaging w_i = lambda_i (Sec. 3.4); the CP-Delta sampler of Vyas et al."""

    name = "average"

    def weights(self, step: Step) -> torch.Tensor:
        """lambda for every sample."""
        return average_weights(step.batch, step.prior)


class RandomSelection(Composition):
    """Random score selection (Sec. 3.4): one shard i ~ lambda per sample and step (cost 1x)."""

    name = "random"
    dense = False
    capacity = 1

    def weights(self, step: Step) -> torch.Tensor:
        """One-hot rows drawn from the step's generator."""
        return random_selection_weights(step.batch, step.prior, step.generator)


class Fixed(Composition):
    """User-chosen constant weights w_i (OOD coverage, paper Fig. 4), one per allowed shard."""

    name = "fixed"

    def __init__(self, weights: Sequence[float] | None) -> None:
        if weights is None:
            raise ValueError("composition=fixed needs weights: fixed_weights=[w_0, ..., w_n-1]")
        self.fixed = torch.tensor(list(weights), dtype=torch.float32)

    def weights(self, step: Step) -> torch.Tensor:
        """The fixed weights for every sample."""
        return fixed_weights(step.batch, self.fixed)


class RouterPosterior(Composition):
    """w = P_lambda(z | x_t) from a router's logits (Sec. 3.4, eq. 5): classifier, k-NN, or
    ``compartmental``: one head per shard whose logit is log p_t^i(x) - log p_t^safe(x), so
    softmax(h + log lambda) is w exactly (the reference density cancels;
    ``cdm.models.compartmental``)."""

    name = "classifier"

    def __init__(self, router: str = "classifier") -> None:
        self.router = router
        self.name = "classifier" if router == "classifier" else router

    def weights(self, step: Step) -> torch.Tensor:
        """softmax(logits - log pi + log lambda)."""
        return router_posterior(step.logits, step.log_prior, step.train_log_prior)


class TopK(RouterPosterior):
    """The router posterior gated to its k largest weights and/or those >= threshold."""

    name = "topk"
    dense = False

    def __init__(
        self, k: int | None = 2, threshold: float | None = None, router: str = "classifier"
    ) -> None:
        super().__init__(router)
        self.name, self.k, self.threshold = "topk", k, threshold
        self.capacity = k

    def gate(self, weights: torch.Tensor) -> torch.Tensor:
        """topk_weights of the masked posterior."""
        return topk_weights(weights, k=self.k, threshold=self.threshold)


class WeightMerge(Average):
    """Weight-space merging: one model whose LoRA delta is the lambda-weighted sum of the shards'."""

    name = "weight_merge"
    merged = True


class Paragon(Average):
    """The paragon: one adapter trained on all private data (no compartments)."""

    name = "paragon"
    paragon = True


class Base(Average):
    """The base model: the safe backbone alone, no shard's adapter (paper Table 2's first row)."""

    name = "base"
    base = True
