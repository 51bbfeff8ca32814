"""nginx as a peer: find (or apt-get install) it and run it on a unix socket with a temp prefix.

One worker, no access log, keep-alive without a request cap, answering every request with
``return 200`` and the same body and headers imdsd sends.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from benchkit import Child, Workspace, wait_until

CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


def find_nginx() -> str | None:
    """The nginx binary, or None."""
    found = shutil.which("nginx")
    if found:
        return found
    return next((path for path in CANDIDATES if os.access(path, os.X_OK)), None)


def install_nginx() -> str | None:
    """``apt-get install nginx`` (as root); returns the binary or None, printing why not."""
    if os.geteuid() != 0:
        print("nginx: not installed and not root, cannot apt-get install it")
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx"],
    ):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"nginx: {' '.join(argv)} failed: {done.stderr.strip()[-300:]}")
            return None
    return find_nginx()


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "${dollar}") + '"'


def config(workdir: str, socket_path: str, body: bytes, headers: list[tuple[str, str]]) -> str:
    """The nginx.conf text."""
    content_type = "text/plain"
    extra = []
    for name, value in headers:
        if name == "content-type":
            content_type = value
        else:
            extra.append(f"            add_header {name} {_quote(value)} always;")
    return "\n".join(
        [
            "worker_processes 1;",
            "daemon off;",
            "master_process on;",
            "user root;",
            f"pid {workdir}/nginx.pid;",
            f"error_log {workdir}/error.log warn;",
            "events { worker_connections 4096; }",
            "http {",
            "    access_log off;",
            "    server_tokens off;",
            "    keepalive_requests 100000000;",
            "    keepalive_timeout 120s;",
            '    geo $dollar { default "$"; }',
            "    server {",
            f"        listen unix:{socket_path};",
            "        location / {",
            f"            default_type {_quote(content_type)};",
            *extra,
            f"            return 200 {_quote(body.decode('utf-8'))};",
            "        }",
            "    }",
            "}",
            "",
        ]
    )


def start_nginx(
    ws: Workspace, binary: str, body: bytes, headers: list[tuple[str, str]]
) -> tuple[Child, str]:
    """Run nginx in a temp prefix; returns the child and its socket path."""
    prefix = ws.path("nginx")
    os.makedirs(os.path.join(prefix, "logs"), exist_ok=True)
    socket_path = ws.path("nginx.sock")
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        f.write(config(prefix, socket_path, body, headers))
    child = ws.start("nginx", [binary, "-p", prefix, "-c", conf, "-e", f"{prefix}/error.log"])
    wait_until(lambda: os.path.exists(socket_path) or not child.alive(), 10.0, "nginx to listen")
    if not child.alive():
        raise RuntimeError(f"nginx exited:\n{child.log_tail()}")
    return child, socket_path
