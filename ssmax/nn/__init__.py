"""Flax NNX modules: the Mamba mixer, residual block and language model, S4 and S4D layers,
recurrent cache and generation."""

from ssmax.nn.block import Block
from ssmax.nn.cache import MambaCache
from ssmax.nn.config import MambaConfig
from ssmax.nn.generate import generate, sample_logits
from ssmax.nn.lm import MambaLM
from ssmax.nn.mixer import MambaMixer, MixerState
from ssmax.nn.norm import RMSNorm
from ssmax.nn.s4 import S4DLayer, S4Layer

__all__ = [
    "Block",
    "MambaCache",
    "MambaConfig",
    "MambaLM",
    "MambaMixer",
    "MixerState",
    "RMSNorm",
    "S4DLayer",
    "S4Layer",
    "generate",
    "sample_logits",
]
