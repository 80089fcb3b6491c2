"""Objectives: one module per method family (dino, simclr, clip) plus annotation bootstrapping.

    from abvid.train.objectives import ObjectiveConfig, build_objective
    obj = build_objective(ObjectiveConfig(name="dino", bootstrap=True), ModelConfig(arch="vit_tiny"))
    loss, metrics = obj.loss(batch, teacher_temp=0.04)   # batch: INTERFACES.md "Loader batch", on the device
    loss.backward(); opt.step(); obj.update_teacher(momentum=0.996)

``bootstrap=False`` is the plain base method (DINO / SimCLR / CLIP);
``bootstrap=True`` adds ``bootstrap_weight`` x the annotation-bootstrapping loss
(bootstrap.py). Ablations: ``action_tokens=False`` (Q blind to the action),
``target_network=False`` (bootstrap targets from the online network of the same
step, detached; DINO keeps its own momentum teacher for its base loss),
``temporal=False`` (dt dropped from the action). The optimiser should exempt
``obj.no_weight_decay()`` from weight decay.

``max_dt = 0`` (the default) sizes the action's dt table from the data:
``data_info["max_abs_dt"]``, the largest |dt| the view sampler can put between
two views (``ViewSampler.max_abs_dt``; ``train.config.check_sizes`` refuses an
explicit value below it).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from abvid.model import ModelConfig, build_encoder, encoder_kwargs
from abvid.model.heads import DINOHead, ProjectionHead
from abvid.model.value import ValueDecoder

from .base import Objective
from .clip import CLIPFamily, CLIPHead
from .dino import DINOFamily
from .simclr import SimCLRFamily


@dataclass(frozen=True)
class ObjectiveConfig:
    """``objective.*`` keys. Defaults: AB_DINO with gamma = 0 (the paper's main setting)."""
    name: Literal["dino", "simclr", "clip"] = "dino"
    bootstrap: bool = True              # false = the plain base method
    gamma: float = 0.0                  # weight of max_{a'} Q_ema(l | x', a') in the target
    num_next_actions: int = 4           # |A'|: sampled next actions out of x' (used when gamma > 0)
    bootstrap_weight: float = 1.0       # lambda: total = base + lambda * bootstrap
    annotation_grad: bool = True        # the bootstrap loss also trains the annotations psi it scores against
    action_tokens: bool = True          # false: mask tokens, Q independent of the action
    target_network: bool = True         # false: targets from the student (no EMA copy)
    temporal: bool = True               # false: dt is not part of the action
    # DINO
    num_prototypes: int = 4096
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3
    head_norm: Literal["none", "ln", "bn"] = "bn"   # bn: the toy-scale anti-collapse default (dino.py)
    student_temp: float = 0.1
    teacher_temp: float = 0.04          # used when the loop passes no teacher_temp
    centre_momentum: float = 0.9
    # SimCLR / CLIP
    proj_dim: int = 128
    proj_hidden_dim: int = 2048
    proj_norm: Literal["none", "ln", "bn"] = "ln"  # SimCLR's and CLIP's image projector norm (SimCLR paper: bn)
    simclr_temp: float = 0.1
    simclr_target_temp: float = 0.0     # temperature of SimCLR's bootstrap targets p(l | x'); 0 = simclr_temp
    clip_init_temp: float = 0.07
    text_embed_dim: int = 256
    clip_texts: str = ""                # CLIP vocabulary: a text file, one label/caption per line; "" = local shards
    # value decoder
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    action_encoding: Literal["fourier", "bins"] = "fourier"   # how dy, dx, log_sh, log_sw become tokens
    action_bins: int = 16               # bins per field: augmentation fields, and place fields with "bins"
    max_dt: int = 0                     # |dt| the dt token resolves, in corpus frames; 0 = from the data


def build_objective(obj_cfg: ObjectiveConfig, model_cfg: ModelConfig,
                    data_info: Mapping[str, Any] | None = None) -> Objective:
    """Student encoder + family head (+ value decoder), with EMA copies when ``target_network``.

    data_info: optional facts about the data. ``"texts"``: every label / caption
    string of the corpus, used for the CLIP text vocabulary (without it all words
    go to hashed buckets, with a warning). ``"max_abs_dt"``: the largest |dt|
    between two views (used when ``max_dt = 0``; 16 when absent).
    """
    c = obj_cfg
    encoder = build_encoder(**encoder_kwargs(model_cfg))
    dim = encoder.embed_dim
    if c.name == "dino":
        family = DINOFamily(c.num_prototypes, c.student_temp, c.centre_momentum)
        head = DINOHead(dim, c.num_prototypes, c.head_hidden_dim, c.head_bottleneck_dim, c.head_layers, c.head_norm)
        q_temp, ann_dim = c.student_temp, c.head_bottleneck_dim
    elif c.name == "simclr":
        family = SimCLRFamily(c.simclr_temp, c.simclr_target_temp or c.simclr_temp)
        head = ProjectionHead(dim, c.proj_dim, c.proj_hidden_dim, c.proj_norm)
        q_temp, ann_dim = c.simclr_temp, c.proj_dim
    elif c.name == "clip":
        from abvid.model.text import build_vocab
        texts = list((data_info or {}).get("texts") or [])
        if not texts:
            warnings.warn("clip objective built without data_info['texts']: the text vocabulary is empty, "
                          "every word goes to a hashed bucket (objective.clip_texts=FILE gives the labels)",
                          stacklevel=2)
        family = CLIPFamily()
        head = CLIPHead(dim, build_vocab(texts), c.proj_dim, c.proj_hidden_dim, c.text_embed_dim, c.clip_init_temp,
                        c.proj_norm)
        q_temp, ann_dim = c.clip_init_temp, c.proj_dim
    else:
        raise ValueError(f"unknown objective.name '{c.name}': expected dino, simclr or clip")
    value = None
    if c.bootstrap:
        max_dt = c.max_dt or int((data_info or {}).get("max_abs_dt", 16))
        value = ValueDecoder(dim, ann_dim, c.decoder_dim, c.decoder_depth, c.decoder_heads, c.action_bins, max_dt,
                             temporal=c.temporal, action_tokens=c.action_tokens, init_temp=q_temp,
                             encoding=c.action_encoding)
    return Objective(family, encoder, head, value, target_network=c.target_network,
                     bootstrap_weight=c.bootstrap_weight, gamma=c.gamma, num_next_actions=c.num_next_actions,
                     default_teacher_temp=c.teacher_temp, annotation_grad=c.annotation_grad)


__all__ = ["ObjectiveConfig", "Objective", "build_objective"]
