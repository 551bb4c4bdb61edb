"""Tokenizer + generator + sampler → PIL images, as one callable.

``varkit.load_pipeline("digits")`` (a bundled model) or ``load_pipeline(DIR)`` (a folder
written by :meth:`Pipeline.save_pretrained` or ``varkit convert``). A pipeline folder holds
``config.json`` (the model's default sampling settings) and the subfolders ``tokenizer/``
and ``generator/``, each a ``config.json`` + ``model.safetensors``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from .device import resolve_device, resolve_dtype
from .errors import InvalidArgumentError, ModelNotFoundError
from .hub import ASSETS, bundled_models, resolve_model_dir  # noqa: F401  (ASSETS, bundled_models re-exported)
from .io import write_json
from .modeling import load_module, read_config
from .samplers import SamplerStats, SamplingParams, get_sampler
from .samplers.random import image_generators

SAMPLING_KEYS = ("cfg", "cfg_schedule", "temperature", "top_k", "top_p", "head_steps", "num_iter", "guidance_interval")
DEFAULT_SAMPLING = {"cfg": 1.0, "cfg_schedule": "constant", "temperature": 1.0, "top_k": None, "top_p": None,
                    "head_steps": None, "num_iter": None, "guidance_interval": None}


@dataclass
class PipelineOutput:
    images: list[Image.Image]
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

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> "Pipeline":
        """Move to ``device``; ``dtype`` applies to the generator (the tokenizer stays fp32)."""
        dev = resolve_device(device)
        self.tokenizer.to(dev)
        self.generator.to(dev)
        dt = resolve_dtype(dtype, dev)  # "auto": the dtype this device runs fastest (varkit.device.auto_dtype)
        if dt is not None:
            self.generator.to(dt)
        return self

    def compile(self, max_autotune: bool = True) -> "Pipeline":
        """Decode through the generator's compiled step (opt-in, see ``compile_decoding``); returns ``self``.

        The first image compiles (tens of seconds for GPT-B); later ones run faster. Call it after
        :meth:`to`: moving the generator drops the compiled step.
        """
        self.generator.compile_decoding(max_autotune)
        return self

    def prepack(self, enabled: bool = True) -> "Pipeline":
        """Run the generator's CPU inference GEMMs on weights packed once for oneDNN (opt-in); returns ``self``.

        1.1-2x faster GEMMs at decode shapes (AMX in bf16), for one more copy of the generator's linear
        weights in memory (+1.2 GB for VAR-d16 in fp32). See :func:`varkit.nn.layers.prepack_linears`.
        """
        from .nn.layers import prepack_linears

        prepack_linears(self.generator, enabled)
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
        caller's), else ``"ancestral"``.
        """
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
        bs = batch_size or cond.shape[0]
        if bs < 1:
            raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
        images, tokens, stats = [], [], None
        for i in range(0, cond.shape[0], bs):
            res = smp.sample(self.generator, cond[i:i + bs], gens[i:i + bs], progress=progress)
            tokens.append(res.tokens)
            images += self.decode(res.tokens, image_size)
            stats = res.stats if stats is None else stats.merge(res.stats)
        return PipelineOutput(images, torch.cat(tokens), stats)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, image_size: int | None = None) -> list[Image.Image]:
        """Layout-order tokens (ids (B, N) or latents (B, N, D)) → PIL images through the tokenizer,
        resized to ``image_size`` (bicubic on the decoder's float output) when given."""
        ids = self.generator.layout.to_tokenizer_ids(tokens)
        images = self.tokenizer.decode(ids)
        if image_size is not None and tuple(images.shape[-2:]) != (image_size, image_size):
            images = torch.nn.functional.interpolate(images.float(), size=(image_size, image_size), mode="bicubic")
        return to_pil(images)

    def _conditions(self, class_labels, captions) -> torch.Tensor:
        dev = self.device
        if captions is not None:
            return torch.as_tensor(captions, device=dev)
        if class_labels is None:
            raise InvalidArgumentError("pass class_labels (class ids) or captions (caption embeddings)")
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=dev).reshape(-1)
        if labels.numel() == 0:
            raise InvalidArgumentError("class_labels is empty: pass at least one class id")
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            raise InvalidArgumentError(
                f"class id {int(labels[bad][0])} is out of range: this model has classes 0..{self.num_classes - 1}"
            )
        return labels

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
        return cls(load_module(directory / "tokenizer"), load_module(directory / "generator"),
                   cfg.get("defaults"), cfg.get("name") or directory.name, cfg.get("presets"))


def _check_presets(presets) -> dict[str, dict[str, Any]]:
    """Named overrides of the defaults (``{"demo": {"cfg": 4.0, "top_k": 2000}}``), checked once at load."""
    if presets is None:
        return {}
    if not isinstance(presets, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in presets.items()):
        raise InvalidArgumentError(f"presets must map names to settings dicts, got {presets!r}")
    return {k: dict(v) for k, v in presets.items()}


def load_pipeline(name_or_dir: str | Path, device: str | torch.device | None = "cpu",
                  dtype: str | torch.dtype | None = None, compile: bool = False,
                  prepack: bool = False) -> Pipeline:
    """A bundled model by name (see :func:`bundled_models`) or a pipeline folder; offline.

    ``compile``: decode through the generator's compiled step (:meth:`Pipeline.compile`).
    ``prepack``: CPU inference GEMMs on prepacked weights (:meth:`Pipeline.prepack`).
    """
    pipe = Pipeline.from_pretrained(resolve_model_dir(name_or_dir)).to(device, dtype)
    if prepack:
        pipe.prepack()
    return pipe.compile() if compile else pipe


def image_grid(images: list[Image.Image], cols: int) -> Image.Image:
    """Tile images into one grid image, row-major."""
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new(images[0].mode, (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid
