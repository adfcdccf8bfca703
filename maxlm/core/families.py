"""Model families as data: one row per decoder family (norm, where norms sit, residual layout, MLP, biases, positions),
read by maxlm.model (the forward), maxlm.core.config (validation) and maxlm.hf (names, config.json); docs/FAMILIES.md.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

NORMS = ("rms", "layernorm", "nonparametric")  # RMSNorm / LayerNorm with bias / LayerNorm without parameters
NORM_PLACES = ("pre", "post")  # post: OLMo-2's norm of the attention and MLP outputs, before the residual add
RESIDUALS = ("sequential", "parallel")  # parallel: x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX)
MLPS = ("swiglu", "gelu", "gelu_tanh")
POSITIONS = ("rope", "learned")
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class Family:
  """What a decoder family computes; everything else (sizes, rope theta and scaling, tied head) is the config's."""
  name: str
  norm: str
  norm_place: str = "pre"
  qk_norm: bool = False  # RMSNorm over the whole q and k projections (OLMo-2)
  residual: str = "sequential"
  mlp: str = "swiglu"
  biases: tuple[str, ...] = ()  # projections with a bias
  positions: str = "rope"
  clip_qkv: bool = False  # accepts model.clip_qkv (OLMo v1)
  fixed_norm_eps: Optional[float] = None  # OLMo v1's LayerNorm ignores the configured eps

  @property
  def projections(self) -> tuple[str, ...]:
    """The block's projections, in maxlm's names (q_proj, ...)."""
    names = ("q", "k", "v", "o") + (("gate", "up", "down") if self.mlp == "swiglu" else ("up", "down"))
    return tuple(f"{p}_proj" for p in names)

  @property
  def norm_params(self) -> tuple[str, ...]:
    """Parameters of one norm: a scale, and a bias for LayerNorm; none for the non-parametric one."""
    return {"rms": ("",), "layernorm": ("", "_bias"), "nonparametric": ()}[self.norm]


# The table. LLaMA and OLMo v1 are the two families maxlm started with; their param trees are unchanged.
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", norm="rms"),
    Family("olmo", norm="nonparametric", clip_qkv=True, fixed_norm_eps=1e-5),
    Family("olmo2", norm="rms", norm_place="post", qk_norm=True),
    Family("qwen2", norm="rms", biases=("q", "k", "v")),
    Family("gpt2", norm="layernorm", mlp="gelu_tanh", biases=("q", "k", "v", "o", "up", "down"), positions="learned"),
    Family("gpt_neox", norm="layernorm", residual="parallel", mlp="gelu", biases=("q", "k", "v", "o", "up", "down")),
)}

ROPE_SCALINGS = ("none", "linear", "dynamic", "llama3")


def family(name: str) -> Family:
  try:
    return FAMILIES[name]
  except KeyError:
    raise ValueError(f"model family {name!r} is not one of {', '.join(FAMILIES)}") from None
