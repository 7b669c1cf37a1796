"""A swarm process forks hivemind's children while its gRPC threads are busy: gRPC's fork
handlers must be off there (they deadlocked a node's parent or its averager child now and then on
a loaded box, and a 2-replica job then hung for the averaging setup's 60 s)."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import os, threading
    import swarm  # first, as every swarm entry point does
    import grpc
    from concurrent import futures
    server = grpc.server(futures.ThreadPoolExecutor(4))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stop = threading.Event()
    def call():  # unknown method: UNIMPLEMENTED, over and over
        while not stop.is_set():
            try:
                channel.unary_unary("/x.Y/Z")(b"", timeout=0.2)
            except grpc.RpcError:
                pass
    threads = [threading.Thread(target=call, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(20):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    stop.set()
    print("forked 20 times")
""")


@pytest.mark.timeout(60)
def test_forking_with_busy_grpc_threads_runs_no_grpc_fork_handlers():
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=50, env=env)
    assert out.returncode == 0, out.stderr
    assert "forked 20 times" in out.stdout
    # the message gRPC's pre-fork handler prints when it runs while other threads are in gRPC
    assert "skipping fork() handlers" not in out.stderr, out.stderr[-2000:]
