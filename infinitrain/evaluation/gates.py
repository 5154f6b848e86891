"""Memory gates sigmoid(β) per layer and head: which heads read memory, which stay local.

The paper (Fig. 3) finds, after training, specialised heads (gate near 1: memory only; near 0:
local attention only) and mixer heads (near 0.5) in every layer; a model whose gates all sit at 0.5
has not learned to use its memory (docs/design.md §2: frozen gates).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model import InfiniTransformer

SPECIALISED_MARGIN = 0.1
"""A gate within this distance of 0 or 1 counts as specialised."""


def head_role(gate: float) -> str:
    if gate >= 1 - SPECIALISED_MARGIN:
        return "memory"
    if gate <= SPECIALISED_MARGIN:
        return "local"
    return "mixer"


@dataclass
class GateReport:
    gates: list[list[float]]
    """sigmoid(β) as [layer][query head], for the layers with memory."""
    first_layer: int = 0
    """The first layer with memory (the model's memory_from_layer): ``gates[0]`` is its."""

    @classmethod
    def of(cls, model: InfiniTransformer) -> GateReport:
        return cls(model.memory_gates().cpu().tolist(), model.config.memory_from_layer)

    @property
    def layers(self) -> range:
        """The layer index of each row of ``gates``."""
        return range(self.first_layer, self.first_layer + len(self.gates))

    def roles(self) -> list[dict[str, int]]:
        """Per layer, how many heads are memory-specialised, local-specialised and mixers."""
        counts = []
        for layer in self.gates:
            roles = [head_role(g) for g in layer]
            counts.append({role: roles.count(role) for role in ("memory", "local", "mixer")})
        return counts

    def to_dict(self) -> dict:
        return {"gates": self.gates, "first_layer": self.first_layer, "roles": self.roles(),
                "specialised_margin": SPECIALISED_MARGIN}
