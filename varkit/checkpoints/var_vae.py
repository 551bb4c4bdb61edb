"""Load and convert VAR's multi-scale VQVAE (``vae_ch160v4096z32.pth``, FoundationVision/VAR).

The published file is a raw ``state_dict`` of VAR's ``VQVAE`` (taming/LDM key names, fused ``qkv`` 1x1
conv in the attention blocks, buffer ``quantize.ema_vocab_hit_SV``). varkit hosts it on diffusers'
``Encoder``/``Decoder`` plus its own quantiser (:class:`~varkit.tokenizers.msvq.MultiScaleVQTokenizer`);
the mapping below is exact (only renames, the ``qkv`` split into ``to_q/to_k/to_v`` and 1x1 conv ->
linear reshapes), and :func:`msvq_state_dict_to_var` inverts it.
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ..errors import CheckpointError, InvalidArgumentError
from ..io import load_torch_checkpoint
from ..modeling import load_state_dict_strict
from ..tokenizers.msvq import VAR_PATCH_NUMS, MSVQConfig, MultiScaleVQTokenizer

__all__ = [
    "is_var_vae_state_dict",
    "msvq_config_from_var_state_dict",
    "msvq_state_dict_from_var",
    "msvq_state_dict_to_var",
    "load_var_vae",
]

_REQUIRED = ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight",
             "decoder.conv_out.weight", "quantize.embedding.weight", "quant_conv.weight", "post_quant_conv.weight")
_EMA = "quantize.ema_vocab_hit_SV"


def is_var_vae_state_dict(sd: Mapping[str, object]) -> bool:
    """True when ``sd`` has the keys of VAR's VQVAE."""
    return (all(k in sd for k in _REQUIRED) and "encoder.down.0.block.0.conv1.weight" in sd
            and "decoder.up.0.block.0.conv1.weight" in sd)


def _describe(sd: Mapping[str, object]) -> str:
    keys = list(sd)
    if any(k.startswith("encoder.conv_blocks.") for k in keys) or "quantize.codebook_used" in sd:
        return "it looks like a LlamaGen VQ tokenizer (load it with varkit.checkpoints.llamagen)"
    if "class_emb.weight" in sd and any(k.startswith("blocks.") for k in keys):
        return "it looks like a VAR transformer (var_d*.pth), not the VQVAE (vae_ch160v4096z32.pth)"
    if any(k.startswith("encoder.down_blocks.") for k in keys):
        return "it looks like a diffusers/varkit-format autoencoder, which needs no conversion"
    if any(k.startswith("encoder.") for k in keys) and "quantize.embedding.weight" not in sd:
        return "it has an encoder but no VQ codebook (a KL-VAE?)"
    return f"its first keys are {keys[:4]}"


def _unwrap(obj: object, path: str) -> dict:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict; expected VAR's VQVAE "
                              "weights (vae_ch160v4096z32.pth)")
    if is_var_vae_state_dict(obj):
        return dict(obj)
    # VAR training checkpoints: {'trainer': {'vae_local': sd, ...}, ...}; other common wrappers.
    for outer in ("trainer", None):
        inner = obj.get(outer) if outer else obj
        if isinstance(inner, Mapping):
            for key in ("vae_local", "vae", "model", "state_dict", "module"):
                cand = inner.get(key)
                if isinstance(cand, Mapping) and is_var_vae_state_dict(cand):
                    return dict(cand)
    shown = obj.get("model") if isinstance(obj.get("model"), Mapping) else obj
    raise CheckpointError(f"{path} is not VAR's multi-scale VQVAE: {_describe(shown)}. Expected the raw "
                          "state_dict of vae_ch160v4096z32.pth from huggingface.co/FoundationVision/var")


