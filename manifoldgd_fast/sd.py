"""Stable Diffusion (1.x, 2.x) as a second generator family behind the same pipeline.

The sampler, the guidance and the fast loop call a class-conditional DiT as
``model(x, timestep=t, class_labels=y).sample``. :class:`TextConditionedDenoiser`
gives a diffusers ``UNet2DConditionModel`` that call: ``class_labels`` index a
table of CLIP text embeddings computed once per class (its prompt, by default
the class name, e.g. "tench"), and the CFG null class is the row of the empty (negative)
prompt. The UNet predicts eps on 4 channels (no learned sigma; a v-prediction UNet
such as SD 2.x 768 px has its v turned into eps by the adapter), so CFG mixes all
4 channels and DDPM uses the fixed-small variance, as diffusers' SD pipeline does.
The scheduler's timestep_spacing (leading, trailing, linspace), betas, steps_offset
and set_alpha_to_one are read from the folder (:func:`read_scheduler_config`).

A model is an SD 1.x / 2.x diffusers folder (``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``, ``model_index.json``) or a Hugging Face id already
in the local cache; nothing is downloaded. The random-init builders
(:func:`tiny_sd_unet_config`, :func:`tiny_clip_text_config`,
:func:`build_tiny_clip_tokenizer`, :func:`save_sd_folder`) give tests and
benchmarks the real architectures without weights.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from typing import Any, Mapping, Sequence

import torch

from .config import check_prompt_template
from .errors import ConfigError, ModelError
from .models import _first_line, _load_from_folder, seeded_init, weights_variant
from .models import resolve_root as models_resolve_root
from .schedule import PREDICTION_TYPES, SD15_SCHEDULER_CONFIG, diffusers_prediction_type, diffusers_schedule_kwargs

log = logging.getLogger(__name__)

SUBFOLDERS = ("unet", "text_encoder", "tokenizer")  # what load_sd reads; vae/ is read by models.load_vae
# (the pipeline's --vae, or the folder's vae/ where --vae is not given, which load_vae then names)
LAYOUT = "SD 1.5 diffusers layout: unet/, vae/, text_encoder/, tokenizer/, scheduler/"
# MGD3's text-to-image script (sample_mode_guidance_text2img.py, with a patched diffusers: a
# StableDiffusionModeGuidancePipeline and DDPMModeScheduler; read in public copies of the MGD3 code,
# e.g. zelectricsheep/AGS-DD-anonymous, as jachansantiago/mode_guidance#3 had asked for it)
# prompts with the class name alone, as the paper says ("For sampling, we use the class names as a text
# prompt"), and no negative prompt. --prompt-template "a photo of a {name}" gives CLIP's zero-shot
# ImageNet template instead.
DEFAULT_PROMPT_TEMPLATE = "{name}"
# That script's --cfg-scale default (its run scripts do not change it); diffusers' pipeline default is
# 7.5, with the same meaning: eps_u + w (eps_c - eps_u). DistillConfig.resolve reads it.
SD_CFG_SCALE = 8.0
# SD15_SCHEDULER_CONFIG (imported from schedule): runwayml/stable-diffusion-v1-5's scheduler_config.json.


# --------------------------------------------------------------------------- #
# prompts
# --------------------------------------------------------------------------- #
def class_prompts(names: Sequence[str], template: str = DEFAULT_PROMPT_TEMPLATE,
                  class_names=None, *, folders: Sequence[str] | None = None,
                  negative_prompt: str | None = None) -> dict[str, str]:
    """The prompt of each class folder in ``names``: ``template`` with {name} = its class name.

    The class name is the user's (``class_names``: mapping, file or "a=apple,b=banana";
    see :func:`classes.class_names_map`; "tench, Tinca tinca" gives "tench"), else the
    ImageNet-1k name of a WordNet id, else the folder name with underscores as spaces.
    ``folders``: every class folder of the data set (default ``names``).

    Raises ConfigError (naming ``--class-names`` and its file) for a ``class_names`` key that
    is no folder of ``folders`` (ImageNet-1k WordNet ids excepted: ``LOC_synset_mapping.txt``
    names all 1000 classes), for two classes whose prompts are equal once lowercased
    (CLIP's tokenizer lowercases, so they would get the same text embedding), for an empty prompt
    (a folder named "_"), and for a prompt equal to ``negative_prompt`` (CFG's null class: that class
    would be sampled without guidance towards it).
    """
    from .classes import class_display_name, class_names_map, imagenet_wnid_index

    check_prompt_template(template)
    flag = "--class-names"
    if isinstance(class_names, str) and os.path.isfile(class_names):
        flag = f"--class-names {class_names}"
    given = class_names_map(class_names) if class_names is not None else {}
    known = set(names if folders is None else folders) | set(names)
    unknown = [k for k in given if k not in known and k not in imagenet_wnid_index()]
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ConfigError(f"{flag}: {len(unknown)} name(s) match no class folder: {shown}")
    prompts = {n: template.format(name=given.get(n) or class_display_name(n)) for n in names}
    seen: dict[str, str] = {}
    negative = None if negative_prompt is None else " ".join(negative_prompt.lower().split())
    for n in names:
        key = " ".join(prompts[n].lower().split())
        if not key:
            raise ConfigError(f"class folder {n!r} gets an empty prompt: give it a name with {flag}")
        if key == negative:
            raise ConfigError(f"class folder {n!r} gets the prompt {prompts[n]!r}, the --negative-prompt once "
                              f"lowercased: CFG would not steer towards it; give it another name with {flag} (or "
                              "another --negative-prompt)")
        if key in seen:
            raise ConfigError(f"class folders {seen[key]!r} and {n!r} get the same prompt {prompts[n]!r} once "
                              f"lowercased (as CLIP's tokenizer reads it): give them distinct names with {flag}")
        seen[key] = n
    return prompts


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: Sequence[str], batch_size: int = 64,
                   names: Sequence[str] | None = None) -> torch.Tensor:
    """CLIP text embeddings of ``prompts`` as StableDiffusionPipeline.encode_prompt computes them:
    padded to L = ``tokenizer.model_max_length`` and cut there, last hidden state (no clip skip), with
    the attention mask only where ``text_encoder.config.use_attention_mask`` is set.

    A prompt longer than L tokens is cut, with one warning naming ``names[j]`` (e.g. "class tench";
    default "prompt j") and the part left out.

    Returns (len(prompts), L, E) float32 on the text encoder's device.
    """
    dev = next(text_encoder.parameters()).device
    L = tokenizer.model_max_length
    use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
    for j, p in enumerate(prompts):
        ids = tokenizer(p, truncation=False, verbose=False).input_ids
        if len(ids) > L:  # diffusers logs the cut part the same way; bos + L-2 tokens + eos are kept
            name = names[j] if names is not None else f"prompt {j}"
            log.warning("%s: the prompt %r is longer than the tokenizer's %d tokens; the text encoder "
                        "sees it without %r", name, p, L, tokenizer.decode(ids[L - 1:-1]))
    out = []
    for s in range(0, len(prompts), batch_size):
        tok = tokenizer(list(prompts[s:s + batch_size]), padding="max_length", max_length=L, truncation=True,
                        return_tensors="pt")
        mask = tok.attention_mask.to(dev) if use_mask else None
        out.append(text_encoder(tok.input_ids.to(dev), attention_mask=mask)[0].float())
    return torch.cat(out)


# --------------------------------------------------------------------------- #
# the adapter
# --------------------------------------------------------------------------- #
class TextConditionedDenoiser(torch.nn.Module):
    """A ``UNet2DConditionModel`` behind the DiT's call ``forward(x, timestep=, class_labels=)``.

    Args:
        unet: the UNet (4 channels; eps, v or x0 prediction).
        embeddings: (n + 1, L, E) text embeddings: row j is the prompt of class
            ``labels[j]``, the last row the negative (empty) prompt.
        labels: the n class labels, distinct, >= 0.
        num_classes: labels lie in [0, num_classes); the null class is ``num_classes``
            (default max(labels) + 1).
        prompts: label -> prompt (kept for the manifest).
        schedule_kwargs: :func:`schedule.make_schedule` arguments of this model's scheduler (its
            ``prediction_type`` included).
        prediction_type: what the UNet predicts: "epsilon" (SD 1.x, SD 2.x base), "v_prediction"
            (SD 2.x 768 px) or "sample" (x0); see :func:`schedule.diffusers_prediction_type`.

    ``forward`` returns the UNet's own prediction (``.sample``: (B, 4, h, w)), as diffusers' pipelines
    take it: CFG mixes the prediction, and the sampler turns it into (eps, x0) by the schedule's
    ``prediction_type`` (:meth:`schedule.Schedule.eps_x0`), which also holds at abar = 0 (zero
    terminal SNR) for v and x0.
    """

    def __init__(self, unet, embeddings: torch.Tensor, labels: Sequence[int], *, num_classes: int | None = None,
                 prompts: Mapping[int, str] | None = None, negative_prompt: str = "",
                 schedule_kwargs: dict | None = None, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        labels = [int(v) for v in labels]
        n = len(labels)
        if embeddings.dim() != 3 or embeddings.shape[0] != n + 1:
            raise ValueError(f"embeddings must be (n + 1, L, E) with n = {n} labels, got {tuple(embeddings.shape)}")
        if len(set(labels)) != n or any(v < 0 for v in labels):
            raise ValueError(f"labels must be distinct and >= 0, got {labels}")
        num_classes = max(labels, default=-1) + 1 if num_classes is None else int(num_classes)
        if n and max(labels) >= num_classes:
            raise ValueError(f"label {max(labels)} is outside num_classes {num_classes}")
        self.unet = unet
        self.num_classes = num_classes
        self.prompts = dict(prompts or {})
        self.negative_prompt = negative_prompt
        self.schedule_kwargs = dict(schedule_kwargs or {})
        # label -> table row; the null class -> the negative prompt's row; any other label -> a NaN row,
        # so a wrong label fails loudly without a device sync on CUDA (and with a ValueError on the CPU)
        rows = torch.full((num_classes + 1,), n + 1, dtype=torch.long)
        rows[torch.tensor(labels, dtype=torch.long)] = torch.arange(n)
        rows[num_classes] = n
        nan = torch.full_like(embeddings[:1], float("nan"))
        self.register_buffer("rows", rows.to(embeddings.device), persistent=False)
        self.register_buffer("embeddings", torch.cat([embeddings, nan]), persistent=False)  # (n + 2, L, E)
        self.prediction_type = prediction_type
        if self.schedule_kwargs.get("prediction_type", prediction_type) != prediction_type:
            raise ValueError(f"prediction_type {prediction_type!r} is not schedule_kwargs' "
                             f"{self.schedule_kwargs['prediction_type']!r}")
        self.schedule_kwargs["prediction_type"] = prediction_type
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def denoiser_info(self) -> dict[str, Any]:
        """The shape facts ``models.dit_info`` reports for a DiT."""
        cfg = self.unet.config
        size = cfg.sample_size[0] if isinstance(cfg.sample_size, (list, tuple)) else cfg.sample_size  # ([h, h]: sd_info)
        return {"num_classes": self.num_classes, "null_class": self.num_classes, "latent_size": int(size),
                "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "learned_sigma": False,
                "patch_size": None, "backbone": "sd"}

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor):
        rows = self.rows[class_labels]                                    # (B,)
        if not rows.is_cuda and bool((rows == self.embeddings.shape[0] - 1).any()):  # the NaN row
            raise ValueError(f"class_labels {class_labels.tolist()} hold a label without a prompt "
                             f"(have {sorted(self.prompts)}; null class {self.num_classes})")
        enc = self.embeddings[rows].to(self.unet.dtype)                  # (B, L, E)
        return self.unet(x, timestep, encoder_hidden_states=enc)          # eps, v or x0: schedule.eps_x0


# --------------------------------------------------------------------------- #
# loading (never downloads)
# --------------------------------------------------------------------------- #
def resolve_root(path_or_id, *, flag: str = "--model", cache_dir: str | None = None) -> str:
    """The local folder of a Stable Diffusion model: the folder itself or the cached snapshot of a HF id."""
    return models_resolve_root(path_or_id, flag=flag, what="Stable Diffusion", cache_dir=cache_dir)


def is_sd_folder(root: str) -> bool:
    """A Stable Diffusion pipeline folder: model_index.json naming a UNet pipeline, or a unet/ subfolder."""
    index = os.path.join(root, "model_index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                d = json.load(f)
            if isinstance(d, dict):
                if "unet" in d:
                    return True
                if "transformer" in d and os.path.isdir(os.path.join(root, "transformer")):
                    return False   # (an index naming a transformer the folder lacks: decided by its folders)
        except (OSError, ValueError):
            pass  # a damaged index: decide by the folders; the loader reports the damage
    return os.path.isdir(os.path.join(root, "unet"))


def _check_layout(root: str, arg: str, flag: str) -> None:
    """The SD 1.x / 2.x layout, and a UNet conditioned on the text states alone, before any weights load.

    Refused, naming the folder: SDXL (``text_encoder_2/``, or a UNet with ``addition_embed_type``: pooled
    text and size / crop conditioning the adapter does not give) and UNets with a class or noise-level
    embedding (``class_embed_type`` / ``num_class_embeds``: the x4 upscaler, unCLIP) or a guidance
    embedding (``time_cond_proj_dim``: LCM-distilled UNets). A damaged
    unet/config.json is left to the loaders, which name it."""
    try:
        with open(os.path.join(root, "unet", "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        cfg = None
    cfg = cfg if isinstance(cfg, dict) else {}
    # SDXL first: its refiner has text_encoder_2/ but no text_encoder/, which is not a damaged SD 1.x folder
    if os.path.isdir(os.path.join(root, "text_encoder_2")) or cfg.get("addition_embed_type") is not None:
        why = (f"its UNet has addition_embed_type {cfg['addition_embed_type']!r}"
               if cfg.get("addition_embed_type") is not None else "it has a second text encoder (text_encoder_2/)")
        raise ModelError(f"{flag} {arg}: {root} is an SDXL-style model ({why}: pooled text and size / crop "
                         "conditioning), which the SD backbone does not give; it runs SD 1.x and 2.x")
    for sub in SUBFOLDERS:
        if not os.path.isdir(os.path.join(root, sub)):
            raise ModelError(f"{flag} {arg}: Stable Diffusion folder {root} has no {sub}/ ({LAYOUT})")
    for key in ("class_embed_type", "num_class_embeds"):
        if cfg.get(key) is not None:
            raise ModelError(f"{flag} {arg}: {root}: its UNet sets {key} {cfg[key]!r} (a class or noise-level "
                             "input, e.g. the x4 upscaler or unCLIP); the SD backbone needs a text-to-image UNet "
                             "conditioned on the prompt alone")
    if cfg.get("time_cond_proj_dim") is not None:
        raise ModelError(f"{flag} {arg}: {root}: its UNet sets time_cond_proj_dim {cfg['time_cond_proj_dim']!r} (a "
                         "guidance-distilled model, e.g. LCM, which samples in a few steps with the CFG scale as an "
                         "input and no unconditional pass); the SD backbone needs a UNet sampled with CFG")


def _json_config(path: str, arg: str, flag: str, what: str = "config file") -> dict[str, Any]:
    """A JSON object file of the folder; ModelError naming ``flag`` and the file when it is damaged."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ModelError(f"{flag} {arg}: {what} {path} is damaged ({_first_line(e)})") from None
    return cfg


