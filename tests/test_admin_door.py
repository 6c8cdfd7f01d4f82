"""The attacker's probe, with real processes: a stranger who holds only the consortium's CA
certificate and can reach the sites' port cannot administer the federation, and a site
serves only runs its pinned coordinator signed."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from fedmed.config import RunSettings
from fedmed.data.make_sites import export_sites, synthetic_sites
from fedmed.deploy.certificates import make_dev_certificates, make_site_key
from fedmed.deploy.launch import write_app, write_flower_home
from fedmed.deploy.processes import child_environ
from fedmed.run_signing import RunRefused, check_run, make_coordinator_key, sign_run
from fedmed.rundir import RunDirectory
from tests.federation_helpers import BIN, Federation

pytestmark = pytest.mark.e2e  # real Flower processes or fedmed-simulate


CONNECTION = "fedmed"  # the stranger's Flower connection name


@pytest.fixture(scope="module")
def sites_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hospitals") / "sites"
    images, parts = synthetic_sites(120, 2, alpha=None, size=32, seed=3)
    export_sites(images, parts, out)
    return out


def stranger(tmp: Path, certificates: Path, port: int, *args: str) -> subprocess.CompletedProcess:
    """A ``flwr`` command by someone with the CA certificate and the sites' address only."""
    env = write_flower_home(tmp / f"stranger-flwr-{args[0]}", f"localhost:{port}", certificates / "ca.crt")
    return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True,
                          env=child_environ(env), timeout=120)


def succeeded(result: subprocess.CompletedProcess) -> bool:
    """Whether a ``flwr --format json`` command reported success."""
    try:
        return json.loads(result.stdout).get("success") is True
    except (ValueError, AttributeError):
        return False


