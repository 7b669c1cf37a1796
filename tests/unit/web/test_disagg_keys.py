"""The status page's disaggregation cell reads only keys of `swarm models --json`'s
``disaggregation`` object (swarm/transport/client_records.py DisaggRecord), the mode included."""

from __future__ import annotations

import re
from pathlib import Path

from swarm.transport.client_records import DisaggRecord

APP_JS = Path(__file__).resolve().parents[3] / "coordinator" / "web" / "static" / "app.js"


def test_status_page_reads_the_disaggregation_keys_it_is_given():
    read = set(re.findall(r'own\(dis, "(\w+)"\)', APP_JS.read_text()))
    assert {"mode", "enabled", "reason", "predicted_gain"} <= read
    assert read <= set(DisaggRecord().to_json())
