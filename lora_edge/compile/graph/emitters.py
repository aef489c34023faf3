"""The emitters a family's graph writer calls, chosen once from the options for one graph being built."""

from __future__ import annotations

from dataclasses import dataclass

from ..models.spec import DecoderSpec, Slot
from .adapter_inputs import adapter_inputs
from .branch import Branches, Inputs
from .builder import GraphBuilder
from .linear import Linear
from .norm import Norm
from .options import GraphOptions
from .projection import Projections
from .weights import WeightStore


@dataclass(frozen=True)
class Emitters:
    store: WeightStore  # base weights as initializers
    projections: Projections  # x @ W.T per stored format
    branches: Branches  # the LoRA branch of each slot
    linear: Linear  # projection + branch + bias of a group of modules
    norm: Norm

    @classmethod
    def build(cls, g: GraphBuilder, spec: DecoderSpec, weights: dict, slots: dict[str, Slot], options: GraphOptions) -> Emitters:
        store = WeightStore(g, options)
        projections = Projections(g, options, store, slots)
        branches = Branches(g, options, slots)
        linear = Linear(g, weights, slots, projections, branches, options.ct)
        return cls(store, projections, branches, linear, Norm(g, spec, weights, options.ct, options.fused))

    def adapter_inputs(self, slots: dict[str, Slot], weights: dict, options: GraphOptions) -> Inputs:
        """The overridable inputs (graph input -> (default, symbolic shape)) that ``GraphBuilder.model`` takes."""
        return adapter_inputs(slots, weights, self.branches, options.null_rank, options.ct)
