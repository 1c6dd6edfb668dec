"""Shared plumbing of the bench/ scripts: build, start and stop the processes, loopback only.

Every process started here is stopped by `Procs.stop_all()` (also on exceptions), every wait
is bounded, and every address is 127.0.0.1.
"""

import datetime
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Where cargo puts the binaries: $CARGO_TARGET_DIR (relative to the repo root) or target/.
TARGET = ROOT / os.environ.get("CARGO_TARGET_DIR", "target")
BRIDGE = TARGET / "release/ocpp-lago-bridge"
RESPONDER = TARGET / "release/examples/responder"
LAGO_STANDIN = TARGET / "release/examples/lago_standin"
SQLITE_CEILING = TARGET / "release/examples/sqlite_ceiling"
BYTE_RELAY = TARGET / "release/examples/byte_relay"
PATH_PREFIX = "/steve/websocket/CentralSystemService"
FD_LIMIT = 20000


def log(message):
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def build(examples=("responder",)):
    argv = ["cargo", "build", "--release", "--bin", "ocpp-lago-bridge"]
    for example in examples:
        argv += ["--example", example]
    log(f"building release binaries ({' '.join(argv)})")
    subprocess.run(argv, cwd=ROOT, check=True, timeout=3600)


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FD_LIMIT if hard == resource.RLIM_INFINITY else min(FD_LIMIT, hard)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, limit_s=20.0):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {limit_s}s")


def ensure_nginx():
    if shutil.which("nginx") or Path("/usr/sbin/nginx").exists():
        return shutil.which("nginx") or "/usr/sbin/nginx"
    log("nginx missing: apt-get install -y nginx-light (Debian)")
    subprocess.run(["apt-get", "update", "-q"], check=True, timeout=600)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-q", "nginx"], check=True, timeout=900, env=env)
    return shutil.which("nginx") or "/usr/sbin/nginx"


def machine():
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores (nproc), {cpu}, {platform.system()} {platform.release()}"


def loadavg():
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def today():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def process_tree(pid):
    """`pid` and all its descendants (nginx: master + workers) that still exist."""
    pending = [pid]
    while pending:
        p = pending.pop()
        try:
            pending.extend(int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split())
        except OSError:
            continue
        yield p


def rss_kb(pid):
    """VmRSS of `pid` and of all its descendants, in KB."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


class Procs:
    """Background processes of one benchmark, stopped together."""

    def __init__(self):
        self.procs = []
        self.tmp = Path(tempfile.mkdtemp(prefix="ocpp-bench-"))

    def start(self, name, argv, **kwargs):
        err = open(self.tmp / f"{name}.stderr", "w")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, **kwargs)
        self.procs.append((name, proc))
        return proc

    def stop(self, proc, limit_s=10.0):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=limit_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=limit_s)
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self):
        for _, proc in list(self.procs):
            self.stop(proc)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def responder(self):
        port = free_port()
        proc = self.start("responder", [str(RESPONDER), "--listen", f"127.0.0.1:{port}", "--threads", "1"])
        wait_port(port)
        return proc, port

    def bridge(self, upstream_port, extra_toml="", binary=None):
        """The bridge on a spool in the temp dir; `extra_toml` adds sections (e.g. `[lago]`).
        Its config file is `self.tmp / "bridge.toml"`, its admin port `self.admin_port`.
        `binary`: another build of the bridge (e.g. a baseline) instead of `BRIDGE`."""
        port, admin = free_port(), free_port()
        config = self.tmp / "bridge.toml"
        config.write_text(
            f'[proxy]\nlisten = "127.0.0.1:{port}"\npath_prefix = "{PATH_PREFIX}"\n'
            f'upstream_url = "ws://127.0.0.1:{upstream_port}{PATH_PREFIX}"\n'
            f'[admin]\nlisten = "127.0.0.1:{admin}"\n[spool]\npath = "{self.tmp}/spool.db"\n'
            f'[log]\nlevel = "warn"\n{extra_toml}'
        )
        self.admin_port = admin
        proc = self.start("bridge", [str(binary or BRIDGE), "run", "--config", str(config)], cwd=self.tmp)
        wait_port(port)
        return proc, port

    def byte_relay(self, upstream_port):
        """`examples/byte_relay`: tokio copying bytes both ways, the floor of a relay on tokio."""
        port = free_port()
        proc = self.start("byte-relay", [str(BYTE_RELAY), "--listen", f"127.0.0.1:{port}",
                                         "--upstream", f"127.0.0.1:{upstream_port}"])
        wait_port(port)
        return proc, port

    def nginx(self, upstream_port):
        binary = ensure_nginx()
        port = free_port()
        conf_dir = self.tmp / "nginx"
        conf_dir.mkdir(exist_ok=True)
        (conf_dir / "nginx.conf").write_text(f"""
daemon off;
worker_processes auto;
worker_rlimit_nofile {FD_LIMIT};
pid {conf_dir}/nginx.pid;
error_log {conf_dir}/error.log warn;
events {{ worker_connections {FD_LIMIT}; }}
http {{
    access_log off;
    client_body_temp_path {conf_dir}/body;
    proxy_temp_path {conf_dir}/proxy;
    fastcgi_temp_path {conf_dir}/fastcgi;
    uwsgi_temp_path {conf_dir}/uwsgi;
    scgi_temp_path {conf_dir}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location {PATH_PREFIX}/ {{
            proxy_pass http://127.0.0.1:{upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
""")
        proc = self.start("nginx", [binary, "-p", str(conf_dir), "-c", str(conf_dir / "nginx.conf")])
        wait_port(port)
        return proc, port


def simulate(port, args, limit_s):
    """Runs the simulator against the proxy (or responder) on `port`; returns its JSON summary."""
    argv = [str(BRIDGE), "simulate", "--json", "--url", f"ws://127.0.0.1:{port}{PATH_PREFIX}", *args]
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=limit_s)
    try:
        summary = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"simulate printed no summary (exit {done.returncode}):\n{done.stderr[-3000:]}")
    if done.returncode != 0:
        log(f"simulate reported errors: {summary['errors']}\n{done.stderr[-2000:]}")
    return summary


def ensure_perf():
    """`perf` (Debian `linux-perf`), installed by apt-get if missing; its path."""
    found = shutil.which("perf")
    if found:
        return found
    log("perf missing: apt-get install -y linux-perf (Debian)")
    subprocess.run(["apt-get", "update", "-q"], check=True, timeout=600)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-q", "linux-perf"], check=True, timeout=900, env=env)
    found = shutil.which("perf")
    if not found:
        raise RuntimeError("linux-perf installed but no `perf` on PATH")
    return found


def metrics_text(admin_port):
    """The bridge's `/metrics` page (Prometheus text) from its admin port on 127.0.0.1."""
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as r:
        return r.read().decode()


def metric_sum(text, name, **labels):
    """The sum of the samples of `name` in Prometheus `text` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head != name and not head.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            try:
                total += float(value)
            except ValueError:
                pass
    return total


def append_markdown(path, text):
    with open(path, "a") as f:
        f.write(text)
    log(f"appended the results to {path}")
