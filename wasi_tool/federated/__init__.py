"""Federated fine-tuning on Flower: factored layers exchanged as factors.

``run_federate`` simulates a federation on one machine; ``wasi_tool.federated.apps`` holds the
Flower ServerApp and ClientApp for a real deployment (SuperLink + SuperNodes). Flower is
imported only by the modules that use it (apps, simulation, server at run time).
"""

from wasi_tool.federated.config import FederateConfig
from wasi_tool.federated.run import run_federate

__all__ = ["FederateConfig", "run_federate"]