def _levels(sd: Mapping[str, Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    return max(found) + 1 if found else 0


def msvq_config_from_var_state_dict(sd: Mapping[str, Tensor], patch_nums: Sequence[int] | None = None) -> MSVQConfig:
    """The :class:`MSVQConfig` matching a VAR VQVAE state_dict.

    Shapes give every size; what a file cannot tell is taken from VAR's code: ``quant_resi=0.5``,
    ``beta=0.25``, 32 norm groups. ``patch_nums`` defaults to VAR's 256px schedule when the file's
    ``ema_vocab_hit_SV`` has 10 rows (the 512px VAR models reuse the same file with another schedule:
    pass it, or use ``load_var_vae(..., resolution=512)``).
    """
    if not is_var_vae_state_dict(sd):
        raise CheckpointError(f"not a VAR VQVAE state_dict: {_describe(sd)}")
    ch = int(sd["encoder.conv_in.weight"].shape[0])
    in_channels = int(sd["encoder.conv_in.weight"].shape[1])
    n_levels = _levels(sd, "encoder.down.")
    ch_mult = tuple(int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) // ch for i in range(n_levels))
    num_res_blocks = _levels(sd, "encoder.down.0.block.")
    z = int(sd["encoder.conv_out.weight"].shape[0])
    V = int(sd["quantize.embedding.weight"].shape[0])
    if int(sd["quantize.embedding.weight"].shape[1]) != z:
        raise CheckpointError("VAR VQVAE codebook dimension differs from z_channels; the file is corrupt")
    if any(k.startswith("quantize.quant_resi.qresi_ls.") for k in sd):
        share, num_phi, resi = _levels(sd, "quantize.quant_resi.qresi_ls."), 0, 0.5
    elif "quantize.quant_resi.qresi.weight" in sd:
        share, num_phi, resi = 1, 0, 0.5
    elif any(re.match(r"quantize\.quant_resi\.\d+\.weight", k) for k in sd):
        share, num_phi, resi = 0, _levels(sd, "quantize.quant_resi."), 0.5
    else:
        share, num_phi, resi = 4, 0, 0.0            # every Phi was the identity
    if patch_nums is None:
        n_scales = int(sd[_EMA].shape[0]) if _EMA in sd else 10
        if n_scales != 10:
            raise InvalidArgumentError(
                f"this VAR VQVAE was trained with {n_scales} scales; pass patch_nums (the scale schedule)")
        patch_nums = VAR_PATCH_NUMS[256]
    if share == 0 and num_phi == len(patch_nums):
        num_phi = 0
    return MSVQConfig(
        in_channels=in_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z,
        codebook_size=V, patch_nums=tuple(int(p) for p in patch_nums), quant_resi=resi,
        share_quant_resi=share, num_phi=num_phi, quant_conv_ks=int(sd["quant_conv.weight"].shape[-1]),
        using_sa=f"encoder.down.{n_levels - 1}.attn.0.qkv.weight" in sd,
        using_mid_sa="encoder.mid.attn_1.qkv.weight" in sd,
    )


# -- key mapping ---------------------------------------------------------------------------------
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}


def ldm_prefix_to_diffusers(k: str, n_levels: int) -> tuple[str, str] | None:
    """Map an LDM autoencoder module prefix (without the final param name; VAR's VQVAE and MAR's KL-16 both
    use LDM's names) to diffusers'; (kind, new_prefix) with kind "plain" or "attn" (an attention module, whose
    parts the caller maps), None for anything else (a quantizer, an unknown resnet part)."""
    m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)", k)
    if m:
        name = {"norm_out": "conv_norm_out"}.get(m.group(2), m.group(2))
        return "plain", f"{m.group(1)}.{name}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.(block_1|block_2)\.(\w+)", k)
    if m:
        sub = _RESNET.get(m.group(3))
        return None if sub is None else ("plain", f"{m.group(1)}.mid_block.resnets.{int(m.group(2)[-1]) - 1}.{sub}")
    m = re.fullmatch(r"(encoder|decoder)\.mid\.attn_1", k)
    if m:
        return "attn", f"{m.group(1)}.mid_block.attentions.0"
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block|attn)\.(\d+)(?:\.(\w+))?", k)
    if m:
        side, lvl, what, j, sub = m.group(1), int(m.group(3)), m.group(4), int(m.group(5)), m.group(6)
        if (side == "encoder") != (m.group(2) == "down"):
            return None
        # LDM counts decoder levels from full resolution, diffusers from the latent
        base = f"encoder.down_blocks.{lvl}" if side == "encoder" else f"decoder.up_blocks.{n_levels - 1 - lvl}"
        if what == "attn":
            return "attn", f"{base}.attentions.{j}"
        return None if sub not in _RESNET else ("plain", f"{base}.resnets.{j}.{_RESNET[sub]}")
    m = re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv", k)
    if m:
        return "plain", f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv"
    m = re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv", k)
    if m:
        return "plain", f"decoder.up_blocks.{n_levels - 1 - int(m.group(1))}.upsamplers.0.conv"
    if k in ("quant_conv", "post_quant_conv"):
        return "plain", k
    return None