def read_scheduler_config(root: str, arg: str, flag: str = "--model") -> dict[str, Any]:
    """scheduler/scheduler_config.json of an SD folder as StableDiffusionPipeline samples with it.

    Keys the file lacks take SD 1.5's values (:data:`SD15_SCHEDULER_CONFIG`, as
    :func:`schedule.diffusers_schedule_kwargs` fills them); a folder without the file gets SD 1.5's
    scheduler settings, with a warning. Like the pipeline, steps_offset is set to 1 and clip_sample
    to False, with a warning naming the folder where the file says otherwise.

    Returns the config dict. Raises ModelError naming ``flag`` and the file when it is damaged or
    asks for what the samplers cannot do (prediction_type, timestep_spacing, beta_schedule; see
    :func:`schedule.diffusers_schedule_kwargs`); :func:`load_sd` calls it before loading any weights.
    """
    path = os.path.join(root, "scheduler", "scheduler_config.json")
    cfg = dict(SD15_SCHEDULER_CONFIG)
    if os.path.isfile(path):
        cfg.update(_json_config(path, arg, flag, "scheduler config"))
    else:
        log.warning("%s %s: %s has no scheduler/scheduler_config.json; using SD 1.5's scheduler settings "
                    "(scaled_linear betas 0.00085 -> 0.012, steps_offset 1, set_alpha_to_one false)", flag, arg, root)
    # StableDiffusionPipeline.__init__ rewrites these two with a deprecation warning; so do we
    if cfg.get("steps_offset") != 1:
        log.warning("%s %s: %s sets steps_offset %r; sampling with steps_offset 1, as diffusers' "
                    "StableDiffusionPipeline does", flag, arg, path, cfg.get("steps_offset"))
        cfg["steps_offset"] = 1
    if cfg.get("clip_sample") is True:
        log.warning("%s %s: %s sets clip_sample true; sampling without clipping, as diffusers' "
                    "StableDiffusionPipeline does", flag, arg, path)
        cfg["clip_sample"] = False
    try:
        diffusers_schedule_kwargs(cfg)
    except ConfigError as e:
        raise ModelError(f"{flag} {arg}: {path}: {e}") from None
    return cfg