def test_a_stranger_with_the_ca_certificate_cannot_administer_the_federation_and_a_site_refuses_unsigned_runs(
        tmp_path, sites_dir):
    certificates = tmp_path / "certs"
    make_dev_certificates(certificates, ["localhost", "127.0.0.1"])
    other_key = make_coordinator_key(tmp_path / "other-coordinator")[1]
    make_site_key(tmp_path / "keys", "intruder")
    federation = Federation(tmp_path, sites_dir, certificates)
    run_dir = RunDirectory(tmp_path / "run")
    try:
        federation.start_server("--rounds", "3", "--min-sites", "1", "--run-dir", str(run_dir.path),
                                "--round-timeout", "120")
        federation.start_client("site-1")
        # site-2 pinned another coordinator's key: every run of this coordinator is foreign to it
        federation.start_client("site-2", "--coordinator-key", str(other_key))
        deadline = time.monotonic() + 120
        while not run_dir.flower_runs() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert run_dir.flower_runs(), federation.output("server")
        real_run = str(run_dir.flower_runs()[0])
        port = federation.port
        app = write_app(tmp_path / "stranger-app", RunSettings(rounds=1, run_id="run-stranger"))
        commands = {
            "ls": ["ls", CONNECTION],
            "register": ["supernode", "register", str(tmp_path / "keys" / "intruder.pub"), CONNECTION],
            "run": ["run", str(app), CONNECTION],
            "stop": ["stop", real_run, CONNECTION],
        }
        # All at once: the tiny real run must still be going (and its port open) when they ask.
        with ThreadPoolExecutor(len(commands)) as pool:
            asked = {name: pool.submit(stranger, tmp_path, certificates, port, *command, "--format", "json")
                     for name, command in commands.items()}
            probes = {name: future.result() for name, future in asked.items()}
        with httpx.Client(verify=ssl.create_default_context(cafile=certificates / "ca.crt")) as client:
            raw = client.post(f"https://localhost:{port}/v1/control/list-runs", content=b"")
        assert federation.wait_server(600) == 0, federation.output("server")
    finally:
        federation.stop_all()

    for name, result in probes.items():
        assert not succeeded(result), f"flwr {name} worked for a stranger: {result.stdout}"
        assert "404 Not Found" in result.stdout + result.stderr, f"flwr {name}: {result.stdout}{result.stderr}"
    assert raw.status_code == 404
    gateway_log = (run_dir.path / "logs" / "gateway.log").read_text()
    assert "refused POST /v1/control/" in gateway_log
    # the real run completed all its rounds with site-1, and it is the only run the SuperLink had
    rounds = [r for r in run_dir.metrics() if r["event"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2, 3] and all(r["trained"] == ["site-1"] for r in rounds)
    assert len(run_dir.flower_runs()) == 1
    # site-2 refused every message, read and spent nothing
    assert not federation.ledger("site-2").exists()
    assert "refused: run" in federation.output("site-2") and "not signed by the coordinator" in \
        federation.output("site-2")
    assert federation.ledger("site-1").exists()


def test_a_site_serves_only_runs_its_coordinator_signed_unchanged_and_of_its_federation(tmp_path):
    private, public = make_coordinator_key(tmp_path / "coordinator")
    other_private, _ = make_coordinator_key(tmp_path / "other")
    run = RunSettings(run_id="run-1", federation_name="chest-2026", rounds=30)
    signed = sign_run(run, private)
    check_run(signed, public)
    check_run(signed, public, "chest-2026")
    check_run(RunSettings.from_flower(json.loads(json.dumps(signed.to_flower()))), public)  # as Flower carries it
    refused = {
        "unsigned": run,
        "another coordinator": sign_run(run, other_private),
        "one setting changed": replace(signed, rounds=1),
        "signature of another run": replace(sign_run(replace(run, run_id="run-2"), private), run_id="run-1"),
        "garbage signature": replace(signed, run_signature="not base64!"),
    }
    for candidate in refused.values():
        with pytest.raises(RunRefused):
            check_run(candidate, public)
    with pytest.raises(RunRefused, match="federation 'chest-2026'.*only 'lung-2027'"):
        check_run(signed, public, "lung-2027")
    with pytest.raises(ValueError, match="not an Ed25519 public key|cannot read"):
        check_run(signed, private)  # a private key file where the public one belongs


def test_fedmed_client_over_tls_needs_a_pinned_coordinator_key(tmp_path):
    make_dev_certificates(tmp_path / "certs", ["localhost"])
    (tmp_path / "data" / "normal").mkdir(parents=True)
    base = [str(BIN / "fedmed-client"), "--server", "localhost:1", "--data", str(tmp_path / "data"), "--site", "a",
            "--root-certificates", str(tmp_path / "certs" / "ca.crt"), "--state-dir", str(tmp_path / "state")]
    result = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--coordinator-key" in result.stderr
    result = subprocess.run([*base, "--coordinator-key", str(tmp_path / "certs" / "server.key")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "server.key" in result.stderr and "coordinator.pub" in result.stderr


def test_the_gateway_forwards_only_fleet_calls_and_bounds_their_size(monkeypatch):
    from fedmed.deploy import gateway

    assert gateway.is_site_request("POST", "/v1/fleet/pull-messages")
    for method, path in [("POST", "/v1/control/start-run"), ("POST", "/v1/runtime/pull-app-inputs"),
                         ("GET", "/v1/fleet/pull-messages"), ("POST", "/v1/fleet/../control/list-runs"),
                         ("GET", "/docs"), ("POST", "/health")]:
        assert not gateway.is_site_request(method, path), (method, path)
    monkeypatch.setattr(gateway, "MAX_BODY", 1000)
    app = gateway.create_app("http://127.0.0.1:9", False)  # nobody listens upstream

    async def statuses() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            return [(await client.post("/v1/control/list-runs", content=b"")).status_code,
                    (await client.get("/docs")).status_code,
                    (await client.post("/v1/fleet/push-object", content=b"x" * 1001)).status_code,
                    (await client.post("/v1/fleet/push-object", content=b"x" * 1000)).status_code]

    # refused before forwarding: 404, 404, 413; forwarded, and nobody answers: 503
    assert asyncio.run(statuses()) == [404, 404, 413, 503]
