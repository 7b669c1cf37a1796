"""A message encoded on a GPU other than the process's current device is copied to the host and
its event waits for exactly those copies (the event is recorded on the tensor's GPU). Found by
reading: the event was recorded on cuda:0 while a node on cuda:1 queued its copies on cuda:1, so
the sender could read pinned buffers before the copies landed. Needs 2 CUDA GPUs."""

import pytest
import torch

from swarm.compression import BoundaryCodec

two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@two_gpus
@pytest.mark.timeout(60)
def test_a_message_on_the_second_gpu_reaches_the_host_whole():
    torch.cuda.set_device(0)  # the current device is NOT the tensor's
    x = torch.randn(64, 256, 1024, device="cuda:1")
    codec = BoundaryCodec("none", key="job/data", device="cuda:1")
    msg = codec.encode_forward(x, list(range(64)))
    host, ready = msg.to_host()
    assert ready is not None
    ready.synchronize()
    cpu = BoundaryCodec("none", key="job/data").encode_forward(x.cpu(), list(range(64)))
    assert host.to_bytes() == cpu.to_bytes()  # 64 MiB: copied whole before the event said so
    assert all(b.device.type == "cpu" for b in host.buffers() if isinstance(b, torch.Tensor))
