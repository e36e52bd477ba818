"""TRAK with the D-TRAK output function: gradient-based attribution of a global property gamma.

TRAK (Park et al. 2023, "TRAK: Attributing Model Behavior at Scale") linearises the trained model
around theta*, randomly projects per-sample gradients phi_j = P^T grad_theta f(x_j) (sec. 3) and
scores a training sample by a one-step Newton estimate of its leave-one-out effect,
tau_j = phi(target)^T (Phi^T Phi)^{-1} phi_j (the TRAK estimator, Algorithm 1). D-TRAK (Zheng et
al. 2024, "Intriguing properties of data attribution on diffusion models") found that for
diffusion models the output function f(x) = ||eps_theta(x_t, t)||^2 ("L_square"), averaged over
fixed (t, eps) pairs, attributes better than the training loss itself; both are offered here.
The target is the gradient d gamma / d theta of a global property of generated samples (the FD in
the domain feature space), differentiated through a deterministic DDIM sampler.

Written on ``torch.func`` rather than through dattri or traker: both pull heavy dependencies and
assume a classification head, whereas here the model is a (peft-wrapped) diffusers UNet and the
target is a property of generated samples.

Composable pieces (the removal experiment chains them)::

    projector = Projector(num_params, dim=2048, seed=0)
    phi = projector(per_sample_gradients(model, images, labels, alphas_cumprod=abar))
    g = projector(property_gradient(model, sample_fn, property_fn)[None])[0]
    tau = trak_scores(phi, g)            # tau_j > 0: training on j raises gamma
    group_tau = group_scores(tau, groups)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from cdm.core.diffusion import per_sample_epsilon_loss, q_sample, step_generator
from cdm.eval.frechet import FeatureStats
from cdm.models.adapters import trainable_parameters
from cdm.models.backbone import predict_epsilon
from cdm.models.feature_net import DomainFeatures

OutputFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TimestepSpacing = Literal["even", "random"]
EpsilonFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def dtrak_output(eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """D-TRAK's ``L_square``: mean over the probes and pixels of ||eps_theta(x_t, t, y)||^2."""
    return per_sample_epsilon_loss(eps_pred, torch.zeros_like(eps_pred)).mean()


