#!/usr/bin/env python3
"""Start, stop and restart a homeserver under test on loopback.

Used by every black-box suite (tests/js, tests/conformance), so that the
knowledge of how to configure each server lives in one place. Standard library
only: the JavaScript suite calls it as a command, the Python suites import it.

Two kinds of server are supported, picked with the environment variable
HS_KIND:

  tessera  (default)  $TESSERA_NODE_BIN --config <dir>/tessera.toml
  synapse             Synapse from the venv made by scripts/install-synapse.sh

Server differences that tests need to know about (for instance the request
body limit) are data in PROFILES, never special cases in the tests.

Command line (what the JavaScript harness uses):

  hs.py prepare --workdir DIR     write config + data dir, print a JSON launch
                                  description: argv, env, cwd, base_url, ...

The caller then runs argv itself, so that it owns the process and sees its
exit status. The Python side does the same through the Server class below.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVER_NAME = "localhost"

# Request body limit configured for tessera-node in tests. Synapse has no
# equivalent knob for the client API; its fixed limit is in PROFILES.
TESSERA_BODY_LIMIT_BYTES = 65536

# Facts about each server kind that tests may depend on. Keep this the only
# place where the kinds differ.
PROFILES = {
    "tessera": {
        # Largest request body the server accepts (config value above).
        "request_body_bytes_max": TESSERA_BODY_LIMIT_BYTES,
        # How long SIGTERM may take before the process is considered hung.
        "stop_timeout_s": 10,
        "ready_timeout_s": 30,
    },
    "synapse": {
        # Synapse has no setting for this: it caps request bodies at
        # max(200 * 64 KiB, max_upload_size); the generated config keeps
        # max_upload_size below that, so the cap is 200 * 64 KiB.
        "request_body_bytes_max": 200 * 65536,
        "stop_timeout_s": 20,
        "ready_timeout_s": 90,
    },
}


def kind_from_env() -> str:
    kind = os.environ.get("HS_KIND", "tessera").strip().lower() or "tessera"
    if kind not in PROFILES:
        raise SystemExit(f"HS_KIND must be one of {sorted(PROFILES)}, not {kind!r}")
    return kind


# Ports handed out recently, one empty file each, shared by every process
# that runs this module (test suites start servers side by side).
PORT_CLAIMS = Path(tempfile.gettempdir()) / "tessera-test-ports"
# A claim older than this is taken to belong to a finished run.
PORT_CLAIM_STALE_S = 3600


def free_port() -> int:
    """A loopback port no other caller of this function got within the hour.

    The kernel may offer a released port again at once. Two servers started
    side by side on one port would both bind it (tessera-node listens with
    SO_REUSEPORT) and each get part of the other's requests, so every port
    handed out is claimed with a file that only one process can create.
    """
    PORT_CLAIMS.mkdir(parents=True, exist_ok=True)
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        claim = PORT_CLAIMS / str(port)
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return port
        except FileExistsError:
            try:
                if time.time() - claim.stat().st_mtime > PORT_CLAIM_STALE_S:
                    claim.unlink(missing_ok=True)
            except FileNotFoundError:
                pass


def tessera_bin() -> Path:
    raw = os.environ.get("TESSERA_NODE_BIN", "target/debug/tessera-node")
    path = Path(raw)
    if not path.is_absolute():
        path = REPO_ROOT / path
    return path


def synapse_venv() -> Path:
    default = Path.home() / ".cache" / "tessera" / "synapse-venv"
    return Path(os.environ.get("SYNAPSE_VENV", str(default)))


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid TOML basic string


def prepare_tessera(workdir: Path, port: int) -> dict:
    binary = tessera_bin()
    if not binary.exists():
        raise SystemExit(f"tessera-node binary not found at {binary} (set TESSERA_NODE_BIN)")
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    config = workdir / "tessera.toml"
    config.write_text(
        "\n".join(
            [
                f"server_name = {_toml_str(SERVER_NAME)}",
                f"data_dir = {_toml_str(str(data_dir))}",
                f'public_baseurl = "http://127.0.0.1:{port}/"',
                "",
                "[listen]",
                f'address = "127.0.0.1:{port}"',
                "",
                "[registration]",
                "enabled = true",
                "",
                "[auth]",
                "argon2_m_cost_kib = 64",
                "argon2_t_cost = 1",
                "",
                "[rate_limits]",
                "enabled = false",
                "",
                "[runtime]",
                "shards = 2",
                "",
                "[limits]",
                f"request_body_bytes_max = {TESSERA_BODY_LIMIT_BYTES}",
                "",
                # Credentials for /voip/turnServer; nothing listens there, the
                # endpoint only hands out time-limited credentials.
                "[turn]",
                'uris = ["turn:127.0.0.1:3478?transport=udp"]',
                f"shared_secret = {_toml_str(secrets.token_hex(16))}",
                "ttl_secs = 3600",
                "",
                "[support]",
                'page = "https://example.org/support"',
                "",
                "[[support.contacts]]",
                'role = "m.role.admin"',
                'matrix_id = "@admin:example.org"',
                'email_address = "admin@example.org"',
                "",
            ]
        )
    )
    if os.environ.get("TESSERA_HS_STORAGE") == "scylla":
        # The CQL backend on the test Cassandra, one fresh keyspace per server.
        point = os.environ.get("TESSERA_TEST_CQL")
        if not point:
            raise SystemExit("TESSERA_HS_STORAGE=scylla needs TESSERA_TEST_CQL (scripts/cassandra.sh start)")
        with config.open("a") as f:
            f.write(f'[storage]\nbackend = "scylla"\n\n[storage.scylla]\ncontact_points = [{_toml_str(point)}]\nkeyspace = "hs_{secrets.token_hex(6)}"\n')
    return {
        "argv": [str(binary), "--config", str(config)],
        "env": {},
        "cwd": str(workdir),
        "data_dir": str(data_dir),
        "config": str(config),
    }


_HIGH_RATE = {"per_second": 100000, "burst_count": 1000000}


def _synapse_config(workdir: Path, data_dir: Path, port: int) -> dict:
    log_config = workdir / "log.yaml"
    return {
        "server_name": SERVER_NAME,
        "pid_file": str(workdir / "homeserver.pid"),
        "public_baseurl": f"http://127.0.0.1:{port}/",
        "serve_client_wellknown": True,
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ],
        "database": {"name": "sqlite3", "args": {"database": str(data_dir / "homeserver.db")}},
        "log_config": str(log_config),
        "media_store_path": str(data_dir / "media_store"),
        "max_upload_size": "10M",
        "signing_key_path": str(data_dir / f"{SERVER_NAME}.signing.key"),
        "report_stats": False,
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "bcrypt_rounds": 4,  # cheap hashing for tests, as argon2 costs for tessera
        "enable_registration": True,
        "enable_registration_without_verification": True,
        "registration_shared_secret": secrets.token_hex(16),
        "macaroon_secret_key": secrets.token_hex(16),
        "form_secret": secrets.token_hex(16),
        "presence": {"enabled": True},
        "user_directory": {"enabled": True, "search_all_users": True},
        # Synapse lets only admins publish rooms to the directory by default.
        "room_list_publication_rules": [{"action": "allow"}],
        "url_preview_enabled": False,
        "enable_metrics": False,
        # TURN credentials for /voip/turnServer; nothing listens there, the
        # endpoint only hands out time-limited credentials.
        "turn_uris": ["turn:127.0.0.1:3478?transport=udp"],
        "turn_shared_secret": secrets.token_hex(16),
        "turn_user_lifetime": "1h",
        "rc_message": _HIGH_RATE,
        "rc_registration": _HIGH_RATE,
        "rc_registration_token_validity": _HIGH_RATE,
        "rc_login": {
            "address": _HIGH_RATE,
            "account": _HIGH_RATE,
            "failed_attempts": _HIGH_RATE,
        },
        "rc_admin_redaction": _HIGH_RATE,
        "rc_joins": {"local": _HIGH_RATE, "remote": _HIGH_RATE},
        "rc_joins_per_room": _HIGH_RATE,
        "rc_3pid_validation": _HIGH_RATE,
        "rc_invites": {"per_room": _HIGH_RATE, "per_user": _HIGH_RATE, "per_issuer": _HIGH_RATE},
        "rc_third_party_invite": _HIGH_RATE,
        "rc_presence": {"per_user": _HIGH_RATE},
        "rc_delayed_event_mgmt": _HIGH_RATE,
        "rc_room_creation": _HIGH_RATE,
        "rc_reports": _HIGH_RATE,
        "rc_media_create": _HIGH_RATE,
        "rc_key_requests": _HIGH_RATE,
        "federation_rr_transactions_per_room_per_second": 100000,
    }


_SYNAPSE_LOG_CONFIG = """\
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: {log_file}
    encoding: utf8
