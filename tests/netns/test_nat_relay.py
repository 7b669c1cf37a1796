"""Volunteers behind real NAT (issue 15): a public namespace with the coordinator and one
reachable node, two home namespaces each behind its own router namespace doing NAT (MASQUERADE,
no inbound connections), WAN links shaped with tc tbf at 100 Mbit/s. Nobody opens a port.

Both home nodes join and are relayed (the coordinator's dial-back fails; it sees them at their
routers' addresses); `swarm status --json` says so, and which links are relayed; a 3-stage
training job with a stage on each home node finishes; a 3-stage inference chain with a stage on
each home node generates the same tokens as one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from swarm.localswarm import child_env, start_coordinator, start_node, wait_until
from tests.helpers.nat import nat_topology
from tests.helpers.procs import FAST_COORDINATOR_ARGS, FAST_NODE_ARGS, CoordinatorHandle, generate_events

pytestmark = pytest.mark.netns

TOKEN = "nat-test-token-0123456789abcdef"


def status_json(coord: CoordinatorHandle) -> dict:
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "status", "--json", "--coordinator", coord.address,
                          "--token", coord.read_token], capture_output=True, text=True, timeout=30, env=child_env())
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.timeout(240)  # ~75 s on an idle 2-core box; room for a loaded one
def test_home_nodes_behind_nat_join_train_and_serve_through_the_relay(tmp_path):
    from swarm.cli.train import upload_files
    from swarm.compression import CodecSpec
    from swarm.inference.sampling import SamplingParams
    from swarm.job_spec import JobSpec
    from swarm.model.testing import _SAMPLE_TEXT, make_tiny_checkpoint
    from tests.multiproc.inference.test_pipeline_generation import reference

    procs = []
    with nat_topology(num_homes=2, rate="100mbit") as net:
        try:
            proc, ready = start_coordinator(tmp_path / "coord", host="0.0.0.0", prefix=net.public.prefix,
                                            extra_args=FAST_COORDINATOR_ARGS + ["--token", TOKEN])
            procs.append(proc)
            coord = CoordinatorHandle(proc=proc, state_dir=tmp_path / "coord", port=int(ready["port"]),
                                      http_port=int(ready["http_port"]), token=ready["token"],
                                      admin_token=ready["admin_token"], read_token=ready["read_token"],
                                      host=net.public_ip)
            assert int(ready["relay_port"]) > 0
            where = {"public": net.public, "home0": net.homes[0], "home1": net.homes[1]}
            ids = {}
            for name, ns in where.items():
                p, r = start_node(coord.address, coord.token, tmp_path / name, name=name, host="0.0.0.0",
                                  prefix=ns.prefix, extra_args=FAST_NODE_ARGS)
                procs.append(p)
                ids[name] = r["node_id"]

            def settled():
                nodes = {n["name"]: n for n in status_json(coord)["nodes"] if n["state"] == "online"}
                return len(nodes) == 3 and all(n["reachability"] != "pending" for n in nodes.values()) and nodes

            nodes = wait_until(settled, 30, message="three nodes online, dialled back")
            assert nodes["public"]["reachability"] == "direct"
            for i in (0, 1):
                home = nodes[f"home{i}"]
                # relayed, or already punched towards the other home node (link probes start at once)
                assert home["reachability"] in ("relayed", "punched") and home["relay"] == "coordinator", home
                # the coordinator sees the node at its router's public address, not its private one
                assert home["observed_address"].split(":")[0] == net.homes[i].router_wan_ip
                assert home["peer_address"] == f"{net.public_ip}:{ready['relay_port']}"
            # the startup log says what was found and that nothing is to be opened by hand
            log = (tmp_path / "home0.log").read_text()
            assert "not reachable at 192.168.1.2:" in log and "nothing to open by hand" in log

            # links are measured over the path they take; status names it
            def paths():
                links = status_json(coord)["links"]
                by = {(lk["src"], lk["dst"]): lk["path"] for lk in links}
                return len(by) >= 6 and by

            by = wait_until(paths, 60, message="all six links measured")
            assert by[(ids["public"], ids["home0"])] == "relayed"  # into a home: through the relay
            assert by[(ids["home1"], ids["public"])] == "direct"  # out of a home: dialled directly
            # between the two home nodes the hole was punched (TCP simultaneous open through both NATs)
            assert by[(ids["home0"], ids["home1"])] == by[(ids["home1"], ids["home0"])] == "punched", by
            nodes = {n["name"]: n for n in status_json(coord)["nodes"]}
            assert nodes["home0"]["reachability"] == nodes["home1"]["reachability"] == "punched"
            assert nodes["home0"]["metrics"]["punch_successes"] >= 1

            # a 3-stage training job: a stage on each node, so on each home node
            make_tiny_checkpoint(tmp_path / "model", num_layers=3, hidden_size=32, num_heads=4,
                                 max_position_embeddings=64)
            (tmp_path / "data.txt").write_text(_SAMPLE_TEXT * 2)
            spec = JobSpec(steps=4, batch_size=8, micro_batch_size=2, seq_len=32, lr=3e-3, codec=CodecSpec.parse("none"),
                           num_stages=3, num_replicas=1, peer_timeout_s=30.0)
            with coord.client() as client:
                job = client.submit_job(spec, upload_files(tmp_path / "model", tmp_path / "data.txt"))
                job = wait_until(lambda: (j := client.get_job(job.id)).state in ("succeeded", "failed") and j, 100,
                                 message="job ends").detail
            assert job["state"] == "succeeded", job["reason"]
            placed = {d for st in job["plan"]["stages"] for d in st["devices"]}
            assert {ids["home0"], ids["home1"]} <= placed, job["plan"]

            # a 3-stage inference chain through the relays generates what one process does
            from tokenizers import Tokenizer

            ckpt = tmp_path / "ckpt"
            cfg = make_tiny_checkpoint(ckpt, "llama", num_layers=3, hidden_size=64, num_heads=4, seed=1)
            info = coord.serve(ckpt, name="tiny", num_replicas=1, num_stages=3, max_seq_len=128, sessions_per_replica=2)
            assert {s["node_id"] for s in info["replicas"][0]["stages"]} == set(ids.values())
            tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
            params = SamplingParams(max_new_tokens=12)
            prompt = "The swarm pools volunteer"
            want = reference(ckpt, tok.encode(prompt).ids, params, cfg.eos_token_id)
            got = [t for ev in generate_events(coord, model="tiny", prompt=prompt, params=params, timeout_s=60)
                   for t in ev.token_ids]
            assert got == want
        finally:
            for p in reversed(procs):
                p.stop()