@contextlib.contextmanager
def _no_transformers_bars():
    """transformers 5 draws a "Loading weights" bar on stderr for every model it loads; a run's stderr keeps
    to our own progress and one-line errors. The caller's setting is restored after."""
    from transformers.utils import logging as tlog

    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tlog.enable_progress_bar()


def _default(cls, name: str):
    """The default of ``cls.__init__``'s argument ``name``: what from_pretrained gives a config without the key."""
    import inspect

    return inspect.signature(cls.__init__).parameters[name].default


def _tokenizer_digest(folder: str) -> str:
    """sha256 (16 hex digits) of the tokenizer folder's files, names and bytes."""
    from .shipped import tree_digest

    h = hashlib.sha256()
    tree_digest(h, folder, folder)
    return h.hexdigest()[:16]


def check_sd_folder(path_or_id, *, flag: str = "--model", cache_dir: str | None = None) -> dict[str, Any]:
    """Everything of an SD 1.x folder that can be checked before any weights load: the layout, the
    scheduler config, the text side (config files, the tokenizer's vocabulary and length, against the
    text encoder's positions and vocabulary) and the UNet's cross-attention width against the text
    encoder's. ``distill`` calls it before the VAE loads; :func:`load_sd` before the UNet.

    Returns dict(root, scheduler_config, tokenizer, unet_dir, te_dir, tokenizer_digest).
    Raises ModelError naming ``flag``, the file and the key at fault.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    arg = str(path_or_id)
    root = resolve_root(path_or_id, flag=flag, cache_dir=cache_dir)
    _check_layout(root, arg, flag)
    sched = read_scheduler_config(root, arg, flag)
    unet_dir = os.path.join(root, "unet")
    te_dir, tok_dir = os.path.join(root, "text_encoder"), os.path.join(root, "tokenizer")
    # The text side is checked before any weights load. Without these files transformers raises nothing
    # or something unreadable: a default-size CLIP and a mismatch table (no text_encoder/config.json), a
    # 2-token tokenizer that gives every prompt the same embedding (no vocabulary, e.g. a partial download),
    # an OverflowError when padding to 1e30 tokens (no model_max_length), an IndexError deep in the text
    # encoder (a tokenizer with more tokens than the encoder's embedding has rows).
    for folder in (unet_dir, te_dir):
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ModelError(f"{flag} {arg}: {folder} has no config.json")
    if not any(all(os.path.isfile(os.path.join(tok_dir, n)) for n in names)
               for names in (("vocab.json", "merges.txt"), ("tokenizer.json",))):
        raise ModelError(f"{flag} {arg}: {tok_dir} has neither vocab.json + merges.txt nor tokenizer.json "
                         "(the CLIP tokenizer's vocabulary)")
    te_config = os.path.join(te_dir, "config.json")
    unet_config = os.path.join(unet_dir, "config.json")
    te, un = _json_config(te_config, arg, flag), _json_config(unet_config, arg, flag)
    clip = CLIPTextConfig()  # the values from_pretrained gives a config without the key
    try:
        P = int(te.get("max_position_embeddings", clip.max_position_embeddings))
        V = int(te.get("vocab_size", clip.vocab_size))
        E = int(te.get("hidden_size", clip.hidden_size))
        want_key = "encoder_hid_dim" if un.get("encoder_hid_dim") is not None else "cross_attention_dim"
        want = un.get(want_key, _default(UNet2DConditionModel, want_key))
        want = [int(w) for w in want] if isinstance(want, (list, tuple)) else [int(want)]
    except (ValueError, TypeError) as e:
        raise ModelError(f"{flag} {arg}: config file {te_config} or {unet_config} is damaged "
                         f"({_first_line(e)})") from None
    if any(w != E for w in want):  # every cross-attention block attends to the text encoder's states
        raise ModelError(f"{flag} {arg}: {unet_config} gives {want_key} {want[0] if len(set(want)) == 1 else want}, "
                         f"but the text encoder gives {E}-dim states ({te_config} hidden_size)")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except Exception as e:
        raise ModelError(f"{flag} {arg}: cannot load the CLIP tokenizer from {tok_dir} ({_first_line(e)})") from None
    L = tokenizer.model_max_length
    if L > P:  # prompts are padded to L tokens (encode_prompts): more than the text encoder has positions for
        given = f"model_max_length {L}" if L < 2 ** 31 else "no model_max_length"
        raise ModelError(f"{flag} {arg}: {tok_dir}/tokenizer_config.json gives {given}, but the text encoder "
                         f"has {P} positions (max_position_embeddings); set model_max_length to {P}")
    if len(tokenizer) > V:  # e.g. another model's tokenizer, or added tokens without a resized embedding
        raise ModelError(f"{flag} {arg}: the tokenizer in {tok_dir} has {len(tokenizer)} tokens, but the text "
                         f"encoder embeds {V} ({te_config} vocab_size)")
    return dict(root=root, scheduler_config=sched, tokenizer=tokenizer, unet_dir=unet_dir, te_dir=te_dir,
                tokenizer_digest=_tokenizer_digest(tok_dir))


def load_sd(path_or_id, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            cache_dir: str | None = None, flag: str = "--model", checked: dict | None = None) -> dict[str, Any]:
    """Load the UNet (``dtype``), CLIP text encoder (float32), tokenizer and scheduler config
    of an SD 1.x folder or cached HF id, all in eval mode on ``device``, after :func:`check_sd_folder`.

    ``checked``: :func:`check_sd_folder`'s result for this folder when the caller has it (not checked again).

    Returns dict(unet, text_encoder, tokenizer, scheduler_config, root, text_digest): ``text_digest``
    names the text encoder's weights and the tokenizer's files (the prompt embeddings are made by
    both and are not part of the UNet's weights; a resume with another text side is refused by it).
    Raises ModelError naming ``flag``, the folder and the part at fault.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from .latents import weights_digest

    arg = str(path_or_id)
    checked = checked or check_sd_folder(path_or_id, flag=flag, cache_dir=cache_dir)
    te_dir = checked["te_dir"]
    unet = _load_from_folder(UNet2DConditionModel, checked["unet_dir"], flag, arg, dtype).to(device).eval()
    try:
        variant = weights_variant(te_dir, ("model", "pytorch_model"))  # an fp16-only cache names its variant
        with _no_transformers_bars():
            text_encoder, info = CLIPTextModel.from_pretrained(te_dir, local_files_only=True,
                                                               output_loading_info=True, variant=variant)
    except Exception as e:  # OSError (no weights), ValueError, safetensors errors
        raise ModelError(f"{flag} {arg}: cannot load the CLIP text encoder from {te_dir} ({_first_line(e)})") from None
    missing = [k for k in info.get("missing_keys") or [] if "position_ids" not in k]
    if missing:
        raise ModelError(f"{flag} {arg}: weights in {te_dir} do not fit CLIPTextModel "
                         f"({len(missing)} tensors missing, e.g. {missing[0]})")
    text_digest = hashlib.sha256(f"{weights_digest(text_encoder)}|{checked['tokenizer_digest']}".encode()).hexdigest()[:16]
    return dict(unet=unet, text_encoder=text_encoder.to(device).float().eval(), tokenizer=checked["tokenizer"],
                scheduler_config=checked["scheduler_config"], root=checked["root"], text_digest=text_digest)


def check_distinct_text_inputs(tokenizer, prompts: Mapping[int, str], names: Mapping[int, str] | None = None,
                               negative_prompt: str | None = None) -> None:
    """ConfigError naming two classes whose prompts reach the text encoder as the same token ids, so the same
    embedding: :func:`class_prompts` compares the prompts lowercased, but CLIP's tokenizer also drops the spaces
    around punctuation ("golden-retriever", "golden - retriever") and :func:`encode_prompts` cuts every prompt to
    ``tokenizer.model_max_length`` tokens (two long prompts alike up to there, e.g. a long --prompt-template
    ending in {name}). prompts: class label -> prompt; names: class label -> its name in the message. A class
    whose tokens are ``negative_prompt``'s (CFG's null class) is refused too: it would get no guidance."""
    names = names or {}
    L = tokenizer.model_max_length
    tokens = lambda text: tuple(tokenizer(text, truncation=True, max_length=L, verbose=False).input_ids)  # noqa: E731
    negative = None if negative_prompt is None else tokens(negative_prompt)
    seen: dict[tuple, int] = {}
    for v in sorted(prompts):
        key = tokens(prompts[v])
        if key == negative:
            raise ConfigError(f"class {names.get(v, v)!r} gets the text embedding of the --negative-prompt: its "
                              f"prompt {prompts[v]!r} and {negative_prompt!r} are the same tokens as CLIP's "
                              f"tokenizer reads them (cut to {L}), and CFG would not steer towards it; give it "
                              "another name with --class-names (or another --negative-prompt)")
        if key in seen:
            a = seen[key]
            raise ConfigError(f"classes {names.get(a, a)!r} and {names.get(v, v)!r} get the same text embedding: "
                              f"their prompts {prompts[a]!r} and {prompts[v]!r} are the same tokens as CLIP's "
                              f"tokenizer reads them (cut to {L}); give them distinct names with --class-names "
                              "(or a shorter --prompt-template)")
        seen[key] = v


def load_sd_denoiser(path_or_id, prompts: Mapping[int, str], *, negative_prompt: str = "",
                     num_classes: int | None = None, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, cache_dir: str | None = None,
                     names: Mapping[int, str] | None = None, checked: dict | None = None) -> TextConditionedDenoiser:
    """Load an SD 1.x model and embed the class prompts once: the pipeline's model for this backbone.

    prompts: class label -> prompt; names: class label -> its name in warnings (e.g. the class folder).
    The text encoder is freed after encoding.
    """
    checked = checked or check_sd_folder(path_or_id, cache_dir=cache_dir)
    labels = sorted(prompts)
    names = names or {}
    check_distinct_text_inputs(checked["tokenizer"], prompts, names, negative_prompt)   # before any weights load
    parts = load_sd(path_or_id, device=device, dtype=dtype, cache_dir=cache_dir, checked=checked)
    # one prompt per text-encoder call: a class's embedding (and so its images) does not depend on which other
    # prompts share the call, i.e. on the shard or on the classes a resume has left (a GPU's matmul may pick
    # another kernel for another batch size)
    emb = encode_prompts(parts["text_encoder"], parts["tokenizer"], [prompts[v] for v in labels] + [negative_prompt],
                         names=[f"class {names.get(v, v)}" for v in labels] + ["--negative-prompt"], batch_size=1)
    den = TextConditionedDenoiser(parts["unet"], emb, labels, num_classes=num_classes, prompts=prompts,
                                  negative_prompt=negative_prompt,
                                  schedule_kwargs=diffusers_schedule_kwargs(parts["scheduler_config"]),
                                  prediction_type=diffusers_prediction_type(parts["scheduler_config"]))
    den.text_digest = parts["text_digest"]  # the text encoder and tokenizer that made the embeddings
    return den


def check_vae_fits(vae, info: Mapping[str, Any], arg: str, vae_flag: str) -> None:
    """Raise ModelError unless the VAE's latents are what the UNet denoises: ``latent_channels`` equal to
    the UNet's in and out channels (a 9-channel inpainting UNet is not text-to-image), and no
    ``shift_factor`` (SD3 / Flux VAEs: latents are only scaled by ``scaling_factor`` here).

    info: :func:`sd_info` of the ``--model`` folder ``arg``; vae_flag names the VAE ("--vae X" or "--model X").
    """
    c = vae.config
    lc = int(c.latent_channels)
    if info["in_channels"] != lc or info["out_channels"] != lc:
        raise ModelError(f"--model {arg}: the UNet takes {info['in_channels']} and predicts {info['out_channels']} "
                         f"latent channels, but the VAE ({vae_flag}) has latent_channels {lc}; the SD backbone needs "
                         "a text-to-image UNet on the VAE's latents (not e.g. an inpainting UNet)")
    shift = getattr(c, "shift_factor", None)
    if shift not in (None, 0, 0.0):
        raise ModelError(f"{vae_flag}: the VAE has shift_factor {shift}, which the SD backbone does not apply "
                         "(its latents are the VAE mean times scaling_factor, as SD 1.x's)")


def sd_info(path_or_id, num_classes: int, cache_dir: str | None = None) -> dict[str, Any]:
    """``denoiser_info`` of an SD folder from unet/config.json alone (no weights loaded: ``cache``, ``modes``)."""
    arg = str(path_or_id)
    root = resolve_root(path_or_id, cache_dir=cache_dir)
    _check_layout(root, arg, "--model")
    path = os.path.join(root, "unet", "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        size, cin, cout = cfg["sample_size"], int(cfg.get("in_channels", 4)), int(cfg.get("out_channels", 4))
        if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:   # diffusers also takes [h, w]
            size = size[0]
        elif isinstance(size, list):
            raise ModelError(f"--model {arg}: {path} sets sample_size {size}: only square latents are supported")
        size = int(size)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"--model {arg}: config file {path} is damaged ({_first_line(e)})") from None
    return {"num_classes": num_classes, "null_class": num_classes, "latent_size": size, "in_channels": cin,
            "out_channels": cout, "learned_sigma": False, "patch_size": None, "backbone": "sd"}


# --------------------------------------------------------------------------- #
# random-init builders (tests, benchmarks)
# --------------------------------------------------------------------------- #
def sd15_unet_config() -> dict[str, Any]:
    """The SD 1.5 UNet (860 M parameters): 4x64x64 latents, 768-dim CLIP ViT-L/14 text states."""
    return dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=[320, 640, 1280, 1280],
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)