loggers:
  synapse.storage.SQL:
    level: WARNING
root:
  level: INFO
  handlers: [file]
disable_existing_loggers: false
"""


def prepare_synapse(workdir: Path, port: int) -> dict:
    venv = synapse_venv()
    python = venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"Synapse venv not found at {venv}; run scripts/install-synapse.sh")
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (workdir / "log.yaml").write_text(_SYNAPSE_LOG_CONFIG.format(log_file=workdir / "homeserver.log"))
    config = workdir / "homeserver.yaml"
    # JSON is a subset of YAML, so no YAML library is needed here.
    config.write_text(json.dumps(_synapse_config(workdir, data_dir, port), indent=2))
    subprocess.run(
        [str(python), "-m", "synapse.app.homeserver", "--config-path", str(config), "--generate-keys"],
        cwd=workdir,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return {
        "argv": [str(python), "-m", "synapse.app.homeserver", "--config-path", str(config)],
        "env": {},
        "cwd": str(workdir),
        "data_dir": str(data_dir),
        "config": str(config),
    }


def prepare(workdir: Path, kind: str | None = None) -> dict:
    """Write a fresh config for `kind` under `workdir`; return how to launch it."""
    kind = kind or kind_from_env()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    if kind == "tessera":
        launch = prepare_tessera(workdir, port)
    else:
        launch = prepare_synapse(workdir, port)
    launch.update(
        {
            "kind": kind,
            "port": port,
            "base_url": f"http://127.0.0.1:{port}",
            "server_name": SERVER_NAME,
            "log_file": str(workdir / "server.log"),
            "profile": PROFILES[kind],
        }
    )
    (workdir / "launch.json").write_text(json.dumps(launch, indent=2))
    return launch


def versions_ok(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/_matrix/client/versions", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class ServerError(RuntimeError):
    pass


class Server:
    """One homeserver process, restartable on the same data dir."""

    def __init__(self, workdir: Path, kind: str | None = None):
        self.launch = prepare(Path(workdir), kind)
        self.kind = self.launch["kind"]
        self.base_url = self.launch["base_url"]
        self.profile = self.launch["profile"]
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> None:
        if self.proc is not None:
            raise ServerError("server already running")
        env = dict(os.environ)
        env.update(self.launch["env"])
        self._log = open(self.launch["log_file"], "ab")
        self.proc = subprocess.Popen(
            self.launch["argv"],
            cwd=self.launch["cwd"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + self.profile["ready_timeout_s"]
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise ServerError(f"{self.kind} exited with {code} before it was ready; log: {self.tail_log()}")
            if versions_ok(self.base_url):
                return
            time.sleep(0.1)  # polling interval of a bounded readiness wait
        self.kill()
        raise ServerError(f"{self.kind} not ready within {self.profile['ready_timeout_s']} s; log: {self.tail_log()}")

    def stop(self) -> int:
        """SIGTERM, wait for exit within the profile's deadline; return the exit code."""
        if self.proc is None:
            raise ServerError("server not running")
        proc = self.proc
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=self.profile["stop_timeout_s"])
        except subprocess.TimeoutExpired:
            self.kill()
            raise ServerError(f"{self.kind} did not exit within {self.profile['stop_timeout_s']} s of SIGTERM")
        self.proc = None
        if self._log:
            self._log.close()
        return code

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        if self._log:
            self._log.close()

    def restart(self) -> int:
        code = self.stop()
        self.start()
        return code

    def tail_log(self, n_bytes: int = 4000) -> str:
        try:
            data = Path(self.launch["log_file"]).read_bytes()
        except OSError:
            return "<no log>"
        return data[-n_bytes:].decode("utf-8", "replace")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write config for a fresh server and print its launch JSON")
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--kind", choices=sorted(PROFILES), default=None)
    args = parser.parse_args(argv)
    if args.cmd == "prepare":
        print(json.dumps(prepare(args.workdir, args.kind)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
