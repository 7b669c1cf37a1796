"""`swarm serve`, `swarm models`, `swarm generate`, `swarm unserve`: inference from the command line.

    swarm serve [--coordinator HOST:PORT] [--token T] --model CHECKPOINT_DIR [--replicas R] [--name NAME]
                [--disaggregate [{auto,on,off}]]
    swarm models [--coordinator HOST:PORT] [--json]
    swarm generate [--coordinator HOST:PORT] --model NAME --prompt TEXT [--max-new-tokens N]
                   [--temperature T] [--json]
    swarm unserve [--coordinator HOST:PORT] [--token T] --model NAME

``--coordinator``/``--token`` resolve as in :mod:`swarm.cli.common` (flag, SWARM_* env, 127.0.0.1:7070).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

from swarm.cli.common import add_common_flags, connect
from swarm.errors import SwarmError

if TYPE_CHECKING:  # imported where a command uses it (see below)
    from swarm.inference.params import SamplingParams

# No torch on these paths: they only talk to the coordinator (SamplingParams comes from the
# torch-free swarm.inference.params), so every command starts in well under a second.


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="upload a checkpoint and serve it on the swarm")
    add_common_flags(s, json=True, json_help="print the placement as JSON")
    s.add_argument("--model", required=True, help="HF-format checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    s.add_argument("--name", default=None, help="name clients use (default: the directory name)")
    s.add_argument("--replicas", type=int, default=None,
                   help="replicas (chains) to place; 0: as many as fit (default 1; with --disaggregate on 2: "
                        "the prefill and the decode chains together)")
    s.add_argument("--stages", type=int, default=0, help="exact stages per replica (default 0: placement decides)")
    s.add_argument("--max-seq-len", type=int, default=0,
                   help="context (prompt + new tokens) per session, at most the model's max_position_embeddings "
                        "(default: the model's)")
    s.add_argument("--sessions", type=int, default=8, help="concurrent sessions per replica (default 8)")
    s.add_argument("--objective", choices=("latency", "throughput"), default="latency")
    s.add_argument("--hidden-codec", choices=("none", "int8", "auto"), default="none",
                   help="hidden states between stages: raw, 8-bit, or auto (8-bit on links measured < 100 Mbit/s)")
    s.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="weights on the nodes")
    s.add_argument("--verify-prob", type=float, default=None,
                   help="fraction of session steps spot-checked on another replica (docs/security.md); "
                        "0: off (default 0.05; needs --replicas >= 2)")
    s.add_argument("--routes", action="store_true",
                   help="per-request routes: any replica of a stage may feed any replica of the next, each session "
                        "takes the route predicted fastest, a lost node re-routes only its stage (no spot checks)")
    s.add_argument("--disaggregate", nargs="?", choices=("auto", "on", "off"), const="on", default="auto",
                   help="prefill prompts on the compute-richest chain(s), move each session's KV cache to decode "
                        "chain(s) and decode there. on (also the bare flag): always (needs --replicas >= 2 in total; "
                        "no --routes); off: never; auto (default): only when the options allow it "
                        "(no --routes, --replicas 0 or >= 2) and the placement predicts a throughput gain of 1.15x "
                        "or more from the nodes' measured TFLOPS and memory bandwidth; spot checks replay on the "
                        "prefill chains; `swarm models` says why it did or did not")
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser("models", help="list served models and where their layers are")
    add_common_flags(m, json=True)
    m.set_defaults(func=cmd_models)

    u = sub.add_parser("unserve", help="stop serving a model")
    add_common_flags(u)
    u.add_argument("--model", required=True)
    u.set_defaults(func=cmd_unserve)

    g = sub.add_parser("generate", help="generate text with a served model (streams tokens)")
    add_common_flags(g, json=True, json_help="print one JSON object at the end")
    g.add_argument("--model", required=True, help="served model name (see `swarm models`)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.set_defaults(func=cmd_generate)


def _print_model(m) -> None:
    m = m.to_json()
    rc = m["replica_count"]
    print(f"{m['name']}: {m['family']} {m['num_layers']} layers, {m['state']}, digest {m['digest'][:12]}, "
          f"context {m['max_seq_len']}, replicas {rc['healthy']}/{rc['requested']} healthy"
          + (f" ({m['error']})" if m.get("error") else ""))
    if m.get("healing"):
        print(f"  healing: {m['healing']}")
    v = m["verification"]
    if v["verify_prob"] > 0:
        print(f"  spot checks: {v['verify_prob']:g} of steps; {v['checks']} done, {v['failed']} disagreed, "
              f"{v['void']} void (no other chain or referee budget); {v.get('referee_checks', 0)} by the "
              f"coordinator's referee, {v.get('referee_void', 0)} windows over its budget")
    if v.get("probation"):
        print(f"  probation (every window of their chains checked): {', '.join(n[:12] for n in v['probation'])}")
    for r in m["replicas"]:
        chain = " -> ".join(f"{s['node_id'][:10]}@{s['address']}[{s['first_layer']}:{s['last_layer_excl']})" for s in r["stages"])
        print(f"  replica {r['replica']} ({r['state']}, ~{r['predicted_latency_s'] * 1e3:.2f} ms/token): {chain}")
    d = m["disaggregation"]
    if d["reason"]:
        sides = (f": prefill {', '.join(n[:10] for n in d['prefill_nodes'])}; decode "
                 f"{', '.join(n[:10] for n in d['decode_nodes'])}; {d['num_handoffs']} KV hand-off(s), "
                 f"{d['kv_bytes_moved']} bytes moved" if d["enabled"] else "")
        mode = f" (--disaggregate {d['mode']})" if d.get("mode") else ""
        print(f"  disaggregation {'on' if d['enabled'] else 'off'}{mode}{sides}")
        print(f"    {d['reason']}")
    for r in m["routes"]:
        hops = " -> ".join(f"r{i}:{n[:10]}" for i, n in zip(r["replicas"], r["node_ids"] or [""] * len(r["replicas"])))
        print(f"  route {hops}: {r['sessions']} session(s), ~{r['predicted_s_per_token'] * 1e3:.2f} ms/token predicted")


def cmd_serve(args) -> int:
    from swarm.transport.coordinator_client import ServeOptions, checkpoint_files

    try:
        model_dir = Path(args.model)
        files = checkpoint_files(model_dir)
        total = sum(p.stat().st_size for p in files)
        name = args.name or model_dir.resolve().name
        sent = [0, time.monotonic()]

        def progress(n: int) -> None:
            sent[0] += n
            if sys.stderr.isatty():
                dt = max(time.monotonic() - sent[1], 1e-6)
                print(f"\ruploading {sent[0] / 2**20:.1f}/{total / 2**20:.1f} MiB ({sent[0] / dt / 2**20:.1f} MiB/s)",
                      end="", file=sys.stderr, flush=True)

        options = ServeOptions(
            num_replicas=args.replicas if args.replicas is not None else 2 if args.disaggregate == "on" else 1,
            num_stages=args.stages, max_seq_len=args.max_seq_len,
            sessions_per_replica=args.sessions, objective=args.objective, hidden_codec=args.hidden_codec,
            dtype=args.dtype, verify_prob=args.verify_prob, routes=args.routes, disaggregate=args.disaggregate,
        )
        with connect(args) as client:
            info = client.upload_model(model_dir, name=name, options=options, on_bytes=progress)
    except SwarmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if sys.stderr.isatty():
        print(file=sys.stderr)
    if args.json:
        print(json.dumps(info.to_json(), indent=2))
    else:
        _print_model(info)
    return 0


def cmd_models(args) -> int:
    try:
        with connect(args) as client:
            models = client.list_models()
    except SwarmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"models": [m.to_json() for m in models]}, indent=2))
    elif not models:
        print("no models are served; start one with `swarm serve --model DIR`")
    else:
        for m in models:
            _print_model(m)
    return 0


def cmd_unserve(args) -> int:
    try:
        with connect(args) as client:
            removed = client.unserve_model(args.model)
    except SwarmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("removed" if removed else f"model {args.model!r} was not served")
    return 0


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationResult:
    model: str
    text: str
    token_ids: tuple[int, ...]
    time_to_first_token_s: float
    tokens_per_s: float
    finish_reason: str
    num_replays: int


def run_generation(client, *, model: str, prompt: str, params: SamplingParams, on_text=None) -> GenerationResult:
    """Stream one generation through ``client`` (a CoordinatorClient); ``on_text`` gets each new
    piece of text. Raises SwarmError."""
    t0 = time.perf_counter()
    first = last = None
    ids: list[int] = []
    text: list[str] = []
    finish, replays = "", 0
    for ev in client.generate(model=model, prompt=prompt, params=params):
        now = time.perf_counter()
        if first is None and ev.token_ids:
            first = now
        last = now
        ids.extend(ev.token_ids)
        text.append(ev.text)
        if on_text is not None and ev.text:
            on_text(ev.text)
        if ev.finish_reason:
            finish, replays = ev.finish_reason, ev.num_replays
    ttft = (first - t0) if first is not None else float("nan")
    decode_s = (last - first) if first is not None and last is not None else 0.0
    tps = (len(ids) - 1) / decode_s if len(ids) > 1 and decode_s > 0 else float("nan")
    return GenerationResult(model=model, text="".join(text), token_ids=tuple(ids), time_to_first_token_s=ttft,
                            tokens_per_s=tps, finish_reason=finish, num_replays=replays)


def cmd_generate(args) -> int:
    from swarm.inference.params import SamplingParams

    printed = [False]
    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                max_new_tokens=args.max_new_tokens, stop=tuple(args.stop))
        # printed[0]: whether any text reached stdout (then end that line before an error message)
        def on_text(t: str) -> None:
            printed[0] = True
            print(t, end="", flush=True)

        with connect(args) as client:
            res = run_generation(client, model=args.model, prompt=args.prompt, params=params,
                                 on_text=None if args.json else on_text)
    except SwarmError as exc:
        if printed[0]:
            print(flush=True)  # end the partial line of text on stdout; the error goes to stderr
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"model": res.model, "text": res.text, "token_ids": list(res.token_ids),
                          "time_to_first_token_s": res.time_to_first_token_s, "tokens_per_s": res.tokens_per_s,
                          "finish_reason": res.finish_reason, "num_replays": res.num_replays}))
    elif printed[0]:
        print()
    return 0
