"""``swarm train``, ``swarm jobs``, ``swarm job ID``, ``swarm cancel ID``: training jobs.

``swarm train [--coordinator HOST:PORT] [--token T] --model CONFIG.json|CHECKPOINT_DIR --data PATH
[--tokenizer tokenizer.json] [--epochs E | --steps N] [--batch-size B] [--micro-batch-size b] [--seq-len S] [--lr LR]
[--compression SPEC] [--checkpoint-every K] [--out DIR] [--follow] [--json]`` uploads the data
and the starting model to the coordinator and prints the job id. ``--follow`` shows a progress
bar (step, loss, tokens/s, ETA) until the job ends and exits 1 if it failed or was cancelled.
``--out DIR`` waits for the end too and writes the trained HF checkpoint there.
Extra flags: ``--stages``/``--replicas`` fix the pipeline shape (default: the planner picks),
``--schedule``, ``--warmup-steps``, ``--weight-decay``, ``--grad-clip``, ``--seed``,
``--peer-timeout-s``, ``--name``. ``swarm train --resume JOB_ID [flags]`` starts a new job from
an ended job's last complete checkpoint (weights, AdamW state, data position) with its spec,
changed by the flags given. ``swarm job ID --download DIR`` writes a job's model (the final one,
else its last complete checkpoint) as an HF checkpoint. ``--follow`` prints the job's events
(node lost, re-planned, resumed, ...) as they happen; see :mod:`swarm.cli.follow`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from swarm.cli.common import add_common_flags, connect
from swarm.cli.follow import _num, event_line, follow, progress_line  # noqa: F401 -- progress_line: re-exported
from swarm.errors import ConfigError, InvalidRequestError, SwarmError
from swarm.job_defaults import DEFAULT_CHECKPOINT_EVERY, DEFAULT_VERIFY_PROB

MODEL_FILES = ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "merges.txt")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="submit a training / fine-tuning job to the swarm")
    add_common_flags(p, json=True)
    p.add_argument("--model", default=None, help="config.json (fresh weights) or an HF checkpoint directory")
    p.add_argument("--data", default=None, help="a text file or a directory of text files (UTF-8)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="a tokenizer.json to train with (uploaded as checkpoint/tokenizer.json; default: the "
                        "model directory's, else the byte-level tokenizer, which needs vocab_size 256..264)")
    p.add_argument("--resume", default=None, metavar="JOB_ID",
                   help="start from an ended job's last complete checkpoint (weights, optimizer state, data "
                        "position) with its spec; other flags given change it (not --seq-len/--batch-size/--seed)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, default=None, help="passes over the data (default 1)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step over all replicas (default 8)")
    p.add_argument("--micro-batch-size", type=int, default=2, help="sequences per micro-batch (default 2)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    p.add_argument("--compression", default="none",
                   help="boundary codec: none, direct:fw=8,bw=8, aqsgd:fw=4,bw=8, aqsgd:fw=2,bw=4 (default none)")
    p.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY,
                   help=f"steps between checkpoints (0: only at the end; default {DEFAULT_CHECKPOINT_EVERY})")
    p.add_argument("--out", type=Path, default=None, help="write the trained HF checkpoint here when done")
    p.add_argument("--follow", action="store_true", help="show progress until the job ends")
    p.add_argument("--stages", type=int, default=0, help="pipeline stages (default: planner decides)")
    p.add_argument("--replicas", type=int, default=0, help="data-parallel replicas (default: planner decides)")
    p.add_argument("--schedule", choices=("1f1b", "gpipe"), default="1f1b")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="the whole model's max gradient norm, applied per tensor by its share of the parameters (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer-timeout-s", type=float, default=30.0, help="how long a stage waits for a neighbour")
    p.add_argument("--node-wait-s", type=float, default=3600.0,
                   help="how long a job that lost a stage no idle node can replace waits for one (0: fail at once)")
    p.add_argument("--verify-prob", type=float, default=None,
                   help="chance a micro-batch is recomputed by a replica of its stage, with --replicas >= 2 "
                        f"(default {DEFAULT_VERIFY_PROB}; 0 = off; see docs/security.md 'Verification')")
    p.add_argument("--name", default="")
    p.set_defaults(func=run_train)

    p = subparsers.add_parser("jobs", help="list training jobs")
    add_common_flags(p, json=True)
    p.set_defaults(func=run_jobs)

    p = subparsers.add_parser("job", help="show one training job")
    add_common_flags(p, json=True)
    p.add_argument("job_id")
    p.add_argument("--download", type=Path, default=None, metavar="DIR",
                   help="write the job's model here as an HF checkpoint: the final one if it succeeded, else its "
                        "last complete checkpoint (failed and cancelled jobs too)")
    p.set_defaults(func=run_job)

    p = subparsers.add_parser("cancel", help="cancel a training job")
    add_common_flags(p, json=True)
    p.add_argument("job_id")
    p.set_defaults(func=run_cancel)


# The CLI reads this much of each data file to refuse a binary or empty one before uploading;
# the coordinator checks every byte again.
LOCAL_CHECK_BYTES = 1 << 20


def _check_data_file(f: Path) -> None:
    from swarm.pipeline.data import decode_text  # numpy only: no torch on this path

    with open(f, "rb") as fh:
        head = fh.read(LOCAL_CHECK_BYTES)
    if len(head) == LOCAL_CHECK_BYTES:  # may end inside a UTF-8 character: drop the incomplete tail
        head = head[: len(head) - 4]
    decode_text(head, f)


def _check_config(f: Path) -> None:
    try:
        cfg = json.loads(f.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"{f} is not a JSON file ({exc}); pass an HF config.json") from exc
    if not isinstance(cfg, dict):
        raise InvalidRequestError(f"{f} holds a JSON {type(cfg).__name__}, not an object; pass an HF config.json")


def upload_files(model: Path, data: Path, tokenizer: Path | None = None) -> list:
    """The files a job carries, named ``checkpoint/...`` and ``data/...``. Checks locally what it
    can (config.json is JSON, data files are non-empty text) so mistakes show before an upload.
    ``tokenizer``: a tokenizer.json uploaded as ``checkpoint/tokenizer.json`` (over the model
    directory's). Raises InvalidRequestError naming the user's file."""
    from swarm.transport.coordinator_client import UploadFile

    if not data.exists():
        raise InvalidRequestError(f"--data {data} does not exist; pass a text file or a directory of text files")
    if not model.exists():
        raise InvalidRequestError(f"--model {model} does not exist; pass a config.json or a checkpoint directory")
    if tokenizer is not None and not tokenizer.is_file():
        raise InvalidRequestError(f"--tokenizer {tokenizer} is not a file; pass a tokenizer.json")
    files = []
    if model.is_file():
        _check_config(model)
        files.append(UploadFile(path=model, name="checkpoint/config.json"))
    else:
        if not (model / "config.json").is_file():
            raise InvalidRequestError(f"--model {model} has no config.json; is it an HF checkpoint directory?")
        _check_config(model / "config.json")
        for f in sorted(model.iterdir()):
            if tokenizer is not None and f.name == "tokenizer.json":
                continue  # --tokenizer replaces it
            if f.is_file() and (f.name in MODEL_FILES or f.suffix == ".safetensors"):
                files.append(UploadFile(path=f, name=f"checkpoint/{f.name}"))
    if tokenizer is not None:
        files.append(UploadFile(path=tokenizer, name="checkpoint/tokenizer.json"))
    if data.is_file():
        texts = [(data, f"data/{data.name}")]
    else:
        texts = [(p, "data/" + p.relative_to(data).as_posix()) for p in sorted(data.rglob("*")) if p.is_file()]
        if not texts:
            raise InvalidRequestError(f"--data directory {data} holds no files")
    for f, name in texts:
        _check_data_file(f)
        files.append(UploadFile(path=f, name=name))
    if all(f.stat().st_size <= LOCAL_CHECK_BYTES and not f.read_bytes().strip() for f, _ in texts):
        what = texts[0][0] if len(texts) == 1 else data
        raise InvalidRequestError(f"--data {what} holds no text (empty or only whitespace); pass a text file with content")
    return files


def job_spec_from_args(args: argparse.Namespace):
    """The :class:`~swarm.job_spec.JobSpec` the flags ask for. Raises InvalidRequestError naming
    the flag to fix."""
    from swarm.compression.spec import CodecSpec  # imports torch: only when a job is submitted
    from swarm.job_spec import JobSpec

    try:
        codec = CodecSpec.parse(args.compression)
    except ConfigError as exc:
        raise ConfigError(f"--compression: {exc}") from None
    return JobSpec(
        name=args.name, steps=args.steps or 0, epochs=args.epochs or 0.0, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, seq_len=args.seq_len, lr=args.lr, codec=codec,
        checkpoint_every=args.checkpoint_every, seed=args.seed, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, schedule=args.schedule, num_stages=args.stages,
        num_replicas=args.replicas, peer_timeout_s=args.peer_timeout_s, node_wait_s=args.node_wait_s,
        **({} if args.verify_prob is None else {"verify_prob": args.verify_prob}),
    )


def resumed_spec(args: argparse.Namespace, source: dict):
    """The spec of a ``--resume``d job: the source job's spec (its JSON form) with the flags whose
    values differ from their defaults on top (a flag given with its default value changes
    nothing). Raises InvalidRequestError naming the flag."""
    from swarm.job_spec import JobSpec

    given = job_spec_from_args(args).to_dict()
    default = JobSpec().to_dict()  # the flags' defaults are JobSpec's
    merged = dict(source)
    changed = {k: v for k, v in given.items() if v != default.get(k)}
    if "epochs" in changed or "steps" in changed:  # one of the two sets the length
        merged["steps"], merged["epochs"] = 0, 0.0
    merged.update(changed)
    return JobSpec.from_dict(merged)


def run_train(args: argparse.Namespace) -> int:
    try:
        if args.resume:
            if args.model or args.data or args.tokenizer:
                raise InvalidRequestError("--resume starts from the job's checkpoint, tokenizer and data; leave out "
                                          "--model, --data and --tokenizer")
        elif not (args.model and args.data):
            raise InvalidRequestError("pass --model CONFIG.json|CHECKPOINT_DIR and --data PATH (or --resume JOB_ID)")
        else:  # build and check everything locally before connecting
            spec = job_spec_from_args(args)
            files = upload_files(Path(args.model), Path(args.data), args.tokenizer)
        with connect(args) as client:
            if args.resume:
                source = client.get_job(args.resume).detail
                spec = resumed_spec(args, source["spec"])
                job = client.resume_job(args.resume, spec)
            else:
                job = client.submit_job(spec, files)
            if not args.json:
                print(f"job {job.id} submitted ({job.state}{': ' + job.reason if job.reason else ''})", flush=True)
            if not (args.follow or args.out):
                if args.json:
                    print(json.dumps(job.detail))
                return 0
            job = follow(client, job.id, quiet=args.json or not args.follow)
            if args.out and job.state == "succeeded":
                written = client.download_result(job.id, args.out)
                if not args.json:
                    print(f"checkpoint written to {args.out} ({len(written)} files)")
    except SwarmError as exc:
        print(f"swarm train: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(job.detail))
    elif job.state != "succeeded":
        print(f"job {job.id} {job.state}: {job.reason}", file=sys.stderr)
    return 0 if job.state == "succeeded" else 1


def run_jobs(args: argparse.Namespace) -> int:
    try:
        with connect(args) as client:
            jobs = [j.detail for j in client.list_jobs()]
    except SwarmError as exc:
        print(f"swarm jobs: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"jobs": jobs}))
        return 0
    rows = [("ID", "STATE", "STEP", "LOSS", "TOK/S", "CODEC", "REASON")]
    for j in jobs:
        step = "-" if j.get("step") is None else f"{j['step'] + 1}/{j['total_steps']}"
        rows.append((j["id"], j["state"], step, _num(j.get("loss"), ".4f"), _num(j.get("tokens_per_s"), ".0f"),
                     j.get("spec", {}).get("compression", ""), (j.get("reason") or "")[:60]))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def run_job(args: argparse.Namespace) -> int:
    try:
        with connect(args) as client:
            job = client.get_job(args.job_id).detail
            if args.download:
                written = client.download_result(args.job_id, args.download)
    except SwarmError as exc:
        print(f"swarm job: {exc}", file=sys.stderr)
        return 2
    if args.download and not args.json:
        what = "final model" if job["result_ready"] else f"checkpoint of step {job['last_complete_checkpoint']}"
        print(f"{what} of job {job['id']} written to {args.download} ({len(written)} files)")
        return 0
    if args.json:
        print(json.dumps(job))
        return 0
    print(f"job {job['id']}: {job['state']}" + (f" ({job['reason']})" if job.get("reason") else ""))
    print(progress_line(job))
    spec = job["spec"]
    print(f"model: {job['model']['family']} {job['model']['num_layers']} layers, {job['model']['num_parameters']:,} "
          f"parameters; codec {spec['compression']}; batch {spec['batch_size']} x {spec['seq_len']} tokens")
    for a in job.get("assignments", []):
        print(f"  stage {a['stage']} replica {a['replica']}: layers {a['layers'][0]}-{a['layers'][1] - 1} on "
              f"{a['node_name'] or a['node_id'][:12]}")
    print(f"bytes sent {job['bytes_sent']:,}, saved by compression {job['bytes_saved']:,}")
    if job.get("checkpoints"):
        print(f"checkpoints at steps {sorted({c['step'] for c in job['checkpoints']})}")
    if job.get("resumed_from"):
        print(f"resumed from job {job['resumed_from']['job_id']} at step {job['resumed_from']['step']}")
    for ev in job.get("events") or []:
        print(f"  {time.strftime('%H:%M:%S', time.localtime(ev['at']))} {event_line(ev)}")
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    try:
        with connect(args) as client:
            job = client.cancel_job(args.job_id, "cancelled with swarm cancel")
    except SwarmError as exc:
        print(f"swarm cancel: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(job.detail) if args.json else f"job {job.id}: {job.state}")
    return 0


DEMO_CODEC = "aqsgd:fw=4,bw=8"


def demo_fine_tune(coordinator: str, state_dir: Path, *, token: str, steps: int = 40, out=print) -> int:
    """The README demo's training part: fine-tune a tiny model across the local swarm with AQ-SGD,
    print the loss as it falls, and write the checkpoint under ``state_dir/demo-checkpoint``."""
    from swarm.compression.spec import CodecSpec
    from swarm.job_spec import JobSpec
    from swarm.model.testing import _SAMPLE_TEXT, make_tiny_checkpoint
    from swarm.transport.coordinator_client import CoordinatorClient

    model, data, result = state_dir / "demo-model", state_dir / "demo-data.txt", state_dir / "demo-checkpoint"
    make_tiny_checkpoint(model, num_layers=3, hidden_size=64, num_heads=4, max_position_embeddings=128)
    data.write_text(_SAMPLE_TEXT * 3)
    spec = JobSpec(steps=steps, batch_size=8, micro_batch_size=2, seq_len=32, lr=3e-3, warmup_steps=2,
                   codec=CodecSpec.parse(DEMO_CODEC), num_stages=3, num_replicas=1, checkpoint_every=10,
                   peer_timeout_s=30.0, grad_clip=1.0)
    out(f"fine-tuning a {3}-layer model across 3 nodes with {DEMO_CODEC} (activations as 4-bit changes, "
        f"gradients 8-bit) for {steps} steps ...")
    try:
        with CoordinatorClient(coordinator, token=token) as client:
            job = client.submit_job(spec, upload_files(model, data))
            job = follow(client, job.id, quiet=False, interval_s=0.5)
            if job.state != "succeeded":
                out(f"training job {job.id} {job.state}: {job.reason}")
                return 1
            client.download_result(job.id, result)
    except SwarmError as exc:
        out(f"training failed: {exc}")
        return 1
    losses = [p["loss"] for p in job.detail["progress"]]
    out(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps; sent {job.detail['bytes_sent'] / 1e6:.1f} "
        f"MB, saved {job.detail['bytes_saved'] / 1e6:.1f} MB by compression")
    out(f"checkpoint written to {result} (transformers loads it: AutoModelForCausalLM.from_pretrained)")
    return 0
