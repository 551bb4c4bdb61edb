"""Tokenizer + generator + sampler → PIL images, as one callable.

``varkit.load_pipeline("digits")`` (a bundled model) or ``load_pipeline(DIR)`` (a folder
written by :meth:`Pipeline.save_pretrained` or ``varkit convert``). A pipeline folder holds
``config.json`` (the model's default sampling settings) and the subfolders ``tokenizer/``
and ``generator/``, each a ``config.json`` + ``model.safetensors``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .device import DTYPES, resolve_device, resolve_dtype
from .errors import CheckpointError, InvalidArgumentError, ModelNotFoundError, NumericalError
from .hub import ASSETS, bundled_models, resolve_model_dir  # noqa: F401  (ASSETS, bundled_models re-exported)
from .io import write_json
from .modeling import load_module, read_config
from .models.base import check_tokenizer_family
from .samplers import SamplerStats, SamplingParams, get_sampler
from .samplers.random import image_generators

SAMPLING_KEYS = ("cfg", "cfg_schedule", "temperature", "top_k", "top_p", "head_steps", "num_iter", "guidance_interval")
DEFAULT_SAMPLING = {"cfg": 1.0, "cfg_schedule": "constant", "temperature": 1.0, "top_k": None, "top_p": None,
                    "head_steps": None, "num_iter": None, "guidance_interval": None}


OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class PipelineOutput:
    """``images``: by the call's ``output_type`` (diffusers' convention): ``"pil"`` a list of PIL images
    (8-bit), ``"np"`` a float32 array (B, H, W, C) in [0, 1], ``"pt"`` a float32 tensor (B, C, H, W) in
    [0, 1] on the pipeline's device (both as decoded, clamped, not quantised to 8 bits)."""

    images: Any
    tokens: torch.Tensor  # (B, N) ids, or (B, N, D) continuous tokens, in the generator's layout order
    stats: SamplerStats


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, C, H, W) in [-1, 1] → PIL images (RGB, or L for one channel)."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    arr = arr.permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


