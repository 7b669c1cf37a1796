"""The set-up of a stage worker (:class:`WorkerSetup`, a part of
:class:`node.training.worker.StageWorker`): steps 1 and 2 of its protocol.

- The stage's weights (and, resuming, its AdamW state) come from this node's disk or a live
  replica at a fence's re-plan (hash-checked, node/training/state_copy.py), else from the
  coordinator's copy; the first and last stages fetch the job's tokenised data and check its
  content hash against the assignment.
- The boundary codecs (AQ-SGD caches in memory while small, else memory-mapped under the state
  dir), the endpoint for incoming tensors and a sender per neighbour are opened.
- With replicas, the worker meets them through the coordinator's rendezvous (replica 0 first, the
  others join its DHT) and starts a hivemind averager whose group is fixed for the attempt.
- Then it reports ``ready`` and waits for ``start`` (the start fence, node/training/membership.py).

Set-up calls to the coordinator are retried through an outage (``_from_coordinator``). The host
class provides ``a`` (the assignment), ``client``, ``endpoints``, ``node_id``, ``device``,
``state_dir``, ``dir``, ``security``, ``emulate_link_bps``, ``senders``, ``membership``,
``_from_coordinator``, ``_check_stop`` and the tensor side's callbacks (node/training/tensor_io.py).
"""

from __future__ import annotations

import io
import logging
import time

from safetensors.torch import load as st_load

from swarm.errors import InvalidRequestError, NotFoundError, PeerError
from swarm.model.config import ModelConfig
from swarm.model.stage import StageModel
from swarm.pipeline.codecs import make_codec, state_key
from swarm.pipeline.data import BatchOrder, TokenDataset
from swarm.pipeline.optim import OptimConfig, make_optimizer
from swarm.pipeline.optim_state import load_stage_optimizer_state
from swarm.pipeline.stage import StageRunner
from swarm.proto.v1 import training_pb2 as pb

from node.training.exchange import Endpoint
from node.training.sender import PeerSender
from node.training.spotcheck import StageVerifier, VerifyPlan
from node.training.state_copy import StageState, obtain_stage_state

log = logging.getLogger(__name__)
AQSGD_RAM_LIMIT_BYTES = 256 << 20  # per boundary side; larger caches go to disk (memmap)
AVERAGER_SETUP_S = 60.0  # joining the replicas' averaging group (hivemind daemon + DHT), once per attempt
STATE_COPY_TIMEOUT_S = 30.0  # at most this long for a live replica's state before the coordinator's copy