def loss_output(eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """TRAK with the training loss: mean over the probes of ||eps_theta(x_t, t, y) - eps||^2
    (DDPM eq. 14, as the model was trained)."""
    return per_sample_epsilon_loss(eps_pred, noise).mean()


OUTPUT_FUNCTIONS: dict[str, OutputFunction] = {"dtrak": dtrak_output, "loss": loss_output}


def output_function(output: str | OutputFunction) -> OutputFunction:
    """``"dtrak"`` | ``"loss"`` | any callable ``(eps_pred [K, ...], noise [K, ...]) -> scalar``."""
    if callable(output):
        return output
    if output not in OUTPUT_FUNCTIONS:
        raise ValueError(
            f"unknown TRAK output function {output!r}: choose one of {sorted(OUTPUT_FUNCTIONS)} "
            "or pass a callable (eps_pred, noise) -> scalar"
        )
    return OUTPUT_FUNCTIONS[output]


@dataclass(frozen=True)
class Probes:
    """The fixed (timestep, noise) pairs every sample's output function is averaged over.

    Drawn once from a seed and shared by every training sample and by the target, as D-TRAK
    does, so that features of different samples differ only through the samples themselves.
    """

    timesteps: torch.Tensor  # [K] long
    noise: torch.Tensor  # [K, C, H, W]

    def to(self, device: torch.device, dtype: torch.dtype) -> Probes:
        return Probes(self.timesteps.to(device), self.noise.to(device=device, dtype=dtype))


def make_probes(
    sample_shape: Sequence[int],
    *,
    num_timesteps: int = 10,
    num_train_timesteps: int = 1000,
    seed: int = 0,
    spacing: TimestepSpacing = "even",
) -> Probes:
    """``num_timesteps`` timesteps (``even``: 0, T/K, 2T/K, ... as D-TRAK's uniform choice;
    ``random``: K distinct seeded ones, sorted) and one N(0, I) noise each, drawn on the CPU
    from ``seed`` so that every device gets the same pairs."""
    if not 1 <= num_timesteps <= num_train_timesteps:
        raise ValueError(
            f"num_timesteps must be in 1..{num_train_timesteps} (the training schedule's length), "
            f"got {num_timesteps}"
        )
    generator = torch.Generator().manual_seed(int(seed))
    if spacing == "even":
        timesteps = torch.arange(num_timesteps) * (num_train_timesteps // num_timesteps)
    elif spacing == "random":
        timesteps = torch.randperm(num_train_timesteps, generator=generator)[:num_timesteps].sort()[
            0
        ]
    else:
        raise ValueError(f"timestep spacing {spacing!r}: choose 'even' or 'random'")
    noise = torch.randn((num_timesteps, *map(int, sample_shape)), generator=generator)
    return Probes(timesteps.long(), noise)


class _EpsilonModule(nn.Module):
    """``predict_epsilon(model, ...)`` as a module, so ``functional_call`` can swap its weights."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, x_t: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        return predict_epsilon(self.model, x_t, timesteps, labels)


def flat_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable (name, parameter) pairs whose flattened concatenation is the P axis of every
    gradient here; a clear error when there are none."""
    named = trainable_parameters(model)
    if not named:
        raise ValueError(
            "the attributed model has no trainable parameters: attach an adapter "
            "(cdm.models.adapters.lora_adapter) or call model.requires_grad_(True)"
        )
    return named


def per_sample_gradients(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    alphas_cumprod: torch.Tensor,
    output: str | OutputFunction = "dtrak",
    num_timesteps: int = 10,
    seed: int = 0,
    spacing: TimestepSpacing = "even",
    chunk_size: int = 32,
    vectorize: bool = True,
    projector: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[N, P]`` gradients d f(x_j, y_j) / d theta over the trainable parameters only (TRAK's
    phi_j before projection), f the output function averaged over the shared probes
    (``make_probes``): x_t = sqrt(abar_t) x_j + sqrt(1 - abar_t) eps (DDPM eq. 4).

    ``images`` are ``[N, C, H, W]`` in [-1, 1]; ``labels`` ``[N]`` (None for an unconditional
    UNet). Samples are processed ``chunk_size`` at a time, with ``vmap(grad(f))`` when
    ``vectorize`` (else one ``grad(f)`` per sample, same numbers), in eval mode. With a
    ``projector`` each chunk is projected at once and ``[N, dim]`` is returned, so ``[N, P]`` is
    never held (the projection matrix is then regenerated per chunk: cheap on a GPU).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if labels is not None and labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be [N] = [{images.shape[0]}], got {tuple(labels.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    named = flat_trainable(model)
    device, dtype = named[0][1].device, named[0][1].dtype
    names = [f"model.{n}" for n, _ in named]
    params = {name: p.detach() for name, (_, p) in zip(names, named, strict=True)}
    probes = make_probes(
        images.shape[1:], num_timesteps=num_timesteps, num_train_timesteps=len(alphas_cumprod),
        seed=seed, spacing=spacing,
    ).to(device, dtype)  # fmt: skip
    f_out = output_function(output)
    wrapper = _EpsilonModule(model)
    k = probes.timesteps.shape[0]

    def f(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        x_t = q_sample(x.expand(k, *x.shape), probes.noise, probes.timesteps, alphas_cumprod)
        y_k = None if y is None else y.expand(k)
        return f_out(functional_call(wrapper, p, (x_t, probes.timesteps, y_k)), probes.noise)

    grad_f = grad(f)
    batched = vmap(grad_f, in_dims=(None, 0, None if labels is None else 0))
    rows = []
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():  # SDPA has no vmap batching rule yet: a slower, exact loop
            warnings.filterwarnings("ignore", message="There is a performance drop")
            for start in range(0, images.shape[0], chunk_size):
                x = images[start : start + chunk_size].to(device=device, dtype=dtype)
                y = None if labels is None else labels[start : start + chunk_size].to(device)
                if vectorize:
                    g = batched(params, x, y)
                    chunk = torch.cat([g[n].reshape(x.shape[0], -1) for n in names], dim=1)
                else:
                    chunk = torch.stack(
                        [
                            torch.cat([v.reshape(-1) for v in grad_f(params, xi, yi).values()])
                            for xi, yi in zip(x, [None] * len(x) if y is None else y, strict=True)
                        ]
                    )
                rows.append(chunk if projector is None else projector(chunk))
    finally:
        model.train(was_training)
    return torch.cat(rows)


class Projector:
    """Gaussian Johnson-Lindenstrauss projection g -> P^T g / sqrt(dim), P ~ N(0, 1)^{P x dim}
    (TRAK sec. 3, "random projection"): inner products are preserved in expectation.

    P is generated ``block_rows`` rows at a time, block b from ``step_generator(seed, b)`` on the
    input's device, so the whole matrix is never held; it is a function of (num_params, dim,
    seed, block_rows, device type) alone. Use one Projector (or the same arguments) for the
    training features and the target, on one device type.
    """

    def __init__(self, num_params: int, dim: int, seed: int = 0, block_rows: int = 4096) -> None:
        if num_params < 1 or dim < 1 or block_rows < 1:
            raise ValueError(
                f"Projector needs num_params, dim, block_rows >= 1; got {num_params}, {dim}, "
                f"{block_rows}"
            )
        self.num_params = int(num_params)
        self.dim = int(dim)
        self.seed = int(seed)
        self.block_rows = int(block_rows)

    def blocks(self, device: torch.device | str = "cpu") -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield (start, stop, rows of P [stop - start, dim] in float32)."""
        for b, start in enumerate(range(0, self.num_params, self.block_rows)):
            stop = min(start + self.block_rows, self.num_params)
            generator = step_generator(self.seed, b, device=device)
            rows = torch.randn(stop - start, self.dim, generator=generator, device=device)
            yield start, stop, rows

    def __call__(self, grads: torch.Tensor) -> torch.Tensor:
        """``[N, num_params]`` -> ``[N, dim]`` in the dtype of ``grads``."""
        if grads.ndim != 2 or grads.shape[1] != self.num_params:
            raise ValueError(
                f"Projector({self.num_params} -> {self.dim}) takes [N, {self.num_params}] "
                f"gradients, got {tuple(grads.shape)}"
            )
        out = grads.new_zeros(grads.shape[0], self.dim)
        for start, stop, rows in self.blocks(grads.device):
            out += grads[:, start:stop] @ rows.to(grads.dtype)
        return out / math.sqrt(self.dim)

    def matrix(self) -> torch.Tensor:
        """The whole ``[num_params, dim]`` matrix P on the CPU (for tests and small P only)."""
        return torch.cat([rows for _, _, rows in self.blocks("cpu")])


def random_projection(grads: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """``Projector(P, dim, seed)(grads)``: ``[N, P]`` -> ``[N, dim]``."""
    return Projector(grads.shape[1], dim, seed)(grads)


def trak_scores(
    train_features: torch.Tensor,
    target_feature: torch.Tensor,
    *,
    damping: float = 1e-3,
    loss_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """tau_j = - g^T (Phi^T Phi + lambda I)^{-1} phi_j q_j, in float64 (TRAK, Algorithm 1).

    Sign. Let theta* minimise L(theta) = sum_i l_i(theta) + (lambda/2)||theta||^2 with Hessian
    H = Phi^T Phi + lambda I (Gauss-Newton, as TRAK). Without sample j, one Newton step from
    theta* on L - l_j gives theta_{-j} ~ theta* + H^{-1} grad l_j(theta*) (the gradient of
    L - l_j at theta* is -grad l_j). The effect of INCLUDING j on a quantity gamma with gradient
    g = ``target_feature`` is gamma(theta*) - gamma(theta_{-j}) ~ -g^T H^{-1} grad l_j, and TRAK
    writes grad l_j = q_j phi_j (q_j = ``loss_weights``: 1 - p_j for logistic regression, the
    residual for least squares, 1 when phi_j is already the gradient of the training loss, the
    default). So tau_j > 0 means that training on j raises gamma. For an FD target (lower is
    better) a helpful sample has tau_j < 0. Exact leave-one-out for a quadratic loss divides
    tau_j by 1 - h_jj, h_jj = phi_j^T H^{-1} phi_j (Sherman-Morrison); TRAK omits it. The sign is
    checked end to end (loss features, the target through DDIM, group sums, LDS) against exact
    refits of a convex denoiser in ``tests/test_trak_sign.py`` (issue 13).

    ``damping`` is relative: lambda = damping * tr(Phi^T Phi) / d (the mean eigenvalue), so
    one value fits any gradient scale; with N < d the kernel is singular and damping > 0 is
    needed. ``train_features`` ``[N, d]``, ``target_feature`` ``[d]`` -> ``[N]``.
    """
    phi = train_features.double()
    g = target_feature.double().to(phi.device)
    if phi.ndim != 2 or g.shape != (phi.shape[1],):
        raise ValueError(
            f"trak_scores takes train_features [N, d] and target_feature [d]; got "
            f"{tuple(phi.shape)} and {tuple(g.shape)}"
        )
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    kernel = phi.T @ phi
    d = kernel.shape[0]
    lam = float(damping) * float(torch.trace(kernel)) / d
    chol, info = torch.linalg.cholesky_ex(
        kernel + lam * torch.eye(d, dtype=phi.dtype, device=phi.device)
    )
    if int(info) != 0:
        raise ValueError(
            f"Phi^T Phi + lambda I is singular ({phi.shape[0]} features of dim {d}, "
            f"damping={damping}): raise damping"
        )
    tau = -(phi @ torch.cholesky_solve(g[:, None], chol)[:, 0])
    if loss_weights is not None:
        tau = tau * loss_weights.double().to(tau.device)
    return tau


def group_scores(tau: torch.Tensor, members_index: Sequence[Sequence[int]]) -> torch.Tensor:
    """Per-group sums of ``tau`` ``[N]``: the linear prediction of removing or adding a whole
    group (a class, a source) is the sum of its members' scores. -> ``[G]``, float64."""
    tau = torch.as_tensor(tau).double()
    out = torch.zeros(len(members_index), dtype=torch.float64, device=tau.device)
    for i, members in enumerate(members_index):
        idx = torch.as_tensor(list(members), dtype=torch.long, device=tau.device)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= tau.shape[0]):
            raise ValueError(
                f"group {i} has an index outside 0..{tau.shape[0] - 1}: members index rows of tau"
            )
        out[i] = tau[idx].sum()
    return out


def differentiable_ddim(
    model_eps: EpsilonFn,
    scheduler: DDIMScheduler,
    x_T: torch.Tensor,
    steps: int,
    labels: torch.Tensor | None = None,
    *,
    checkpoint: bool = False,
) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0) from x_T, differentiable in
    the model's parameters: the loop of ``cdm.core.sampling.sample`` without its ``no_grad``.

    ``model_eps(x_t, t, labels) -> eps``; ``checkpoint`` recomputes each step's activations in
    the backward pass (memory of one step instead of ``steps``).
    """
    if not isinstance(scheduler, DDIMScheduler):
        raise ValueError(
            f"differentiable_ddim needs a diffusers DDIMScheduler (deterministic with eta=0), got "
            f"{type(scheduler).__name__}: use sampler=ddim"
        )
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(
            f"the scheduler predicts {scheduler.config.prediction_type!r}; the model gives epsilon"
        )
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    scheduler.set_timesteps(steps, device=x_T.device)
    x = x_T * scheduler.init_noise_sigma

    def step(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = model_eps(scheduler.scale_model_input(x_t, t), t, labels)
        return scheduler.step(eps, t, x_t, eta=0.0).prev_sample

    for t in scheduler.timesteps:
        x = activation_checkpoint(step, x, t, use_reentrant=False) if checkpoint else step(x, t)
    return x


def ddim_sample_fn(
    scheduler: DDIMScheduler,
    x_T: torch.Tensor,
    steps: int,
    labels: torch.Tensor | None = None,
    *,
    checkpoint: bool = False,
) -> Callable[[nn.Module], torch.Tensor]:
    """``model -> samples`` by ``differentiable_ddim`` from fixed noise ``x_T`` (and labels), for
    ``property_gradient``."""

    def sample_fn(model: nn.Module) -> torch.Tensor:
        def model_eps(x, t, y):
            return predict_epsilon(model, x, t, y)

        return differentiable_ddim(model_eps, scheduler, x_T, steps, labels, checkpoint=checkpoint)

    return sample_fn


def domain_net_input(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> the domain feature net's input, as ``DomainFeatures`` maps uint8
    samples (``to_uint8`` then ``u / 127.5 - 1``) but without rounding, so it is differentiable
    (clamped pixels get zero gradient)."""
    u = (images.clamp(-1, 1) + 1) * 127.5
    return u / 127.5 - 1.0


def differentiable_features(space: object) -> Callable[[torch.Tensor], torch.Tensor]:
    """``float images [N, C, H, W] in [-1, 1] -> features [N, dim]``, differentiable, in the same
    space as the uint8 ``FeatureSpace`` ``space``. Only the domain feature net's space
    (``DomainFeatures``, ``<dataset>_net``) is a torch module on the image values."""
    if not isinstance(space, DomainFeatures):
        raise ValueError(
            f"feature space {getattr(space, 'name', type(space).__name__)!r} has no differentiable "
            "path from images: a TRAK target gradient works in the domain feature net's space "
            "(feature_space=domain, DomainFeatures); pixels and inception_clean quantise or resize "
            "outside torch"
        )

    dtype = next(space.net.parameters()).dtype

    def features(images: torch.Tensor) -> torch.Tensor:
        return space.net.features(domain_net_input(images).to(space.device, dtype))

    return features


def symmetric_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """The PSD square root of a symmetric matrix (eigh; negative round-off eigenvalues -> 0)."""
    evals, evecs = torch.linalg.eigh(matrix)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def frechet_distance_torch(
    features: torch.Tensor,
    ref_mean: torch.Tensor,
    ref_cov: torch.Tensor,
    *,
    ref_cov_sqrt: torch.Tensor | None = None,
) -> torch.Tensor:
    """Frechet distance (Heusel et al. 2017) of features ``[N, d]`` to N(ref_mean, ref_cov),
    differentiable in ``features``, in float64:
    ||mu - mu_r||^2 + tr C + tr C_r - 2 tr sqrt(C_r^{1/2} C C_r^{1/2}).

    C is the unbiased covariance (as ``stats_from_features``); the last trace is the sum of the
    square roots of the eigenvalues (``eigvalsh``) of a symmetric PSD matrix, which equals
    tr sqrt(C C_r) of ``cdm.eval.frechet.frechet_distance``. Eigenvalues below 1e-12 of the
    largest (rank deficiency when N <= d) count as 0 with zero gradient. Pass ``ref_cov_sqrt``
    (``symmetric_sqrt(ref_cov)``) to compute it once for many calls.
    """
    x = features.double()
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, d], got {tuple(x.shape)}")
    mu_r = ref_mean.double().to(x.device)
    cov_r = ref_cov.double().to(x.device)
    root_r = symmetric_sqrt(cov_r) if ref_cov_sqrt is None else ref_cov_sqrt.double().to(x.device)
    mu = x.mean(dim=0)
    centred = x - mu
    cov = centred.T @ centred / (x.shape[0] - 1)
    inner = root_r @ cov @ root_r
    evals = torch.linalg.eigvalsh((inner + inner.T) / 2)
    keep = evals > 1e-12 * evals.abs().max().clamp_min(1e-300)
    roots = torch.where(keep, torch.where(keep, evals, torch.ones_like(evals)).sqrt(), 0.0)
    diff = mu - mu_r
    return diff @ diff + torch.trace(cov) + torch.trace(cov_r) - 2 * roots.sum()


def frechet_property_fn(
    feature_fn: Callable[[torch.Tensor], torch.Tensor], reference: FeatureStats
) -> Callable[[torch.Tensor], torch.Tensor]:
    """gamma(images) = FD of ``feature_fn(images)`` to the ``reference`` statistics (the FD
    property of ``cdm.attribution.properties``, differentiable), for ``property_gradient``."""
    mean = torch.as_tensor(reference.mu, dtype=torch.float64)
    cov = torch.as_tensor(reference.sigma, dtype=torch.float64)
    root = symmetric_sqrt(cov)

    def gamma(images: torch.Tensor) -> torch.Tensor:
        return frechet_distance_torch(feature_fn(images), mean, cov, ref_cov_sqrt=root)

    return gamma


def property_gradient(
    model: nn.Module,
    sample_fn: Callable[[nn.Module], torch.Tensor],
    property_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``[P]`` = d gamma / d theta over the trainable parameters (the order of
    ``per_sample_gradients``), gamma = ``property_fn(sample_fn(model))`` a scalar tensor, the
    samples drawn differentiably (``ddim_sample_fn``) in eval mode. TRAK's target feature
    before projection."""
    named = flat_trainable(model)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            gamma = property_fn(sample_fn(model))
            if gamma.ndim != 0:
                raise ValueError(
                    f"property_fn must return a scalar tensor, got {tuple(gamma.shape)}"
                )
            grads = torch.autograd.grad(gamma, [p for _, p in named], allow_unused=True)
    finally:
        model.train(was_training)
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for (_, p), g in zip(named, grads, strict=True)
        ]
    )