def sd15_text_config() -> dict[str, Any]:
    """CLIP ViT-L/14's text tower, as SD 1.5's text_encoder/config.json."""
    return dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def sd15_vae_config() -> dict[str, Any]:
    """SD 1.5's AutoencoderKL (512 px -> 4x64x64, scaling factor 0.18215)."""
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)


def tiny_sd_unet_config(sample_size: int = 8, cross_attention_dim: int = 32,
                        block_out_channels: tuple[int, ...] = (8, 16)) -> dict[str, Any]:
    """A UNet2DConditionModel with SD's block structure (cross-attention down / up) at toy width."""
    cfg = sd15_unet_config()
    n = len(block_out_channels)
    cfg.update(sample_size=sample_size, layers_per_block=1, block_out_channels=list(block_out_channels),
               down_block_types=["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
               up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
               cross_attention_dim=cross_attention_dim, attention_head_dim=2, norm_num_groups=4)
    return cfg


def tiny_clip_text_config(vocab_size: int, hidden_size: int = 32, max_position_embeddings: int = 16,
                          bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict[str, Any]:
    """A 2-layer CLIP text tower; vocab and special ids must match the tokenizer
    (:func:`build_tiny_clip_tokenizer` puts them at vocab_size - 2 and - 1)."""
    cfg = sd15_text_config()
    cfg.update(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=max_position_embeddings, projection_dim=hidden_size,
               bos_token_id=vocab_size - 2 if bos_token_id is None else bos_token_id,
               eos_token_id=vocab_size - 1 if eos_token_id is None else eos_token_id, pad_token_id=1)
    return cfg


def _byte_chars() -> list[str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode map, as 256 characters in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


# a few merges so that BPE actually merges ("a photo of a" -> a</w> pho to</w> of</w> a</w>)
_TINY_MERGES = (("p", "h"), ("ph", "o"), ("t", "o</w>"), ("o", "f</w>"), ("a", "n"))


def build_tiny_clip_tokenizer(folder: str, model_max_length: int = 32):
    """A CLIPTokenizer with CLIP's byte-level BPE layout and a toy vocabulary, built offline.

    Writes ``vocab.json`` + ``merges.txt`` into ``folder``: the 256 byte characters,
    the same with the end-of-word mark ``</w>``, a few merges, then
    ``<|startoftext|>`` and ``<|endoftext|>`` last (as CLIP orders them). Any text
    tokenizes (down to single bytes). Returns the tokenizer loaded from ``folder``
    and saved back with its tokenizer_config.json.
    """
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in _TINY_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _TINY_MERGES))
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length, local_files_only=True)
    tok.save_pretrained(folder)
    return tok