class Pipeline:
    """A tokenizer, a generator and the model's default sampling settings."""

    def __init__(self, tokenizer, generator, defaults: dict[str, Any] | None = None, name: str = "",
                 presets: dict[str, dict[str, Any]] | None = None):
        self.tokenizer = tokenizer.eval()
        self.generator = generator.eval()
        check_tokenizer_family(generator, tokenizer)  # a VAR generator over a single-map VQ, ...: now, not after sampling
        generator.head.check_tokenizer(tokenizer)
        generator.bind_tokenizer(tokenizer)
        self.defaults = {**DEFAULT_SAMPLING, **(defaults or {})}
        self.presets = _check_presets(presets)
        self.name = name

    @property
    def num_classes(self) -> int:
        return self.generator.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    def to(self, *args: str | torch.device | torch.dtype | int | None, device: str | torch.device | None = None,
           dtype: str | torch.dtype | None = None) -> "Pipeline":
        """Move and/or cast, diffusers-style; returns the pipeline: ``pipe.to("cuda")``, ``pipe.to(torch.bfloat16)``,
        ``pipe.to("cuda", torch.bfloat16)``, ``pipe.to(device=..., dtype=...)``. A device is "cpu", "cuda",
        "cuda:N", N or "auto" (CUDA if present); a dtype a ``torch.dtype``, a name ("bfloat16", "fp32"...) or
        "auto" (given second). ``dtype`` applies to the generator (the tokenizer stays fp32); what is not
        given stays as it is."""
        for a in args:
            is_dtype = isinstance(a, torch.dtype) or (isinstance(a, str) and (
                a.lower() in DTYPES or (a.lower() == "auto" and device is not None)))
            if a is None:
                continue
            if is_dtype and dtype is None:
                dtype = a
            elif not is_dtype and device is None and (isinstance(a, (str, torch.device)) or (
                    isinstance(a, int) and not isinstance(a, bool))):
                device = f"cuda:{a}" if isinstance(a, int) else a
            else:
                raise InvalidArgumentError(
                    f"pipe.to() takes one device ('cpu', 'cuda', 'cuda:N', 'auto') and one dtype (torch.bfloat16, "
                    f"'float32', ...), got {a!r} in {args!r}")
        if device is not None and not isinstance(device, (str, torch.device)):
            raise InvalidArgumentError(f"device must be a string or torch.device ('cpu', 'cuda', 'auto'), got {device!r}")
        dev = resolve_device(device) if device is not None else self.device
        self.tokenizer.to(dev)
        self.generator.to(dev)
        # "auto": the dtype this device runs this generator fastest (varkit.device.auto_dtype)
        dt = resolve_dtype(dtype, dev, self.generator)
        if dt is not None:
            self.generator.to(dt)
        return self

    def compile(self, max_autotune: bool = True, inductor: bool | None = None) -> "Pipeline":
        """Decode through the generator's compiled step (opt-in, see ``compile_decoding``); returns ``self``.

        On a CPU the first image compiles (tens of seconds for GPT-B); on a GPU the steps are captured into CUDA
        graphs on the first image (under a second), or with ``inductor=True`` into CUDA graphs of inductor's
        fused kernels (GPT-B on an H200: 0.65 vs 1.2 ms a step, after a 22 s compile). Later images run faster.
        Call it after :meth:`to`: moving the generator drops the compiled step.
        """
        self.generator.compile_decoding(max_autotune, inductor)
        return self

    def prepack(self, enabled: bool | str = True) -> "Pipeline":
        """Run the generator's CPU inference GEMMs on weights packed once for oneDNN; returns ``self``.

        1.1-2x faster GEMMs at decode shapes (AMX in bf16; 1.7x in fp32 on AMD CPUs, where MKL is slow), for one
        more copy of the packed weights in memory (+1.2 GB for VAR-d16 in fp32). ``"auto"`` (what
        :func:`load_pipeline` does by default): on a CPU, the weights of at least
        :data:`~varkit.nn.layers.AUTO_PREPACK_MIN_NUMEL` elements, when their copy takes at most a quarter of the
        memory available and this machine's ``varkit bench floor`` (if measured) did not find the packed GEMM
        slower at decode shapes; off otherwise. See :func:`varkit.nn.layers.prepack_linears`.
        """
        from .nn.layers import AUTO_PREPACK_MIN_NUMEL, prepack_linears

        if isinstance(enabled, bool):
            prepack_linears(self.generator, enabled)
        elif enabled == "auto":
            min_numel = AUTO_PREPACK_MIN_NUMEL
            prepack_linears(self.generator, auto_prepack(self.generator, min_numel), min_numel)
        else:
            raise InvalidArgumentError(f"prepack must be True, False or 'auto', got {enabled!r}")
        return self

    def fast_tokenizer(self, enabled: bool = True) -> "Pipeline":
        """Decode images with the extension's CPU kernels (what :func:`load_pipeline` does on a CPU); returns ``self``.

        3x3 convolutions as Winograd F(4x4, 3x3) and fused GroupNorm + SiLU in the tokenizer's LDM decoder
        (:func:`varkit.nn.ldm.use_fast_kernels`): VAR's VQVAE decoder 2.75 -> 1.5 s an image on one Xeon core, outputs
        within ~1e-5 of torch's relative to their scale (an 8-bit image level is 8e-3). ``False``: torch's
        convolutions, equal to the official tokenizers' outputs to the last bits.
        """
        from .nn.ldm import use_fast_kernels

        use_fast_kernels(self.tokenizer, enabled)
        return self

    def settings(self, preset: str | None = None) -> dict[str, Any]:
        """The defaults (a converted model's: its paper's FID protocol) with the named ``preset`` on top
        (e.g. ``"demo"``: the official demo script's settings)."""
        if preset is None:
            return dict(self.defaults)
        if preset not in self.presets:
            have = ", ".join(sorted(self.presets)) or "none"
            raise InvalidArgumentError(f"{self.name or 'this model'} has no preset {preset!r} (presets: {have})")
        return {**self.defaults, **self.presets[preset]}

    def sampling_params(self, preset: str | None = None, **overrides: Any) -> SamplingParams:
        """The model's defaults (then ``preset``) with every non-None override applied."""
        base = self.settings(preset)
        values = {k: base.get(k) for k in SAMPLING_KEYS}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**values)

    def sampler_choice(self, sampler: str | None, preset: str | None = None,
                       options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """(sampler name, options): ``sampler`` or the folder's default sampler (else ``"ancestral"``); the
        folder's stored ``sampler_options`` apply, under ``options``, when its default sampler is the one used."""
        base = self.settings(preset)
        default = base.get("sampler") or "ancestral"
        name = sampler or default
        stored = dict(base.get("sampler_options") or {}) if name == default else {}
        return name, {**stored, **(options or {})}

    def __call__(
        self,
        class_labels: Sequence[int] | torch.Tensor | None = None,
        *,
        captions: torch.Tensor | None = None,
        sampler: str | None = None,
        cfg: float | None = None,
        cfg_schedule: str | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        head_steps: int | None = None,
        num_iter: int | None = None,
        guidance_interval: float | None = None,
        preset: str | None = None,
        image_size: int | None = None,
        seed: int = 0,
        image_seeds: Sequence[int] | None = None,
        batch_size: int | None = None,
        output_type: str = "pil",
        progress: bool = False,
        **sampler_options: Any,
    ) -> PipelineOutput:
        """Generate one image per class label (or per caption-embedding row).

        Image i draws its randomness from its own generator seeded from ``(seed, i)`` (or
        ``image_seeds[i]``), so it is the same whatever the batch size. ``sampler_options``
        go to the sampler (e.g. ``window=16`` for SJD). Continuous-token models (MAR) also take
        ``head_steps`` (denoising steps per token) and ``num_iter`` (decoding steps of a ``sets``
        layout); their ``temperature`` scales the head's per-step noise. Flow heads (FlowAR) take
        ``head_steps`` (Euler steps per scale) and ``guidance_interval`` (CFG only while t <= it).
        Unset settings come from ``pipe.defaults`` (a converted model's paper FID protocol) or, with
        ``preset="demo"``, from the official demo's settings. ``image_size`` resizes the decoded images
        (bicubic, before quantisation to 8 bits, as the papers' evaluation scripts do: LlamaGen's 384 px
        models are evaluated at 256). ``sampler`` None: the folder's default sampler (its ``defaults``
        entry ``"sampler"``, e.g. ``"distilled"`` for a DD student, with ``"sampler_options"`` under the
        caller's), else ``"ancestral"``. ``output_type``: "pil" (default), "np" or "pt" (see
        :class:`PipelineOutput`). Every argument is checked before any sampling; the outputs' finiteness
        once per batch (:class:`~varkit.errors.NumericalError`: corrupt weights, or settings that overflow).
        """
        if output_type not in OUTPUT_TYPES:
            raise InvalidArgumentError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                                       or batch_size < 1):
            raise InvalidArgumentError(f"batch_size must be an integer >= 1 (or None: all at once), got {batch_size!r}")
        cond = self._conditions(class_labels, captions)
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
            raise InvalidArgumentError(f"image_size must be a positive integer (pixels), got {image_size!r}")
        params = self.sampling_params(preset=preset, cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature, top_k=top_k,
                                      top_p=top_p, head_steps=head_steps, num_iter=num_iter,
                                      guidance_interval=guidance_interval)
        sampler, sampler_options = self.sampler_choice(sampler, preset, sampler_options)
        smp = get_sampler(sampler, params, **sampler_options)
        if hasattr(smp, "bind_tokenizer"):  # samplers that need the tokenizer (LANTERN's codebook, drafter checks)
            smp.bind_tokenizer(self.tokenizer)
        gens = image_generators(seed, cond.shape[0], list(image_seeds) if image_seeds is not None else None)
        N = cond.shape[0]
        bs = batch_size or N
        # speculative samplers keep bs slots over all the images (continuous batching); the rest take bs at a time
        if bs < N and smp.continuous_for(self.generator):
            runs = [(cond, gens, bs)]
        else:
            runs = [(cond[i:i + bs], gens[i:i + bs], None) for i in range(0, N, bs)]
        images, tokens, stats = [], [], None
        for run_cond, run_gens, max_batch in runs:
            res = smp.sample(self.generator, run_cond, run_gens, progress=progress, max_batch=max_batch)
            tokens.append(res.tokens)
            for i in range(0, res.tokens.shape[0], bs):
                batch = self.decode_images(res.tokens[i:i + bs], image_size)
                if not bool(torch.isfinite(batch).all()):
                    raise NumericalError(
                        f"{self.name or 'the model'} produced non-finite images (NaN or inf): its weights may be corrupt "
                        f"(re-save or re-convert it), or a setting overflows (cfg {params.cfg}, temperature {params.temperature})")
                images.append(batch if output_type == "pt" else batch.cpu())
            stats = res.stats if stats is None else stats.merge(res.stats)
        return PipelineOutput(_as_output(images, output_type), torch.cat(tokens), stats)

    @torch.inference_mode()
    def decode_images(self, tokens: torch.Tensor, image_size: int | None = None) -> torch.Tensor:
        """Layout-order tokens (ids (B, N) or latents (B, N, D)) → the tokenizer's float images (B, C, H, W),
        about [-1, 1], resized to ``image_size`` (bicubic) when given."""
        ids = self.generator.layout.to_tokenizer_ids(tokens)
        images = self.tokenizer.decode(ids)
        if image_size is not None and tuple(images.shape[-2:]) != (image_size, image_size):
            images = torch.nn.functional.interpolate(images.float(), size=(image_size, image_size), mode="bicubic")
        return images

    def decode(self, tokens: torch.Tensor, image_size: int | None = None) -> list[Image.Image]:
        """:meth:`decode_images` as PIL images (8-bit)."""
        return to_pil(self.decode_images(tokens, image_size))

    def _conditions(self, class_labels, captions) -> torch.Tensor:
        dev = self.device
        if captions is not None:
            if class_labels is not None:
                raise InvalidArgumentError("pass class_labels or captions, not both")
            if not getattr(self.generator, "is_text_conditional", False):
                raise InvalidArgumentError(
                    f"{self.name or 'this model'} is class-conditional ({self.num_classes} classes): pass class_labels "
                    "(class ids), not captions")
            caps = captions if isinstance(captions, torch.Tensor) else None
            dim = getattr(self.generator.config, "caption_dim", None)
            if caps is None or not caps.is_floating_point() or caps.dim() != 3 or (dim and caps.shape[-1] != dim):
                got = f"a {tuple(caps.shape)} {caps.dtype} tensor" if caps is not None else type(captions).__name__
                raise InvalidArgumentError(f"captions must be a float tensor (B, T, {dim or 'D'}) of caption "
                                           f"embeddings, got {got}")
            return caps.to(dev)
        if class_labels is None:
            raise InvalidArgumentError("pass class_labels (class ids) or captions (caption embeddings)")
        return class_ids(class_labels, self.num_classes, dev)

    # -- persistence -----------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``tokenizer/``, ``generator/`` and the pipeline ``config.json`` (last, atomically)."""
        directory = Path(directory)
        self.tokenizer.save_pretrained(directory / "tokenizer")
        self.generator.save_pretrained(directory / "generator")
        cfg = {"_class": "Pipeline", "name": self.name, "defaults": self.defaults}
        if self.presets:
            cfg["presets"] = self.presets
        write_json(directory / "config.json", cfg)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Pipeline":
        directory = Path(directory)
        cfg = read_config(directory)
        if cfg.get("_class") != "Pipeline":
            raise ModelNotFoundError(
                f"{directory} is not a varkit pipeline folder (its config.json has no pipeline entry); "
                "it needs config.json, tokenizer/ and generator/"
            )
        defaults = cfg.get("defaults")
        if defaults is not None and not isinstance(defaults, dict):
            raise CheckpointError(f"{directory / 'config.json'}: 'defaults' must be an object of sampling settings, "
                                  f"not a {type(defaults).__name__}")
        try:
            SamplingParams(**{k: defaults[k] for k in SAMPLING_KEYS if (defaults or {}).get(k) is not None})
        except InvalidArgumentError as exc:
            raise CheckpointError(f"{directory / 'config.json'}: a stored default is invalid: {exc}") from None
        return cls(load_module(directory / "tokenizer"), load_module(directory / "generator"),
                   defaults, cfg.get("name") or directory.name, cfg.get("presets"))


