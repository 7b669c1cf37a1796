"""Job defaults that torch-free entry points need (the CLI's help text); :class:`swarm.job_spec.JobSpec`
uses them, so each is defined once, here.

Nothing here may import torch or numpy: ``swarm models`` / ``swarm status`` must start fast
(tests/integration/cli/test_cli_first_hour.py checks it).
"""

from __future__ import annotations

# Spot checks (docs/security.md "Verification"): the chance that a micro-batch of a stage is
# recomputed by a replica of the stage (jobs with replicas only; compressed or not). Chosen from bench/verification.py
# (docs/training.md "Spot checks"): detection of a node corrupting 20% of its tensors within 100
# steps vs the tokens/s the checks cost.
DEFAULT_VERIFY_PROB = 0.05

# Checkpoints (docs/training.md "Checkpoints"): training waits only for a CPU snapshot per checkpoint
# (bench/checkpoint_cost.py: 1.6 ms for the tiny test stage, 0.68-0.74 s for a GPT-2-small stage of 4
# layers on a 2-core CPU); every 50 steps that is ~1% of steps of 1 s or more, and a stage lost with
# no replica redoes at most 49 steps. Writing, the upload and the keeper's copy run in the background.
DEFAULT_CHECKPOINT_EVERY = 50
