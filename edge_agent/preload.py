"""What a local agent imports, loaded once by the fork server that ``bfl run`` forks its
agents from (``orchestrator.experiment.LocalAgents``).

Each agent process would otherwise import numpy, ONNX, ONNX Runtime, PyNaCl, paho-mqtt and
the agent's own modules itself: about 42 MB of heap per process before it does anything.
Forked from one server that imported them, the agents share those pages (docs/benchmarks.md:
the agents' peak PSS in the paper setting, before and after). After the imports the collector is
told to leave these objects alone (``gc.freeze``), so it does not write to their pages in the
agents and they stay shared.

Only the fork server imports this module; an agent started by hand imports what it needs.
"""

import gc

import numpy  # noqa: F401
import onnx  # noqa: F401
import onnxruntime  # noqa: F401

import edge_agent.agent  # noqa: F401
import edge_agent.cli  # noqa: F401
import edge_agent.ml.aggregators  # noqa: F401
import edge_agent.ml.data  # noqa: F401
import edge_agent.ml.onnx_eval  # noqa: F401
import edge_agent.runtime  # noqa: F401

gc.freeze()
