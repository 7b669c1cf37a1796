"""Job defaults that torch-free entry points need (the CLI's help text); :class:`swarm.job_spec.JobSpec`
uses them, so each is defined once, here.

Nothing here may import torch or numpy: ``swarm models`` / ``swarm status`` must start fast
(tests/integration/cli/test_cli_first_hour.py checks it).
"""

from __future__ import annotations

# Spot checks (docs/security.md "Verification"): the chance that a micro-batch of a stage is
# recomputed by a replica of the stage (jobs with replicas only). Chosen from bench/verification.py
# (docs/training.md "Spot checks"): detection of a node corrupting 20% of its tensors within 100
# steps vs the tokens/s the checks cost.
DEFAULT_VERIFY_PROB = 0.05
