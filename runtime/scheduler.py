"""The coupled two-branch scheduler: inversion and TAC-guided generation as one bound program.

For a batch size B, a schedule and a variant, every buffer is allocated once and every graph call is bound once;
running a batch is: upload the images, execute the program, download the images. The emit graph's Q/K outputs are
the inject graph's Q/K inputs (the same buffers), the inversion latents are read in place by the cg passes, and the
[zr, zr] batch is written by the update itself.

The program is assembled by small functions, one job each (docs/design.md, "The method"): `encode`, one inversion
per variant (`invert_exact`, `invert_single_pass`), `generate` with one TAC pass per variant (`tac_emit_inject`,
`tac_fused`, `tac_kept`), `decode`. Graph calls per image at the defaults (n = 15, window 13): exact inversion
15 + 13 + 30 = 58; single-pass inversion 16 + 30 = 46 (docs/design.md, "UNet evaluations per image"). With step
caching (cache interval K > 1, the fused program) every routed call is `unet_deep` or `unet_shallow` by the cadence
of `r2r.step_cache.full_calls`, each branch reading the deep features its own whole calls wrote (docs/design.md,
"Less work per image").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from r2r import graph_io
from r2r.config import Method, Variant
from r2r.errors import R2RError
from r2r.graph_io import key_level
from r2r.imageio import from_model_output, to_model_input
from r2r.runtime.bundle_reader import Bundle
from r2r.runtime.device import Backend, Coefficients, DeviceArray, Op
from r2r.schedule import Schedule, transfer_coefficients
from r2r.step_cache import full_calls

STAGES = ("encode", "inversion", "generation", "decode")
StepCallback = Callable[[int, int], None]  # (steps done, steps in the batch's program)


def program_graphs(variant: Variant, step_graphs: bool = False, step_cache: bool = False,
                   text: bool = False) -> tuple[str, ...]:
    """The bundle graphs a variant's program calls (what a backend opens, and the canaries check first); with
    `step_graphs`, the scheduler updates too (backends whose memory the host cannot touch), the text rows' update
    with `text`; with `step_cache` (cache interval > 1, the fused program), the step-cache pair in place of the
    routed `unet`."""
    if step_cache:
        unets: tuple[str, ...] = graph_io.STEP_CACHE_GRAPHS
    else:
        unets = (graph_io.UNET,) if variant.fused else (graph_io.UNET, graph_io.UNET_EMIT, graph_io.UNET_INJECT)
    steps = (graph_io.DDIM_STEP, graph_io.GUIDED_TEXT_STEP if text else graph_io.GUIDED_STEP)
    return (graph_io.VAE_ENCODER, *unets, graph_io.VAE_DECODER, *(steps if step_graphs else ()))


def bundle_graphs(variant: Variant, step_cache: bool = False) -> tuple[str, ...]:
    """The graphs a bundle for a variant's program holds: what the program calls on any backend, the text rows'
    update included (what `r2r-run` exports into its cache)."""
    return (*program_graphs(variant, step_graphs=True, step_cache=step_cache), graph_io.GUIDED_TEXT_STEP)


class DegenerateOutput(R2RError, RuntimeError):
    """Images of a batch that must not be delivered: their final latents or decoded pixels are not finite, or the
    latents are constant (no model output is). `outputs` holds the batch's other images (None for the bad ones)."""

    def __init__(self, problems: dict[int, str], outputs: list[np.ndarray | None]) -> None:
        self.problems, self.outputs = problems, outputs
        which = ", ".join(f"image {i + 1} of {len(outputs)}: {why}" for i, why in problems.items())
        super().__init__(f"not delivered ({which}); the engine computed something wrong: try --backend onnxruntime "
                         "--precision fp32")


def output_problems(latents: np.ndarray, images: np.ndarray) -> dict[int, str]:
    """Row -> why its output is not an image: NaN or Inf in the final latent or the decoded image, or a constant
    latent."""
    problems = {}
    for i, (z, x) in enumerate(zip(latents, images, strict=True)):
        if not np.isfinite(z).all():
            problems[i] = "the final latent holds NaN or Inf"
        elif not np.isfinite(x).all():
            problems[i] = "the decoded image holds NaN or Inf"
        elif float(z.max()) == float(z.min()):
            problems[i] = "the final latent is constant"
    return problems


@dataclass
class Plan:
    """A bound program and what it evaluates, for one (batch, method, variant)."""

    ops: list[Op] = field(default_factory=list)
    unet_evaluations: Counter = field(default_factory=Counter)  # graph -> latents evaluated per image
    graph_calls: Counter = field(default_factory=Counter)
    stages: dict[str, slice] = field(default_factory=dict)  # encode / inversion / generation / decode
    unet_ops: dict[int, int] = field(default_factory=dict)  # op index -> latents per image it evaluates
    step_ends: list[int] = field(default_factory=list)  # op index after each denoising step (inversion, generation)

    def add(self, op: Op) -> None:
        self.ops.append(op)


class StepCacheUnsupported(R2RError, ValueError):
    """Step caching asked of a program other than the fused one."""


class TextRowsUnsupported(R2RError, ValueError):
    """Prompts asked of a program other than the fused one."""


class CoupledScheduler:
    """FashionR2R's generation on a bundle through one backend, batch of B images of one size (the bundle's example
    size by default; any size the bundle takes)."""

    def __init__(self, bundle: Bundle, backend: Backend, batch: int, method: Method,
                 variant: Variant | None = None, size: tuple[int, int] | None = None, text: bool = False) -> None:
        variant = variant or Variant()
        if method.interval > 1 and not variant.fused:
            raise StepCacheUnsupported(
                f"--cache-interval {method.cache_interval}: step caching runs in the fused program (exact inversion, "
                "--fused auto or on)")
        if text and not variant.fused:
            raise TextRowsUnsupported("a prompt with --text-guidance > 0 runs in the fused program (exact inversion, "
                                      "--fused auto or on)")
        # text rows (docs/design.md, "Prompts"): the guided batch is [neg, null, text], the fused step
        # [cg, neg, null, text]; the text block's conditioning and weights are uploaded with each batch
        self.text = text
        self.groups = 3 if text else 2
        bundle.check(method, batch)
        self.width, self.height = size or (bundle.width, bundle.height)
        bundle.check_size(self.width, self.height)
        self.bundle, self.backend, self.batch, self.method, self.variant = bundle, backend, batch, method, variant
        self.schedule, self.window = bundle.schedule(method)
        self._alloc()
        self.plan = build_program(self)

    # -- buffers ---------------------------------------------------------------------------------
    def _alloc(self) -> None:
        be, b, n = self.backend, self.batch, self.schedule.n
        c, h, w = self.bundle.channels, self.height // 8, self.width // 8
        lat = (c, h, w)
        self.image_in = be.empty((b, 3, self.height, self.width))
        self.image_out = be.empty((b, 3, self.height, self.width))
        self.z0 = be.empty((b, *lat))
        g = self.groups
        d = self.bundle.c_null.shape[-1]
        null, neg = np.repeat(self.bundle.c_null, b, 0), np.repeat(self.bundle.c_neg, b, 0)
        self.c_null = be.empty((b, 77, d))
        self.c_pair = be.empty((g * b, 77, d))  # [neg, null] or [neg, null, text]
        be.upload(self.c_null, null)
        be.upload(self.c_pair, np.concatenate([neg, null, null][:g]))
        self.w_text = be.empty((b,)) if self.text else None
        if self.variant.fused:
            self.c_fused = be.empty(((g + 1) * b, 77, d))
            be.upload(self.c_fused, np.concatenate([null, neg, null, null][:g + 1]))
            # Step i's fused batch is [z_t(i), zr, zr(, zr)]: the inversion and the update write into it.
            self.fused_in = be.empty((n, (g + 1) * b, *lat))
            self.zs = [self.fused_in[i][:b] for i in range(n)]
        else:
            zs = be.empty((n, b, *lat))
            self.zs = [zs[i] for i in range(n)]
        self.pairs = be.empty((2, g * b, *lat))  # ping-pong [zr, zr(, zr)] batches
        self.eps1 = be.empty((b, *lat))
        self.eps_pair = be.empty((g * b, *lat))
        self.eps_fused = be.empty(((g + 1) * b, *lat)) if self.variant.fused else None
        layers = self.bundle.tac_layers
        # exact inversion: one Q/K set, rewritten by each step's cg pass; single-pass: one per window step
        slots = self.window if self.variant.inversion == "single-pass" else min(self.window, 1)
        # Q/K of a TAC layer: its tokens on its level's grid, [B, h_l, w_l, C], a pooled key on the pooled grid
        # (docs/design.md, "Graphs", "Less work per image")
        pool = self.bundle.attention_pool
        self.qk = [[be.empty((b, h >> level, w >> level, lyr["channels"]))
                    for lyr in layers for level in (lyr["level"], key_level(lyr["level"], pool))]
                   for _ in range(slots)]
        sched = self.schedule
        self.timesteps = be.empty((n + 1, 1))  # row n: single-pass inversion's first timestep (t0)
        be.upload(self.timesteps, np.array([[t] for t in (*sched.timesteps, self._t0())], np.float32))
        self.coef_host = self._coefficients()
        self.coefs = be.empty((len(self.coef_host), 3))
        be.upload(self.coefs, np.array([[c.cz, c.ce, c.w] for c in self.coef_host], np.float32))
        # tac_src of the routed UNet: the identity at B and at the guided batch, and the fused step
        # [cg, neg, null -> cg(, text -> cg where method.text_tac, else itself)]
        self.identity = {k: be.empty((k * b,), np.int64) for k in (1, g)}
        for k, src in self.identity.items():
            be.upload(src, np.arange(k * b, dtype=np.int64))
        text_src = [np.arange(b) if self.method.text_tac else np.arange(3 * b, 4 * b)] if self.text else []
        self.routed = be.empty(((g + 1) * b,), np.int64)
        be.upload(self.routed, np.concatenate([np.arange(2 * b), np.arange(b), *text_src]).astype(np.int64))
        # step caching: each branch's deep features, the inversion's [B] and the generation's fused batch (the
        # guided batch after the window is its tail)
        self.cached = self.method.interval > 1
        if self.cached:
            deep = (int(self.bundle.manifest.latent["deep_channels"]), h, w)
            self.deep_inv, self.deep_gen = be.empty((b, *deep)), be.empty(((g + 1) * b, *deep))

    def _t0(self) -> int:
        """Single-pass inversion evaluates z0 at its own level: timestep ts[-1] - D, at least 0."""
        return max(self.schedule.timesteps[-1] - self.schedule.stride, 0)

    def _coefficients(self) -> list[Coefficients]:
        """Rows 0..n-1: inversion step j (a(t-D) -> a(t)); rows n..2n-1: generation step i (guided)."""
        s: Schedule = self.schedule
        inv = [Coefficients(*transfer_coefficients(s.alpha_prev[j], s.alpha[j])) for j in range(s.n)]
        gen = [Coefficients(*transfer_coefficients(s.alpha[i], s.alpha_prev[i]), self.method.guidance)
               for i in range(s.n)]
        return inv + gen

    def pair(self, i: int) -> DeviceArray:
        """Where generation step i reads its [zr, zr] (with text rows [zr, zr, zr]) batch (step n's is the
        result)."""
        if self.variant.fused and i < self.window:
            return self.fused_in[i][self.batch:]
        return self.pairs[i % 2]

    def unet(self, plan: Plan, graph: str, sample: DeviceArray, t: int, cond: DeviceArray, eps: DeviceArray,
             qk: list[DeviceArray] | None = None, src: DeviceArray | None = None, deep: DeviceArray | None = None
             ) -> Op:
        """A prepared UNet call at timestep row `t`, counted in the plan. The routed graphs take `src` (default:
        the identity, a plain evaluation); the step-cache pair `deep`, the features one writes and the other reads."""
        binds = {graph_io.SAMPLE: sample, graph_io.TIMESTEP: self.timesteps[t], graph_io.ENCODER_HIDDEN_STATES: cond,
                 graph_io.EPS: eps}
        if qk is not None:
            binds |= dict(zip(graph_io.tac_names(len(self.bundle.tac_layers)), qk, strict=True))
        if graph in graph_io.ROUTED_GRAPHS:
            binds[graph_io.TAC_SRC] = src if src is not None else self.identity[sample.shape[0] // self.batch]
        if deep is not None:
            binds[graph_io.DEEP] = deep
        per_image = sample.shape[0] // self.batch
        plan.unet_evaluations[graph] += per_image
        plan.graph_calls[graph] += 1
        plan.unet_ops[len(plan.ops)] = per_image
        return self.backend.call(graph, binds)

    def routed_unet(self, plan: Plan, whole: bool, sample: DeviceArray, t: int, cond: DeviceArray,
                    eps: DeviceArray, deep: DeviceArray | None, src: DeviceArray | None = None) -> Op:
        """A routed UNet call: `unet`, or with step caching the whole call that refreshes the branch's `deep`
        features (`whole`) or the shallow one that reads them."""
        if not self.cached:
            return self.unet(plan, graph_io.UNET, sample, t, cond, eps, src=src)
        graph = graph_io.UNET_DEEP if whole else graph_io.UNET_SHALLOW
        return self.unet(plan, graph, sample, t, cond, eps, src=src, deep=deep)

    @property
    def unet_evaluations_per_image(self) -> int:
        return sum(self.plan.unet_evaluations.values())

    # -- running ---------------------------------------------------------------------------------
    @property
    def final_latents(self) -> DeviceArray:
        """The last generation step's latents [B, C, h, w] (what the decoder reads)."""
        return self.pair(self.schedule.n)[:self.batch]

    def _upload_text(self, cond: np.ndarray, weights: np.ndarray) -> None:
        """A batch's text rows (runtime.prompt_encoder.TextRows: [k, 77, d] and [k], k <= B; padded like the
        images) into the guided and fused batches' text blocks."""
        b, k = self.batch, cond.shape[0]
        if not 1 <= k <= b or weights.shape != (k,):
            raise ValueError(f"text rows of {k} conditionings and {weights.shape} weights for a batch of {b}")
        cond = np.concatenate([cond, np.repeat(cond[-1:], b - k, 0)]).astype(np.float32)
        self.backend.upload(self.c_pair[2 * b:], cond)
        if self.variant.fused:
            self.backend.upload(self.c_fused[3 * b:], cond)
        self.backend.upload(self.w_text, np.concatenate([weights, np.repeat(weights[-1:], b - k)]).astype(np.float32))

    def __call__(self, images: list[np.ndarray], on_step: StepCallback | None = None,
                 text: tuple[np.ndarray, np.ndarray] | None = None) -> list[np.ndarray]:
        """uint8 [H, W, 3] images (at most B; fewer are padded) -> uint8 outputs. An image whose latents or pixels
        came out non-finite or degenerate is not returned: `DegenerateOutput` carries the batch's others.
        `on_step(done, total)` after each denoising step, where the backend runs the program op by op (a CUDA graph
        is one replay: no step to report). `text`: the batch's text rows (conditionings, weights), which a program
        built with text rows needs."""
        k = len(images)
        if not 1 <= k <= self.batch:
            raise ValueError(f"{k} images for a batch of {self.batch}")
        if self.text != (text is not None):
            raise ValueError("text rows are given exactly to a program built with them")
        if text is not None:
            if text[0].shape[0] != k:
                raise ValueError(f"text rows for {text[0].shape[0]} images, {k} given")
            self._upload_text(*text)
        x = np.stack([to_model_input(im) for im in images] + [to_model_input(images[-1])] * (self.batch - k))
        self.backend.upload(self.image_in, x)
        if on_step is not None and self.backend.reports_steps:
            start, ends = 0, [*self.plan.step_ends, len(self.plan.ops)]
            for done, end in enumerate(ends):
                self.backend.execute(self.plan.ops[start:end], key=(id(self), done))
                if done < len(self.plan.step_ends):
                    on_step(done + 1, len(self.plan.step_ends))
                start = end
        else:
            self.backend.execute(self.plan.ops, key=id(self))
        out = self.backend.download(self.image_out)
        problems = output_problems(self.backend.download(self.final_latents)[:k], out[:k])
        outputs = [None if i in problems else from_model_output(out[i]) for i in range(k)]
        if problems:
            raise DegenerateOutput(problems, outputs)
        return [o for o in outputs if o is not None]


# -- the program ---------------------------------------------------------------------------------------------------

def encode(s: CoupledScheduler, plan: Plan) -> None:
    """z0 = VAE encoder(image)."""
    plan.add(s.backend.call(graph_io.VAE_ENCODER, {graph_io.IMAGE: s.image_in, graph_io.LATENT: s.z0}))


def invert_exact(s: CoupledScheduler, plan: Plan) -> None:
    """DDIM inversion over ts ascending (paper eq. 5): e = UNet(z, t_j), then z_t(j) into zs[j]."""
    src = s.z0
    whole = full_calls(s.schedule.n, s.method.interval)
    for c, j in enumerate(reversed(range(s.schedule.n))):
        plan.add(s.routed_unet(plan, whole[c], src, j, s.c_null, s.eps1, s.deep_inv if s.cached else None))
        plan.add(s.backend.ddim(s.zs[j], src, s.eps1, s.coef_host[j], s.coefs[j]))
        plan.step_ends.append(len(plan.ops))
        src = s.zs[j]


def invert_single_pass(s: CoupledScheduler, plan: Plan) -> None:
    """Each step reuses the UNet evaluated at the previous latent and that latent's own timestep (z0 at t0); the
    evaluations at window steps are emit calls, which keep that step's Q/K for generation."""
    plan.add(s.unet(plan, graph_io.UNET, s.z0, s.schedule.n, s.c_null, s.eps1))
    src = s.z0
    for j in reversed(range(s.schedule.n)):
        plan.add(s.backend.ddim(s.zs[j], src, s.eps1, s.coef_host[j], s.coefs[j]))
        if j < s.window:
            plan.add(s.unet(plan, graph_io.UNET_EMIT, s.zs[j], j, s.c_null, s.eps1, s.qk[j]))
        elif j > 0:  # the last latent's evaluation would feed no step
            plan.add(s.unet(plan, graph_io.UNET, s.zs[j], j, s.c_null, s.eps1))
        plan.step_ends.append(len(plan.ops))
        src = s.zs[j]


TacPass = Callable[[CoupledScheduler, Plan, int, DeviceArray, bool], DeviceArray]


def tac_emit_inject(s: CoupledScheduler, plan: Plan, i: int, cur: DeviceArray, whole: bool) -> DeviceArray:
    """The cg pass on z_t(i) emits Q/K; the [neg, null] pass takes them in the null half."""
    plan.add(s.unet(plan, graph_io.UNET_EMIT, s.zs[i], i, s.c_null, s.eps1, s.qk[0]))
    plan.add(s.unet(plan, graph_io.UNET_INJECT, cur, i, s.c_pair, s.eps_pair, s.qk[0]))
    return s.eps_pair


def tac_fused(s: CoupledScheduler, plan: Plan, i: int, cur: DeviceArray, whole: bool) -> DeviceArray:
    """One routed UNet call on [z_t(i), zr, zr], the null third taking the cg third's Q/K inside the graph; eps of
    [neg, null] is its tail."""
    deep = s.deep_gen if s.cached else None
    plan.add(s.routed_unet(plan, whole, s.fused_in[i], i, s.c_fused, s.eps_fused, deep, src=s.routed))
    return s.eps_fused[s.batch:]


def tac_kept(s: CoupledScheduler, plan: Plan, i: int, cur: DeviceArray, whole: bool) -> DeviceArray:
    """Single-pass inversion already emitted step i's Q/K: the [neg, null] pass takes them."""
    plan.add(s.unet(plan, graph_io.UNET_INJECT, cur, i, s.c_pair, s.eps_pair, s.qk[i]))
    return s.eps_pair


def tac_pass(variant: Variant) -> TacPass:
    if variant.fused:
        return tac_fused
    return tac_kept if variant.inversion == "single-pass" else tac_emit_inject


def generate(s: CoupledScheduler, plan: Plan) -> None:
    """From zr = z_t(0): eps of [neg, null] (with text rows [neg, null, text]; TAC in the window), guidance (paper
    eq. 8; with text rows its second term) and the DDIM update, which writes every block of the next batch."""
    b, n = s.batch, s.schedule.n
    first = s.pair(0)
    for block in range(s.groups):
        plan.add(s.backend.copy(first[block * b : (block + 1) * b], s.zs[0]))
    controlled = tac_pass(s.variant)
    whole = full_calls(n, s.method.interval)
    for i in range(n):
        cur = s.pair(i)
        if i < s.window:
            eps = controlled(s, plan, i, cur, whole[i])
        else:  # with step caching, the guided batch's features are the tail of the fused step's
            plan.add(s.routed_unet(plan, whole[i], cur, i, s.c_pair, s.eps_pair, s.deep_gen[b:] if s.cached else None))
            eps = s.eps_pair
        if s.text:
            plan.add(s.backend.guided_text(s.pair(i + 1), cur[:b], eps, s.coef_host[n + i], s.coefs[n + i],
                                           s.w_text))
        else:
            plan.add(s.backend.guided(s.pair(i + 1), cur[:b], eps, s.coef_host[n + i], s.coefs[n + i]))
        plan.step_ends.append(len(plan.ops))


def decode(s: CoupledScheduler, plan: Plan) -> None:
    """image = VAE decoder(zr) of the last step's batch."""
    final = s.pair(s.schedule.n)[:s.batch]
    plan.add(s.backend.call(graph_io.VAE_DECODER, {graph_io.LATENT: final, graph_io.IMAGE: s.image_out}))


INVERT = {"exact": invert_exact, "single-pass": invert_single_pass}


def build_program(s: CoupledScheduler) -> Plan:
    """The whole batch program, stage by stage."""
    plan = Plan()
    for stage, fn in zip(STAGES, (encode, INVERT[s.variant.inversion], generate, decode), strict=True):
        start = len(plan.ops)
        fn(s, plan)
        plan.stages[stage] = slice(start, len(plan.ops))
    return plan