def class_ids(labels: Any, num_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Class ids (N,) long from a sequence of integers or an integer tensor; a one-line error for floats (1.7
    is never truncated to 1), bools, None, strings, and ids outside 0..num_classes-1 (2**63 included)."""
    if isinstance(labels, torch.Tensor):
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise InvalidArgumentError(f"class ids must be integers, got a {labels.dtype} tensor")
        ids = labels.reshape(-1).to(torch.long)
    else:
        items = [labels] if isinstance(labels, numbers.Number) else labels
        try:
            items = list(items)
        except TypeError:
            raise InvalidArgumentError(f"class_labels must be class ids (a list of integers), got {labels!r}") from None
        for x in items:
            if isinstance(x, bool) or not isinstance(x, numbers.Integral):
                raise InvalidArgumentError(f"class id {x!r} is not an integer: pass integer class ids")
            if not 0 <= int(x) < num_classes:
                raise InvalidArgumentError(f"class id {int(x)} is out of range: this model has classes 0..{num_classes - 1}")
        ids = torch.tensor([int(x) for x in items], dtype=torch.long)
    if ids.numel() == 0:
        raise InvalidArgumentError("class_labels is empty: pass at least one class id")
    bad = (ids < 0) | (ids >= num_classes)
    if bool(bad.any()):
        raise InvalidArgumentError(f"class id {int(ids[bad][0])} is out of range: this model has classes 0..{num_classes - 1}")
    return ids.to(device)


def _as_output(batches: list[torch.Tensor], output_type: str):
    """Decoded float batches in [-1, 1] → what ``output_type`` asks for (see :class:`PipelineOutput`)."""
    if output_type == "pil":
        return [im for b in batches for im in to_pil(b)]
    x = ((torch.cat(batches).float().clamp(-1, 1) + 1) / 2)
    return x if output_type == "pt" else x.permute(0, 2, 3, 1).numpy()


def _check_presets(presets) -> dict[str, dict[str, Any]]:
    """Named overrides of the defaults (``{"demo": {"cfg": 4.0, "top_k": 2000}}``), checked once at load."""
    if presets is None:
        return {}
    if not isinstance(presets, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in presets.items()):
        raise InvalidArgumentError(f"presets must map names to settings dicts, got {presets!r}")
    return {k: dict(v) for k, v in presets.items()}


def load_pipeline(name_or_dir: str | Path, device: str | torch.device | None = "cpu",
                  dtype: str | torch.dtype | None = None, compile: bool = False,
                  prepack: bool | str = "auto", fast_tokenizer: bool = True) -> Pipeline:
    """A bundled model by name (see :func:`bundled_models`) or a pipeline folder; offline.

    ``compile``: decode through the generator's compiled step (:meth:`Pipeline.compile`).
    ``prepack``: CPU inference GEMMs on prepacked weights (:meth:`Pipeline.prepack`): ``"auto"`` (default) where
    it pays (large weights on a CPU, memory to spare; never under ``compile``, whose graphs pack their own),
    True or False. ``fast_tokenizer``: on a CPU, decode images with the extension's kernels
    (:meth:`Pipeline.fast_tokenizer`: Winograd convolutions, ~1.8x faster on VAR's decoder, within ~1e-5 of torch's); False keeps
    torch's, equal to the official tokenizers.

    On a CPU, large tensors then come from varkit's caching allocator (:mod:`varkit.nn.cpu_allocator`: no page
    faults for the decoder's feature maps on every image; ``VARKIT_CPU_CACHE_MB=0`` turns it off).
    """
    pipe = Pipeline.from_pretrained(resolve_model_dir(name_or_dir)).to(device if device is not None else "auto", dtype)
    if pipe.device.type == "cpu":
        from .nn import cpu_allocator

        cpu_allocator.install()
        pipe.fast_tokenizer(fast_tokenizer)
    if prepack == "auto" and compile:
        prepack = False
    if prepack is not False:
        pipe.prepack(prepack)
    return pipe.compile() if compile else pipe


def _available_memory_bytes() -> int | None:
    """MemAvailable of ``/proc/meminfo`` (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def auto_prepack(generator: torch.nn.Module, min_numel: int, available: int | None = None,
                 floor: dict | None = None) -> bool:
    """Whether ``prepack="auto"`` packs ``generator``'s large linear weights: on a CPU, when their extra copy
    takes at most a quarter of the ``available`` memory, and unless ``floor`` (default: this machine's cached
    ``varkit bench floor``) measured the packed GEMM slower than the best other path at decode shapes in the
    generator's dtype."""
    from .nn.layers import Linear

    p = next(generator.parameters(), None)
    if p is None or p.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    nbytes = sum(m.weight.numel() * m.weight.element_size() for m in generator.modules()
                 if isinstance(m, Linear) and m.weight.numel() >= min_numel)
    if nbytes == 0:
        return False
    available = _available_memory_bytes() if available is None else available
    if available is not None and nbytes > available // 4:
        return False
    if floor is None:
        from .bench.floor import cached_floor

        floor = cached_floor()
    from .bench.floor import path_gain

    gain = path_gain(floor, str(p.dtype).replace("torch.", ""), "prepacked")
    return gain is None or gain >= 1.0


def image_grid(images: Sequence[Image.Image], cols: int, gutter: int = 2, labels: Sequence[str] | None = None,
               background: int = 255) -> Image.Image:
    """Tile images row-major into one RGB grid (torchvision's ``make_grid``) with ``gutter`` pixels of
    ``background`` grey between and around them; ``labels`` (one string per image, e.g. its class) are
    written in a band under each image."""
    images = list(images)
    if not images:
        raise InvalidArgumentError("image_grid: no images to tile")
    if isinstance(cols, bool) or not isinstance(cols, int) or cols < 1:
        raise InvalidArgumentError(f"image_grid: cols must be an integer >= 1, got {cols!r}")
    if isinstance(gutter, bool) or not isinstance(gutter, int) or gutter < 0:
        raise InvalidArgumentError(f"image_grid: gutter must be an integer >= 0 (pixels), got {gutter!r}")
    if len({im.size for im in images}) > 1:
        raise InvalidArgumentError(f"image_grid: images of different sizes {sorted({im.size for im in images})[:3]}")
    if labels is not None and len(labels) != len(images):
        raise InvalidArgumentError(f"image_grid: {len(labels)} labels for {len(images)} images")
    tiles = [im.convert("RGB") for im in images]
    if labels is not None:
        tiles = [_labelled(im, str(t), background) for im, t in zip(tiles, labels)]
    return Image.fromarray(_make_grid([np.asarray(t) for t in tiles], cols, gutter, background))


def _make_grid(tiles: list[np.ndarray], cols: int, gutter: int, background: int) -> np.ndarray:
    """torchvision's ``make_grid(x, nrow=cols, padding=gutter, pad_value=background / 255)`` on uint8 HxWx3 tiles,
    pixel for pixel (one tile alone is returned as is, as there), without importing torchvision (seconds of
    start-up for ``varkit generate``). Tiles of different sizes (labels of different heights) sit at the top left
    of cells of the largest size."""
    if len(tiles) == 1:
        return tiles[0]
    h, w = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    cols = min(cols, len(tiles))
    rows = -(-len(tiles) // cols)
    grid = np.full((rows * (h + gutter) + gutter, cols * (w + gutter) + gutter, 3), background, dtype=np.uint8)
    for k, t in enumerate(tiles):
        y, x = divmod(k, cols)
        top, left = y * (h + gutter) + gutter, x * (w + gutter) + gutter
        grid[top:top + t.shape[0], left:left + t.shape[1]] = t
    return grid


def _labelled(image: Image.Image, text: str, background: int) -> Image.Image:
    """``image`` with a band below it holding ``text`` (PIL's default font), left-aligned."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    left, top, right, bottom = ImageDraw.Draw(image).textbbox((0, 0), text, font=font)
    out = Image.new("RGB", (image.width, image.height + bottom - top + 4), (background,) * 3)
    out.paste(image, (0, 0))
    ImageDraw.Draw(out).text((2 - left, image.height + 2 - top), text, fill=(255 - background,) * 3, font=font)
    return out