def _map_prefix(k: str, n_levels: int) -> tuple[str, str] | None:
    """Map a VAR module prefix (without the final param name) to varkit's; returns (kind, new_prefix)."""
    mapped = ldm_prefix_to_diffusers(k, n_levels)
    if mapped is not None:
        return mapped
    if k == "quantize.embedding":
        return "plain", "quantizer.embedding"
    m = re.fullmatch(r"quantize\.quant_resi\.(?:qresi_ls\.|)(\d+)", k)
    if m:
        return "plain", f"quantizer.phis.{m.group(1)}"
    if k == "quantize.quant_resi.qresi":
        return "plain", "quantizer.phis.0"
    return None


def msvq_state_dict_from_var(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """VAR VQVAE state_dict -> :class:`MultiScaleVQTokenizer` state_dict (``ema_vocab_hit_SV`` is dropped)."""
    if not is_var_vae_state_dict(sd):
        raise CheckpointError(f"not a VAR VQVAE state_dict: {_describe(sd)}")
    n_levels = _levels(sd, "encoder.down.")
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key == _EMA:
            continue
        prefix, _, param = key.rpartition(".")
        # attention sub-modules: "<attn>.norm.weight", "<attn>.qkv.weight", "<attn>.proj_out.bias"
        attn_m = re.fullmatch(r"(.*)\.(norm|qkv|proj_out)", prefix)
        if attn_m and re.search(r"\.attn(_1|\.\d+)$", attn_m.group(1)):
            mapped = _map_prefix(attn_m.group(1), n_levels)
            if mapped is None or mapped[0] != "attn":
                raise CheckpointError(f"unexpected key {key!r} in VAR VQVAE state_dict")
            base, sub = mapped[1], attn_m.group(2)
            if sub == "norm":
                out[f"{base}.group_norm.{param}"] = value
            elif sub == "proj_out":
                out[f"{base}.to_out.0.{param}"] = value.reshape(value.shape[0], -1) if param == "weight" else value
            else:
                c = value.shape[0] // 3
                flat = value.reshape(value.shape[0], -1) if param == "weight" else value
                for i, name in enumerate(("to_q", "to_k", "to_v")):
                    out[f"{base}.{name}.{param}"] = flat[i * c:(i + 1) * c].clone()
            continue
        mapped = _map_prefix(prefix, n_levels)
        if mapped is None or mapped[0] != "plain":
            raise CheckpointError(f"unexpected key {key!r} in VAR VQVAE state_dict; is this file from VAR's VQVAE?")
        out[f"{mapped[1]}.{param}"] = value
    return out


_TO_VAR_RULES: list[tuple[str, str]] = [
    # (varkit module prefix regex, VAR prefix template). {0}.. are the groups; {L0}: VAR level of decoder
    # up block {0} (VAR counts from full resolution); {R}: VAR mid block number; {RES2}: VAR resnet part
    (r"(encoder|decoder)\.conv_norm_out", "{0}.norm_out"),
    (r"(encoder|decoder)\.(conv_in|conv_out)", "{0}.{1}"),
    (r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)", "{0}.mid.block_{R}.{RES2}"),
    (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", "encoder.down.{0}.block.{1}.{RES2}"),
    (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", "encoder.down.{0}.downsample.conv"),
    (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", "decoder.up.{L0}.block.{1}.{RES2}"),
    (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", "decoder.up.{L0}.upsample.conv"),
    (r"(quant_conv|post_quant_conv)", "{0}"),
    (r"quantizer\.embedding", "quantize.embedding"),
    (r"quantizer\.phis\.(\d+)", "{PHI}"),
]


def msvq_state_dict_to_var(sd: Mapping[str, Tensor], config: MSVQConfig | None = None) -> dict[str, Tensor]:
    """Inverse of :func:`msvq_state_dict_from_var`: a raw VAR VQVAE state_dict, as VAR saves it.

    ``config`` (the tokenizer's) decides how the Phi convs are named (VAR names them by sharing mode:
    ``qresi_ls.{i}``, ``qresi`` or ``{i}``) and the rows of ``quantize.ema_vocab_hit_SV`` (training
    statistics, written as zeros); without it: partially shared Phis and 10 scales, as in the published file.
    """
    share = config.share_quant_resi if config is not None else 4
    num_scales = len(config.patch_nums) if config is not None else 10
    n_levels = _levels(sd, "encoder.down_blocks.")
    rev_res = {v: k for k, v in _RESNET.items()}
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}

    def attn_prefix(base: str) -> str:
        m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0", base)
        if m:
            return f"{m.group(1)}.mid.attn_1"
        m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.attentions\.(\d+)", base)
        if m:
            return f"encoder.down.{m.group(1)}.attn.{m.group(2)}"
        m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.attentions\.(\d+)", base)
        if m:
            return f"decoder.up.{n_levels - 1 - int(m.group(1))}.attn.{m.group(2)}"
        raise CheckpointError(f"unexpected attention module {base!r} in a MultiScaleVQTokenizer state_dict")

    for key, value in sd.items():
        m = re.fullmatch(r"(.*\.attentions\.\d+)\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", key)
        if m:
            base, sub, param = attn_prefix(m.group(1)), m.group(2), m.group(3)
            if sub == "group_norm":
                out[f"{base}.norm.{param}"] = value
            elif sub == "to_out.0":
                out[f"{base}.proj_out.{param}"] = value[:, :, None, None] if param == "weight" else value
            else:
                qkv.setdefault(f"{base}.qkv.{param}", {})[sub] = value
            continue
        prefix, _, param = key.rpartition(".")
        for pattern, template in _TO_VAR_RULES:
            m = re.fullmatch(pattern, prefix)
            if m:
                g = m.groups()
                phi = ("quantize.quant_resi.qresi" if share == 1 else
                       f"quantize.quant_resi.{g[0]}" if share == 0 else f"quantize.quant_resi.qresi_ls.{g[0]}") if "PHI" in template else ""
                new = template.format(*g, L0=(n_levels - 1 - int(g[0])) if g and g[0].isdigit() else "",
                                      R=(int(g[1]) + 1) if len(g) > 1 and g[1].isdigit() else "",
                                      RES2=rev_res.get(g[2], "") if len(g) > 2 else "", PHI=phi)
                out[f"{new}.{param}"] = value
                break
        else:
            raise CheckpointError(f"unexpected key {key!r} in a MultiScaleVQTokenizer state_dict")
    for key, parts in qkv.items():
        cat = torch.cat([parts["to_q"], parts["to_k"], parts["to_v"]], dim=0)
        out[key] = cat[:, :, None, None] if key.endswith("weight") else cat
    V = int(sd["quantizer.embedding.weight"].shape[0])
    out[_EMA] = torch.zeros(num_scales, V, dtype=torch.float32)
    return out


def load_var_vae(path: str | os.PathLike, patch_nums: Sequence[int] | None = None, *,
                 resolution: int | None = None) -> MultiScaleVQTokenizer:
    """Load VAR's published VQVAE (``vae_ch160v4096z32.pth``) as a :class:`MultiScaleVQTokenizer` (eval mode).

    ``patch_nums`` is the scale schedule (default: VAR's 256px one); or give ``resolution`` (256, 512 or
    1024) to take VAR's schedule for it. The schedule's last entry times the downsampling factor (16) is
    the image size the tokenizer accepts.
    """
    if patch_nums is not None and resolution is not None:
        raise InvalidArgumentError("pass either patch_nums or resolution, not both")
    if resolution is not None:
        if resolution not in VAR_PATCH_NUMS:
            raise InvalidArgumentError(
                f"VAR has no scale schedule for resolution {resolution}; known: {sorted(VAR_PATCH_NUMS)} "
                "(or pass patch_nums explicitly, ending at resolution/16)")
        patch_nums = VAR_PATCH_NUMS[resolution]
    sd = _unwrap(load_torch_checkpoint(path, what="VAR VQVAE checkpoint"), str(path))
    cfg = msvq_config_from_var_state_dict(sd, patch_nums)
    model = MultiScaleVQTokenizer(cfg)
    state = msvq_state_dict_from_var(sd)
    load_state_dict_strict(model, state, str(path))
    return model.eval()