class WorkerSetup:
    """Set-up for :class:`~node.training.worker.StageWorker`."""

    def _setup(self) -> None:
        a, spec = self.a, self.a.spec
        self.config = ModelConfig.from_hf_config(a.model_config)
        # at a fence's re-plan: from this node's disk or a live replica, hash-checked (state_copy.py)
        state = obtain_stage_state(a, node_id=self.node_id, state_dir=self.state_dir, security=self.security,
                                   from_coordinator=self._state_from_coordinator,
                                   timeout_s=min(a.spec.peer_timeout_s, STATE_COPY_TIMEOUT_S))
        module = StageModel(self.config, a.first_layer, a.last_layer_excl, is_first=a.is_first, is_last=a.is_last)
        module.load_hf_state(st_load(state.weights))
        self.module = module.to(self.device)
        self.dataset = None
        if a.is_first or a.is_last:
            raw = self._from_coordinator(lambda: self.client.fetch_data(a.job_id))
            self.dataset = TokenDataset.load(io.BytesIO(raw))
            if self.dataset.key != a.dataset_key or self.dataset.num_samples != a.num_samples:
                raise InvalidRequestError("the job's data does not match its assignment (content hash differs)")
        self.order = BatchOrder(num_samples=a.num_samples, batch_size=spec.batch_size,
                                micro_batch_size=spec.micro_batch_size, num_replicas=a.num_replicas, seed=spec.seed)
        self.M = self.order.num_micro_batches
        self.b, self.S, self.H = spec.micro_batch_size, spec.seq_len, self.config.hidden_size
        self.total_steps = spec.steps
        self._cur_step = a.resume_step
        self.optim_cfg = OptimConfig(lr=spec.lr, weight_decay=spec.weight_decay, warmup_steps=spec.warmup_steps,
                                     total_steps=self.total_steps, min_lr_ratio=spec.min_lr_ratio,
                                     grad_clip=spec.grad_clip, clip_params=self.config.num_parameters())
        self.optimizer = make_optimizer(self.module.parameters(), self.optim_cfg)
        if a.resume_step > 0:
            self._load_optimizer_state(state.optimizer)
        self.runner = StageRunner(self.module, is_first=a.is_first, is_last=a.is_last, loss_scale=1.0 / self.M)
        self.codec_text = str(spec.codec)  # as tensor headers name it (checked by the receiver)
        key = state_key(a.job_id, a.dataset_key)
        # AQ-SGD keeps m(x) per sample and side: in (device) memory while small, else memory-mapped
        # files under the node's state dir.
        cache_bytes = a.num_samples * self.S * self.H * 2
        storage = "ram" if cache_bytes <= AQSGD_RAM_LIMIT_BYTES else str(self.dir / "aqsgd-cache")
        common = dict(key=key, num_samples=a.num_samples, row_shape=(self.S, self.H), device=self.device,
                      storage=storage)
        # one codec per neighbour holder (a stage shared within the pipeline, coordinator/jobs/helpers.py):
        # AQ-SGD's m(x) is per link, and each link sees the samples of the micro-batches its holder runs
        def codecs(side: str, boundary: int, holders: int) -> list:
            return [make_codec(spec.codec, side=side, boundary=boundary, **dict(
                common, storage=storage if storage == "ram" or k == 0 else f"{storage}/h{k}")) for k in range(holders)]
        self.downs = codecs("down", a.stage - 1, max(1, len(a.prev_holders))) if not a.is_first else []
        self.ups = codecs("up", a.stage, max(1, len(a.next_holders))) if not a.is_last else []
        self.timeout_s = spec.peer_timeout_s
        self.endpoint = Endpoint(a.job_id, self._validate, precheck=self._check_header,
                                 authorize=self._authorize_sender, attempt=a.attempt)
        self.endpoints.add(self.endpoint)
        # a sender per neighbour holder of this pipeline (one, unless that stage is shared)
        self.next_senders = [self._sender(p, a.stage + 1) for p in (a.next_holders or (a.next,)) if p is not None]
        self.prev_senders = [self._sender(p, a.stage - 1) for p in (a.prev_holders or (a.prev,)) if p is not None]
        self.verifier = StageVerifier(self, VerifyPlan.from_json(a.verify_json))
        if len(a.stage_replicas) > 1:  # the stage's replicas and helpers average their gradients
            self._start_averager()
        # every worker of the attempt is set up: go
        self.membership.await_start(a.resume_step, state_from=state.source, state_bytes=state.num_bytes)
        log.info("stage worker ready job=%s attempt=%d stage=%d/%d replica=%d/%d layers=[%d,%d) codec=%s steps=%d-%d",
                 a.job_id, a.attempt, a.stage, a.num_stages, a.replica, a.num_replicas, a.first_layer,
                 a.last_layer_excl, self.codec_text, a.resume_step, self.total_steps)

    def _sender(self, peer, stage: int) -> PeerSender:
        sender = PeerSender(peer.address, security=self.security, node_id=peer.node_id,
                            what=f"stage {stage} ({peer.node_id[:12]})", timeout_s=self.timeout_s,
                            emulate_bps=self.emulate_link_bps, on_sent=self._on_sent(peer.node_id))
        self.senders.append(sender)
        return sender

    def _state_from_coordinator(self) -> StageState:
        """The stage's weights (and, resuming, AdamW state) from the coordinator's copy; a checkpoint
        without optimizer state (nodes of an older version) restarts the optimizer."""
        a = self.a
        weights = self._from_coordinator(lambda: self.client.fetch_weights(a.job_id, a.stage))
        optim = None
        if a.resume_step > 0:
            try:
                optim = self._from_coordinator(lambda: self.client.fetch_optimizer_state(a.job_id, a.stage))
            except NotFoundError as exc:
                log.warning("no optimizer state to resume from; AdamW restarts job=%s stage=%d step=%d: %s",
                            a.job_id, a.stage, a.resume_step, exc)
        return StageState(weights=weights, optimizer=optim, source="coordinator",
                          num_bytes=len(weights) + len(optim or b""))

    def _load_optimizer_state(self, blob: bytes | None) -> None:
        """AdamW's moments and step count at the resume step (by HF name: any earlier split works)."""
        a = self.a
        if blob is None:
            return
        step = load_stage_optimizer_state(self.module, self.optimizer, st_load(blob))
        log.info("optimizer state restored job=%s stage=%d resume_step=%d adam_step=%d", a.job_id, a.stage,
                 a.resume_step, step)

    def _start_averager(self) -> None:
        from swarm.pipeline.averaging import ReplicaAverager

        a = self.a
        req = lambda maddrs: pb.RendezvousRequest(job_id=a.job_id, stage=a.stage, replica=a.replica,  # noqa: E731
                                                  maddrs=maddrs, attempt=a.attempt)
        peers: list[str] = []
        # set-up, once per attempt: every replica spawns its hivemind daemon and joins the DHT,
        # which takes seconds on a busy machine; not bounded by the per-step peer timeout
        setup_s = max(self.timeout_s, AVERAGER_SETUP_S)
        deadline = time.monotonic() + setup_s
        if a.replica > 0:  # join the DHT of a replica that started before us (replica 0 starts alone)
            while not peers:
                self._check_stop()
                peers = list(self._from_coordinator(lambda: self.client.rendezvous(req([]))).maddrs)
                if not peers:
                    if time.monotonic() > deadline:
                        raise PeerError(f"replica 0 of stage {a.stage} never joined the rendezvous")
                    time.sleep(0.2)
        me = next((p for p in a.stage_replicas if p.node_id == self.node_id), a.stage_replicas[0])
        host = me.address.rpartition(":")[0] or "127.0.0.1"
        try:
            # a round that cannot form its group gives up after half the peer timeout: the stage's
            # neighbours wait for its next tensor meanwhile, and with the full peer timeout they
            # gave up on it first (seen after a growth fence: a PeerError, then a rollback)
            self.averager = ReplicaAverager(params=list(self.module.parameters()),
                                            prefix=f"{a.job_id}_a{a.attempt}_s{a.stage}",
                                            num_replicas=len(a.stage_replicas),
                                            initial_peers=peers, host=host, timeout_s=self.timeout_s / 2,
                                            setup_timeout_s=setup_s)
        except Exception as exc:  # noqa: BLE001 -- hivemind's (P2PDaemonError: bootstrap peers gone)
            # the replica that started first went away (e.g. it gave up waiting for us): a peer
            # failure the coordinator re-plans, not a fault of this job
            raise PeerError(f"could not join the averaging group of stage {a.stage}'s replicas: {exc}") from exc
        # the group is fixed for the attempt: wait until every replica registered its addresses
        # (their /p2p/ parts are the peer ids the all-reduce runs among; no per-step matchmaking)
        while True:
            self._check_stop()
            known = list(self._from_coordinator(lambda: self.client.rendezvous(req(self.averager.maddrs()))).maddrs)
            try:
                self.averager.set_members(known)
                break
            except ValueError as exc:
                if time.monotonic() > deadline:
                    raise PeerError(f"not all {len(a.stage_replicas)} replicas of stage {a.stage} joined the rendezvous "
                                    f"within {setup_s:.0f} s: {exc}") from exc
                time.sleep(0.2)
        self.averager.wait_for_peers(1, setup_s)