def build_sd_unet(config: dict[str, Any], seed: int | None = 0):
    """A random-init ``UNet2DConditionModel`` (eval mode)."""
    from diffusers import UNet2DConditionModel

    return seeded_init(lambda: UNet2DConditionModel(**config), seed)


def build_clip_text_encoder(config: dict[str, Any], seed: int | None = 0):
    """A random-init ``CLIPTextModel`` (eval mode)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return seeded_init(lambda: CLIPTextModel(CLIPTextConfig(**config)), seed)


def save_sd_folder(folder: str, *, unet, vae, text_encoder, tokenizer,
                   scheduler_config: dict[str, Any] | None = None) -> str:
    """Write an SD 1.5 diffusers-layout folder (unet/, vae/, text_encoder/, tokenizer/,
    scheduler/scheduler_config.json, model_index.json) that diffusers'
    ``StableDiffusionPipeline.from_pretrained`` and :func:`load_sd` both read."""
    import diffusers

    os.makedirs(folder, exist_ok=True)
    unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
    vae.save_pretrained(os.path.join(folder, "vae"), safe_serialization=True)
    text_encoder.save_pretrained(os.path.join(folder, "text_encoder"), safe_serialization=True)
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    sched = dict(SD15_SCHEDULER_CONFIG if scheduler_config is None else scheduler_config)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump(sched, f, indent=2)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
             "scheduler": ["diffusers", sched.get("_class_name", "PNDMScheduler")],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return folder


def build_tiny_sd_folder(folder: str, *, sample_size: int = 8, vae_sample_size: int = 16, seed: int = 0,
                         vae_block_out_channels: tuple[int, ...] = (8, 16)) -> str:
    """A tiny random-init SD folder: UNet on 4 x sample_size^2 latents, a VAE with
    ``len(vae_block_out_channels)`` blocks, a 2-layer CLIP text tower and the toy tokenizer."""
    from .models import build_vae, tiny_vae_config

    tok = build_tiny_clip_tokenizer(os.path.join(folder, "tokenizer"))
    text = build_clip_text_encoder(tiny_clip_text_config(len(tok), max_position_embeddings=tok.model_max_length,
                                                         bos_token_id=tok.bos_token_id,
                                                         eos_token_id=tok.eos_token_id), seed=seed)
    unet = build_sd_unet(tiny_sd_unet_config(sample_size=sample_size, cross_attention_dim=32), seed=seed + 1)
    vae = build_vae(tiny_vae_config(sample_size=vae_sample_size, block_out_channels=vae_block_out_channels),
                    seed=seed + 2)
    return save_sd_folder(folder, unet=unet, vae=vae, text_encoder=text, tokenizer=tok)
