"""How the trained tree and the frozen entries form the decoder's weights: `ParamView`, and `IDENTITY` for a run that
trains the decoder's weights themselves."""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class ParamView:
  """How the trainable params and the frozen entries form the decoder's weights.

  Without adapters the trainable params are the decoder's weights (IDENTITY). An adapter method (LoRA) trains a
  small tree, keeps the decoder's weights as a frozen entry, and composes the two in `model_params`.
  """
  trainable: Callable[[dict, dict], tuple[dict, dict]]  # (abstract model params, logical specs) -> same, trained
  init_trainable: Callable[[dict, int], dict]  # (initial model params, seed) -> trainable tree (jittable)
  # (trainable, frozen entries, rng=None) -> decoder weights (jittable); the train step passes a dropout rng
  model_params: Callable[..., dict]


IDENTITY = ParamView(lambda abstract, specs: (abstract, specs), lambda params, seed: params,
                     lambda trainable, frozen, rng=None: trainable)

