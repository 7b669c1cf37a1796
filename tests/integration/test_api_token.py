"""State-changing user calls (serve, unserve, submit, cancel) need the coordinator's token."""

from __future__ import annotations

import pytest

from swarm.errors import AuthError, CapacityError
from swarm.model.testing import make_tiny_checkpoint
from swarm.transport.coordinator_client import CoordinatorClient
from tests.helpers.foundation import inprocess_coordinator


@pytest.mark.timeout(60)
def test_serving_and_unserving_need_the_token(tmp_path):
    ckpt = tmp_path / "ckpt"
    make_tiny_checkpoint(ckpt, "gpt2", num_layers=2, hidden_size=32, num_heads=2, seed=1)
    with inprocess_coordinator(tmp_path / "coord", plugins=("coordinator.inference",)) as app:
        address = f"127.0.0.1:{app.grpc_port}"
        for bad in (None, "wrong-token", "x" * 500):
            with CoordinatorClient(address, token=bad, ca_pem=app.ca.ca_pem) as client:  # TLS trusting the app's CA
                with pytest.raises(AuthError, match="needs the coordinator's token"):
                    client.upload_model(ckpt, name="tiny", timeout_s=20)
                with pytest.raises(AuthError, match="needs the coordinator's token"):
                    client.unserve_model("tiny")
        # nothing was stored by the refused uploads; reading needs the read token
        reader = CoordinatorClient(address, token=app.read_token, ca_pem=app.ca.ca_pem)
        assert reader.list_models() == []
        # with the admin token the upload is accepted and stored; with no nodes it then fails on capacity
        with CoordinatorClient(address, token=app.admin_token) as client:
            with pytest.raises(CapacityError, match="no nodes are available"):
                client.upload_model(ckpt, name="tiny", timeout_s=20)
            assert [m.name for m in reader.list_models()] == ["tiny"]
            assert client.unserve_model("tiny") is True
        assert reader.list_models() == []
        reader.close()
