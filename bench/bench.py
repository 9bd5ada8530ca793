#!/usr/bin/env python3
"""The hingnetd benchmark (issue 5). Started by bench/run, which installs the peers and builds
the binary. Python standard library only.

Every number is measured from outside the daemon:
- wall time of a hingnetd batch: from spawning `hingnetd run` on a queue that already holds the
  rows to the latest `finished_at` the daemon wrote (SQLite's clock is the system clock);
- wall time of a peer: from spawning its shell to its exit;
- CPU seconds: the rusage that wait4() returns for the process (for a peer, its shell under
  GNU time, which includes every descendant it waited for);
- peak RSS: hingnetd's VmHWM read just before SIGTERM; a peer's ru_maxrss as GNU time reports
  it, which is the largest single process of the tree, not a sum;
- pickup latency: from the moment the `sqlite3` shell acknowledged the INSERT (it prints a
  marker after the statement has committed) to the first request for that ID in nginx's
  access log ($msec - $request_time, millisecond resolution);
- start-up: from spawn to the READY=1 datagram on a NOTIFY_SOCKET we listen on, and to the
  first request in the access log;
- idle CPU: utime+stime of the daemon from /proc/PID/stat over the window;
- fleet (--only fleet): 1, 2 and 3 daemons on one throwaway PostgreSQL (fsync on), from
  spawning the first to the latest `finished_at` (PostgreSQL's clock, this machine's), and
  pickup latency as above from a long-lived `psql` (it echoes a marker after the autocommitted
  INSERT).
Targets are reported (met / missed), never asserted: the exit code is 0 whenever the harness
itself worked and every download was correct.
"""

import argparse
import base64
import datetime as dt
import hashlib
import hmac
import http.client
import json
import os
import platform
import pwd
import random
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
import zlib

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
HERE = os.path.dirname(os.path.abspath(__file__))

PROFILES = {
    "full": dict(
        # 3 rounds of everything take about 16 minutes on the 2-core machine; the medium
        # workload (3 tools × 6.25 GiB written and fsynced per round) gets 2 to stay under 15.
        rounds={"large": 3, "small": 3, "medium": 2},
        large=2 * GiB,
        small=(2000, 1 * MiB),
        medium=(200, 32 * MiB),
        conc16=(32, 32 * MiB),
        pickup=1000,
        idle_seconds=60,
        idle_settle=2.0,
        idle_rows=10_000,
        scale_rows=1_000_000,
        scale_pending=1000,
        scale_rounds=3,
        scale_probes=20,
        status_reps=5,
        scale_idle_seconds=5,
        # --only rate: download.rate_limit over a 20 s window after a 3 s warm-up.
        rate=dict(limit=50 * MiB, concurrency=(1, 4, 16), warmup=3.0, window=20.0, file=1536 * MiB),
        # --only fleet: 1, 2 and 3 daemons draining tiny files from one PostgreSQL queue, then
        # pickup latency on it with 1 and with 3 daemons.
        fleet=dict(files=10_000, daemons=(1, 2, 3), pickup=1000, pickup_daemons=(1, 3)),
        # --only s3: the large and medium files, API to bucket, each tool on a Garage of its own.
        s3=dict(rounds={"s3-large": 3, "s3-medium": 3}, concurrency=8),
    ),
    "smoke": dict(
        rounds={"large": 1, "small": 1, "medium": 1},
        large=8 * MiB,
        small=(40, 64 * KiB),
        medium=(8, 1 * MiB),
        conc16=(16, 1 * MiB),
        pickup=20,
        idle_seconds=1,
        idle_settle=0.3,
        idle_rows=200,
        scale_rows=10_000,
        scale_pending=20,
        scale_rounds=1,
        scale_probes=3,
        status_reps=2,
        scale_idle_seconds=1,
        rate=dict(limit=8 * MiB, concurrency=(1, 4), warmup=0.5, window=2.0, file=64 * MiB),
        fleet=dict(files=200, daemons=(1, 2, 3), pickup=20, pickup_daemons=(1, 3)),
        s3=dict(rounds={"s3-large": 1, "s3-medium": 1}, concurrency=8),
    ),
}
WORKLOADS = ["large", "small", "medium", "conc16", "pickup", "idle", "scale"]
# Run only when named in --only: not part of the default run, nor of CI's smoke run (s3: part of
# the smoke run when a Garage binary is there, see main()).
OPT_IN = ["rate", "fleet", "s3"]
TINY = 4 * KiB  # the files behind pickup and scale IDs
CLAIM_LINE = re.compile(r"claimed due rows claimed=[1-9]\d* took_us=(\d+)")
# Every claim, the empty ones too: under contention (SKIP LOCKED) a daemon can come away empty.
CLAIM_ANY = re.compile(r"claimed due rows claimed=(\d+) took_us=(\d+)")

# The peers, as an operator would script them. They follow the API's redirect with the token
# (curl -L does not forward a custom Authorization header to another host; aria2c sends its
# --header to every request). The header comes from a file, never the command line.
CURL = "curl -sSfL --no-progress-meter -H @{hdr}"
PEERS = {
    "large": {
        "curl+sha256sum+sync": (
            "{curl} -o {out}/{id}.mp4 {api}/v1/videos/{id}/content"
            " && sha256sum {out}/{id}.mp4 > {sums} && sync {out}/{id}.mp4"
        ),
        "curl+sync": "{curl} -o {out}/{id}.mp4 {api}/v1/videos/{id}/content && sync {out}/{id}.mp4",
    },
    "many": {
        "xargs -P8 curl+sha256sum+sync": (
            "cd {out} && xargs -P 8 -n 1 -a {ids} sh -c '"
            '{curl} -o "$1.mp4" "{api}/v1/videos/$1/content"'
            ' && sha256sum "$1.mp4" >> {sums} && sync "$1.mp4"'
            "' _"
        ),
        "aria2c -j8": (
            "aria2c --conf-path={aria_conf} -j 8 -i {urls} -d {out} --file-allocation=none"
            " --allow-overwrite=true --auto-file-renaming=false --quiet=true"
        ),
    },
}
PEER_OF = {"large": "large", "small": "many", "medium": "many", "conc16": None}
# --only s3: API to bucket. {remote} is rclone's `garage:` remote (from the environment), the
# bucket and the peer's key prefix. (command, whether it leaves the files on local disk too)
S3_PEERS = {
    "large": {
        # Streams the body into a multipart upload: nothing is hashed or checked on the way.
        # pipefail only so that the harness sees a failed curl; it costs nothing.
        "curl | rclone rcat": (
            "set -o pipefail; {curl} {api}/v1/videos/{id}/content | rclone rcat {remote}{id}.mp4", False),
        "curl+sha256sum+rclone copyto": (
            "cd {out} && {curl} -o {id}.mp4 {api}/v1/videos/{id}/content"
            " && sha256sum {id}.mp4 > {sums} && rclone copyto {id}.mp4 {remote}{id}.mp4", True),
    },
    "many": {
        "xargs -P8 curl | rclone rcat": (
            "xargs -P 8 -n 1 -a {ids} bash -c '"
            'set -o pipefail; {curl} "{api}/v1/videos/$1/content" | rclone rcat {remote}"$1.mp4"'
            "' _", False),
        "xargs -P8 curl+sha256sum+rclone copyto": (
            "cd {out} && xargs -P 8 -n 1 -a {ids} sh -c '"
            '{curl} -o "$1.mp4" "{api}/v1/videos/$1/content"'
            ' && sha256sum "$1.mp4" >> {sums} && rclone copyto "$1.mp4" {remote}"$1.mp4"'
            "' _", True),
    },
}
S3_LOCAL = "hingnetd, local dir"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def pct(xs, p):
    """Nearest-rank percentile."""
    xs = sorted(xs)
    if not xs:
        return None
    k = max(0, min(len(xs) - 1, -(-len(xs) * p // 100) - 1))
    return xs[int(k)]


def parse_ts(s):
    """SQLite's 'YYYY-MM-DDTHH:MM:SS.SSSZ' to epoch seconds."""
    return dt.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()


def free_port(host):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cmd_out(args):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:  # noqa: BLE001 - best-effort environment description
        return f"? ({e})"


def proc_cpu(pid):
    """utime+stime of a process (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_ctxsw(pid):
    """Context switches summed over the process's threads: a proxy for wake-ups."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def proc_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def proc_hwm_kib(pid):
    """Peak RSS of a running process (VmHWM). ru_maxrss from wait4 cannot be used for a process
    started from Python: exec() carries the forking process's peak RSS into it."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def proc_threads(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def alive(pid):
    """Whether a child has not exited, without reaping it."""
    try:
        r = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return r is None


# ---------------------------------------------------------------------------------------------
# Test files


FTYP = struct.pack(">I4s4sI4s4s4s", 28, b"ftyp", b"isom", 0x200, b"isom", b"iso2", b"mp41")
# A whole MP4 has a movie box; the daemon refuses a file without one.
MOOV = struct.pack(">I4s", 8 + 24, b"moov") + b"hingnetd-bench movie box"
CHUNK, SLACK = 16 * MiB, 1 * MiB
# Bumped when the files' shape changes, so that cached files of an older shape are remade.
LAYOUT = 3


class Files:
    """Deterministic pseudo-random MP4-looking files: an ftyp box, a `free` box naming the file,
    a small `moov` box, then slices of a seeded random pool at per-file offsets. Their SHA-256
    is computed while they are written, so every download can be checked."""

    def __init__(self, root, seed):
        self.root = root
        self.seed = seed
        os.makedirs(root, exist_ok=True)
        self.manifest_path = os.path.join(root, "manifest.json")
        self.meta = {}
        try:
            with open(self.manifest_path) as f:
                m = json.load(f)
            if m.get("seed") == seed and m.get("layout") == LAYOUT:
                self.meta = m["files"]
        except (OSError, ValueError, KeyError):
            pass
        self._pool = None

    def pool(self):
        if self._pool is None:
            self._pool = memoryview(random.Random(self.seed).randbytes(CHUNK + SLACK))
        return self._pool

    def path(self, name):
        return os.path.join(self.root, name + ".mp4")

    def ensure(self, names, size):
        made = 0
        for name in names:
            m = self.meta.get(name)
            p = self.path(name)
            if m and m[0] == size and os.path.exists(p) and os.path.getsize(p) == size:
                continue
            self.meta[name] = [size, self._write(p, name, size)]
            made += size
        if made:
            with open(self.manifest_path, "w") as f:
                json.dump({"seed": self.seed, "layout": LAYOUT, "files": self.meta}, f)
        return made

    def _write(self, path, name, size):
        pool = self.pool()
        tag = f"hingnetd-bench seed={self.seed} {name}".encode()
        # ftyp, a `free` box naming the file, a `moov`, then one `mdat` box to the end: the
        # daemon walks the top-level boxes and accepts only a file they tile exactly.
        prefix = FTYP + struct.pack(">I4s", 8 + len(tag), b"free") + tag + MOOV
        rest = size - len(prefix)
        if rest >= 1 << 32:
            mdat = struct.pack(">I4sQ", 1, b"mdat", rest)
        else:
            mdat = struct.pack(">I4s", rest, b"mdat")
        assert rest >= len(mdat), f"{name}: {size} bytes is too small for a bench file"
        head = prefix + mdat
        h = hashlib.sha256(head)
        base = zlib.crc32(name.encode())
        with open(path, "wb", buffering=0) as f:
            f.write(head)
            left, k = size - len(head), 0
            while left:
                off = (base + k * 40961) % SLACK
                n = min(left, CHUNK)
                piece = pool[off : off + n]
                f.write(piece)
                h.update(piece)
                left -= n
                k += 1
        return h.hexdigest()

    def size(self, name):
        return self.meta[name][0]

    def sha(self, name):
        return self.meta[name][1]

    def prewarm(self, names):
        """Reads the files so that the server sends them from the page cache."""
        buf = bytearray(8 * MiB)
        for name in names:
            with open(self.path(name), "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


# ---------------------------------------------------------------------------------------------
# The loopback API + CDN


NGINX_CONF = r"""
{user}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    types {{ video/mp4 mp4; }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 65s;
    server_tokens off;
    map_hash_bucket_size 256;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    # $msec - $request_time is when the request arrived (millisecond resolution).
    log_format bench '$msec $request_time $status $request_uri';
    map $http_authorization $auth_ok {{ "Bearer {token}" 1; default 0; }}
    map $uri $not_ready {{ "~^/v1/videos/notready_" 1; default 0; }}
    map $uri $gone {{ "~^/v1/videos/gone_" 1; default 0; }}

    # The API: checks the token, answers "not ready" (400) for IDs starting notready_, "not
    # found" (404) for gone_, and otherwise redirects to a signed-looking CDN URL.
    server {{
        listen 127.0.0.1:{api_port};
        access_log {prefix}/api.log bench;
        default_type application/json;
        location ~ "^/v1/videos/(?<vid>[A-Za-z0-9_-]{{1,128}})/content$" {{
            if ($auth_ok = 0) {{
                return 401 '{{"error":{{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}}}';
            }}
            if ($not_ready) {{
                return 400 '{{"error":{{"message":"Video is not ready yet, try again later","type":"invalid_request_error","param":null,"code":"video_not_ready"}}}}';
            }}
            if ($gone) {{
                return 404 '{{"error":{{"message":"Video not found","type":"invalid_request_error","param":null,"code":"not_found"}}}}';
            }}
            return 302 "http://127.0.0.2:{cdn_port}/files/$vid.mp4?Expires=4102444800&Signature=bench-signature";
        }}
        location ~ "^/v1/videos/(?<vid>[A-Za-z0-9_-]{{1,128}})$" {{
            if ($auth_ok = 0) {{
                return 401 '{{"error":{{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}}}';
            }}
            if ($not_ready) {{
                return 200 '{{"id":"$vid","object":"video","status":"processing","progress":50}}';
            }}
            if ($gone) {{
                return 404 '{{"error":{{"message":"Video not found","type":"invalid_request_error","param":null,"code":"not_found"}}}}';
            }}
            return 200 '{{"id":"$vid","object":"video","status":"completed","progress":100}}';
        }}
        location / {{
            return 404 '{{"error":{{"message":"Unknown route","type":"invalid_request_error","param":null,"code":"not_found"}}}}';
        }}
    }}

    # The CDN: the files, with sendfile.
    server {{
        listen 127.0.0.2:{cdn_port};
        access_log off;
        location /files/ {{
            alias {files}/;
        }}
    }}
}}
"""


class Server:
    def __init__(self, prefix, files_dir, token):
        self.prefix = prefix
        self.token = token
        os.makedirs(os.path.join(prefix, "tmp"), exist_ok=True)
        self.api_port = free_port("127.0.0.1")
        self.cdn_port = free_port("127.0.0.2")
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.log_path = os.path.join(prefix, "api.log")
        conf = NGINX_CONF.format(
            user="user root;" if os.geteuid() == 0 else "",
            prefix=prefix,
            token=token,
            api_port=self.api_port,
            cdn_port=self.cdn_port,
            files=files_dir,
        )
        self.conf = os.path.join(prefix, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(conf)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.version = cmd_out([nginx, "-v"]) or subprocess.run(
            [nginx, "-v"], capture_output=True, text=True
        ).stderr.strip()
        self.proc = subprocess.Popen(
            [nginx, "-p", prefix, "-c", self.conf],
            stdin=subprocess.DEVNULL,
            stdout=open(os.path.join(prefix, "stdout.log"), "w"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 10
        for host, port in (("127.0.0.1", self.api_port), ("127.0.0.2", self.cdn_port)):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError("nginx exited: " + self.tail())
                try:
                    socket.create_connection((host, port), timeout=1).close()
                    break
                except OSError:
                    if time.time() > deadline:
                        raise RuntimeError("nginx did not listen: " + self.tail())
                    time.sleep(0.02)

    def tail(self):
        out = []
        for n in ("error.log", "stdout.log"):
            p = os.path.join(self.prefix, n)
            if os.path.exists(p):
                out.append(open(p, errors="replace").read()[-2000:])
        return "\n".join(out)

    def log_offset(self):
        try:
            return os.path.getsize(self.log_path)
        except FileNotFoundError:
            return 0

    def first_requests(self, since, prefix=""):
        """{video_id: arrival time of its first /content request} from the access log."""
        first = {}
        with open(self.log_path) as f:
            f.seek(since)
            for line in f:
                parts = line.split()
                if len(parts) != 4:
                    continue
                msec, rtime, _status, uri = parts
                if not (uri.startswith("/v1/videos/") and uri.endswith("/content")):
                    continue
                vid = uri[len("/v1/videos/") : -len("/content")]
                if not vid.startswith(prefix):
                    continue
                t = float(msec) - float(rtime)
                if vid not in first or t < first[vid]:
                    first[vid] = t
        return first

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------------
# hingnetd


class Notify(threading.Thread):
    """A NOTIFY_SOCKET: records when each sd_notify datagram arrives."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages = []
        self.ready = threading.Event()
        self.ready_at = None
        self.start()

    def run(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            t = time.time()
            self.messages.append((t, data))
            if b"READY=1" in data.split(b"\n") and self.ready_at is None:
                self.ready_at = t
                self.ready.set()

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class Daemon:
    """One `hingnetd run` on a fresh queue database and a fresh archive directory; or, given
    `database` (a postgres:// URL) and `instance`, one daemon of a fleet sharing that queue (the
    SQLite helpers below, enqueue to wait_drained, are then not for it)."""

    def __init__(self, bench, name, concurrency=8, poll="5s", initial_delay="30s", db=None, env=None,
                 rate_limit=None, database=None, instance=None, garage=None):
        self.bench = bench
        self.env = env or {}
        self.name = name
        self.dir = bench.fresh_dir(name)
        self.db = database or os.path.join(self.dir, "queue.db")
        self.instance = instance
        self.archive = os.path.join(self.dir, "videos")
        # An archive bucket (--only s3): s3://bucket/prefix/ on that Garage, the access key in the
        # environment, downloads staged in `staging` beside the queue (the default).
        bucket_lines = ""
        if garage:
            self.prefix = "hingnet/"
            self.archive = f"s3://{garage.BUCKET}/{self.prefix}"
            self.staging = os.path.join(self.dir, "staging")
            self.env = dict(self.env, AWS_ACCESS_KEY_ID=garage.KEY_ID, AWS_SECRET_ACCESS_KEY=garage.secret)
            bucket_lines = (f'\n[archive.s3]\nendpoint = "{garage.endpoint}"\nregion = "{garage.REGION}"\n'
                            "path_style = true\n")
        self.cfg = os.path.join(self.dir, "hingnetd.toml")
        self.log_path = os.path.join(bench.logs, f"{name}.log")
        self.proc = None
        self.notify = None
        self.hwm_kib = None
        self.max_threads = 0
        token_file = os.path.join(self.dir, "token")
        rate_line = f'rate_limit = "{rate_limit}/s"' if rate_limit else ""
        fleet_lines = f'instance = "{instance}"\nlease = "60s"' if database else ""
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, bench.token.encode() + b"\n")
        os.close(fd)
        with open(self.cfg, "w") as f:
            f.write(
                f"""[api]
base_url = "{bench.server.api}"
token_file = "{token_file}"

[queue]
database = "{self.db}"
poll_interval = "{poll}"
{fleet_lines}

[archive]
dir = "{self.archive}"
{bucket_lines}
[download]
concurrency = {concurrency}
{rate_line}
{'max_bytes = "5GiB"' if garage else ""}

[retry]
initial_delay = "{initial_delay}"

[log]
level = "info"
format = "text"
"""
            )
        if db:
            shutil.copyfile(db, self.db)
        self.hingnetd("migrate")

    def hingnetd(self, *args, capture=False):
        r = subprocess.run(
            [self.bench.bin, "--config", self.cfg, *args],
            env=self.bench.env,
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise RuntimeError(f"hingnetd {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
        return r.stdout if capture else None

    def timed(self, *args):
        t = time.perf_counter()
        self.hingnetd(*args)
        return time.perf_counter() - t

    def enqueue(self, ids):
        """The producers' contract, from Python's sqlite3, in one transaction."""
        con = sqlite3.connect(self.db, timeout=30)
        with con:
            con.executemany("INSERT OR IGNORE INTO queue(video_id) VALUES (?)", [(i,) for i in ids])
        con.close()

    def start(self):
        sock = os.path.join(self.dir, "notify.sock")
        self.notify = Notify(sock)
        env = dict(self.bench.daemon_env, NOTIFY_SOCKET=sock, **self.env)
        self.logf = open(self.log_path, "ab")
        self.t_spawn = time.time()
        self.proc = subprocess.Popen(
            [self.bench.bin, "--config", self.cfg, "run"],
            stdin=subprocess.DEVNULL,
            stdout=self.logf,
            stderr=self.logf,
            env=env,
        )
        return self.t_spawn

    def wait_ready(self, timeout=60):
        deadline = time.time() + timeout
        while not self.notify.ready.wait(0.05):
            if not alive(self.proc.pid):
                raise RuntimeError(f"{self.name}: hingnetd exited before READY: {self.log_tail()}")
            if time.time() > deadline:
                raise RuntimeError(f"{self.name}: no READY=1 within {timeout}s: {self.log_tail()}")
        return self.notify.ready_at

    def ro(self):
        return sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)

    def wait_drained(self, timeout, where="1"):
        """Polls until no matching row is pending or downloading."""
        con = self.ro()
        deadline = time.time() + timeout
        try:
            while True:
                n = con.execute(
                    "SELECT count(*) FROM queue WHERE state IN ('pending', 'downloading') AND " + where
                ).fetchone()[0]
                if n == 0:
                    return
                # Nothing in these workloads should need a second attempt: stop at the first one.
                retry = con.execute(
                    "SELECT video_id, attempts, last_error FROM queue WHERE state = 'pending' "
                    "AND last_error IS NOT NULL AND " + where + " LIMIT 1"
                ).fetchone()
                if retry:
                    raise RuntimeError(f"{self.name}: hingnetd will retry {retry[0]} (attempt {retry[1]}): {retry[2]}")
                self.max_threads = max(self.max_threads, proc_threads(self.proc.pid))
                if not alive(self.proc.pid):
                    raise RuntimeError(f"{self.name}: hingnetd exited with {n} rows left: {self.log_tail()}")
                if time.time() > deadline:
                    raise RuntimeError(f"{self.name}: {n} rows still unfinished after {timeout}s")
                time.sleep(0.1)
        finally:
            con.close()

    def stop(self):
        """SIGTERM, then wait4: exit code and rusage of the daemon."""
        if self.proc is None:
            return None, None
        self.hwm_kib = proc_hwm_kib(self.proc.pid)
        try:
            self.proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.time() + 60
        while alive(self.proc.pid) and time.time() < deadline:
            time.sleep(0.02)
        if alive(self.proc.pid):
            self.proc.kill()
        _, status, ru = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.logf.close()
        self.notify.close()
        code = self.proc.returncode
        if code != 0:
            self.bench.anomaly(self.name, f"hingnetd exited {code} after SIGTERM")
        return code, ru

    def log_tail(self):
        try:
            return open(self.log_path, errors="replace").read()[-3000:]
        except OSError:
            return ""

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# PostgreSQL (--only fleet)


def pg_bin_dir():
    """The newest installed PostgreSQL's programs (Debian: /usr/lib/postgresql/<version>/bin)."""
    root = "/usr/lib/postgresql"
    found = []
    for v in os.listdir(root) if os.path.isdir(root) else []:
        if v.isdigit() and os.path.exists(os.path.join(root, v, "bin", "postgres")):
            found.append((int(v), os.path.join(root, v, "bin")))
    if not found:
        raise RuntimeError("fleet needs PostgreSQL: no /usr/lib/postgresql/*/bin/postgres (apt-get install postgresql)")
    return max(found)[1]


def machine_busy():
    """(busy, total) jiffies of all CPUs from /proc/stat: idle and iowait are not busy."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    total = sum(v[:8])  # guest time is already in user
    return total - v[3] - v[4], total


class Postgres:
    """A throwaway PostgreSQL cluster: initdb into a directory of its own (trust, C locale), a free
    loopback port and a private socket directory. PostgreSQL refuses to run as root: as root,
    the cluster belongs to the `postgres` user the Debian package creates and every server
    program runs as that user. fsync stays on: the fleet's commits are part of what is measured."""

    def __init__(self, root, env):
        self.bin = pg_bin_dir()
        self.root = root
        self.data = os.path.join(root, "data")
        self.sock = os.path.join(root, "socket")
        self.log_path = os.path.join(root, "server.log")
        self.env = {k: v for k, v in env.items() if not k.startswith("PG")}
        self.port = free_port("127.0.0.1")
        self.proc = None
        shutil.rmtree(root, ignore_errors=True)  # a run killed before it removed its cluster
        os.makedirs(self.sock)
        self.owner = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            for d in (root, self.sock):
                os.chown(d, pw.pw_uid, pw.pw_gid)
            self.owner = ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups", "--"]
        self.version = cmd_out([os.path.join(self.bin, "postgres"), "--version"])
        # --no-sync only skips flushing initdb's own files: this cluster is thrown away after.
        r = subprocess.run(
            [*self.owner, os.path.join(self.bin, "initdb"), "-D", self.data, "-U", "postgres", "-A", "trust",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            capture_output=True, text=True, env=self.env, cwd=root,
        )
        if r.returncode != 0:
            raise RuntimeError(f"initdb exited {r.returncode}: {r.stderr.strip()[-1500:]}")
        log_f = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [*self.owner, os.path.join(self.bin, "postgres"), "-D", self.data, "-p", str(self.port),
             "-k", self.sock, "-c", "listen_addresses=127.0.0.1"],
            stdin=subprocess.DEVNULL, stdout=log_f, stderr=subprocess.STDOUT, env=self.env, cwd=root,
        )
        log_f.close()
        deadline = time.time() + 60
        isready = [os.path.join(self.bin, "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        while subprocess.run(isready, env=self.env).returncode != 0:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited {self.proc.returncode}: {self.log_tail()}")
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"postgres did not accept connections within 60 s: {self.log_tail()}")
            time.sleep(0.1)

    def psql_args(self, db):
        # Over TCP, as a producer on another host would connect; -X: no ~/.psqlrc.
        return [os.path.join(self.bin, "psql"), "-X", "-q", "-A", "-t", "-h", "127.0.0.1", "-p", str(self.port),
                "-U", "postgres", "-d", db]

    def sql(self, db, text):
        """Runs SQL with a one-off psql (setup only: nothing timed); its rows, '|'-separated."""
        r = subprocess.run([*self.psql_args(db), "-v", "ON_ERROR_STOP=1"], input=text, capture_output=True,
                           text=True, env=self.env)
        if r.returncode != 0:
            raise RuntimeError(f"psql on {db} exited {r.returncode}: {r.stderr.strip()[-1500:]}")
        return [line for line in r.stdout.splitlines() if line]

    def url(self, db):
        return f"postgres://hingnetd@127.0.0.1:{self.port}/{db}?sslmode=disable"

    def cpu(self):
        """CPU seconds of the server: the postmaster, its live backends and background processes,
        and the children it has reaped (its cutime + cstime)."""
        tck = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(pid) == self.proc.pid:
                total += sum(int(x) for x in fields[11:15])
            elif int(fields[1]) == self.proc.pid:
                total += int(fields[11]) + int(fields[12])
        return total / tck

    def log_tail(self):
        try:
            return open(self.log_path, errors="replace").read()[-2000:]
        except OSError:
            return ""

    def log_problems(self):
        """ERROR, FATAL and PANIC lines of the server's log."""
        try:
            with open(self.log_path, errors="replace") as f:
                return [line.strip() for line in f if re.search(r"\b(ERROR|FATAL|PANIC):", line)]
        except OSError:
            return []

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        subprocess.run([*self.owner, os.path.join(self.bin, "pg_ctl"), "stop", "-D", self.data, "-m", "fast",
                        "-w", "-t", "30"], capture_output=True, env=self.env, cwd=self.root)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def remove(self):
        shutil.rmtree(self.root, ignore_errors=True)


class Psql:
    """One long-lived psql, as a producer keeps one connection open: each statement is followed
    by an \\echo of a marker, and the marker's line is the acknowledgement (psql runs them in
    order, and in autocommit an INSERT has committed before the next line is read)."""

    MARK = "hingnetd-bench-ack"

    def __init__(self, pg, db):
        self.proc = subprocess.Popen(pg.psql_args(db), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1, env=pg.env)
        self.run("SELECT 1")

    def run(self, statement):
        """Sends one statement; returns the lines psql printed for it, once it has."""
        self.proc.stdin.write(statement + ";\n\\echo " + self.MARK + "\n")
        self.proc.stdin.flush()
        out = []
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"psql exited: {' / '.join(out)[-500:]}")
            if line.rstrip("\n") == self.MARK:
                break
            out.append(line.rstrip("\n"))
        if any(line.startswith(("ERROR:", "FATAL:", "psql:")) for line in out):
            raise RuntimeError(f"psql: {' / '.join(out)[-500:]}")
        return out

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------------------------
# An S3 store (--only s3): a private Garage, and the harness's own look at its bucket


def garage_binary(given=None):
    """The `garage` binary: --garage, HINGNETD_TEST_GARAGE, where scripts/test installs it, or the
    PATH's; None if there is none."""
    if given:
        return os.path.abspath(given) if os.access(given, os.X_OK) else None
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for p in (os.environ.get("HINGNETD_TEST_GARAGE"),
              os.path.join(cache, "hingnetd-test", "garage-2.5.0", "bin", "garage")):
        if p and os.access(p, os.X_OK):
            return os.path.abspath(p)
    return shutil.which("garage")


class S3Api:
    """Just enough S3 for the harness to check a bucket, independent of hingnetd's client and of
    rclone: SigV4 signing (hmac, hashlib), ListObjectsV2 and HeadObject, over http.client."""

    def __init__(self, port, region, key_id, secret):
        self.host, self.port, self.region = "127.0.0.1", port, region
        self.key_id, self.secret = key_id, secret

    def request(self, method, path, query=(), headers=None, timeout=60):
        amz = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        day = amz[:8]
        payload = hashlib.sha256(b"").hexdigest()
        hdrs = {"host": f"{self.host}:{self.port}", "x-amz-date": amz, "x-amz-content-sha256": payload}
        hdrs.update({k.lower(): v for k, v in (headers or {}).items()})
        enc = lambda v: urllib.parse.quote(v, safe="-_.~")  # noqa: E731
        q = "&".join(f"{enc(k)}={enc(v)}" for k, v in sorted(query))
        uri = urllib.parse.quote(path, safe="/-_.~")
        signed = ";".join(sorted(hdrs))
        canonical = "\n".join([method, uri, q, "".join(f"{k}:{hdrs[k].strip()}\n" for k in sorted(hdrs)), signed,
                               payload])
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        k = ("AWS4" + self.secret).encode()
        for part in (day, self.region, "s3", "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
        hdrs["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.key_id}/{scope}, SignedHeaders={signed}, "
                                 f"Signature={sig}")
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, uri + ("?" + q if q else ""), headers=hdrs)
            r = conn.getresponse()
            body = r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, body
        finally:
            conn.close()

    def list(self, bucket, prefix):
        """{key: size} of every object under prefix."""
        out, token = {}, None
        while True:
            q = [("list-type", "2"), ("prefix", prefix)] + ([("continuation-token", token)] if token else [])
            status, _, body = self.request("GET", f"/{bucket}", q)
            if status != 200:
                raise RuntimeError(f"listing s3://{bucket}/{prefix}: HTTP {status}: {body[:300]!r}")
            root = ET.fromstring(body)
            tag = lambda e: e.tag.rsplit("}", 1)[-1]  # noqa: E731
            token = None
            truncated = False
            for e in root:
                if tag(e) == "Contents":
                    kv = {tag(c): c.text for c in e}
                    out[kv["Key"]] = int(kv["Size"])
                elif tag(e) == "NextContinuationToken":
                    token = e.text
                elif tag(e) == "IsTruncated":
                    truncated = e.text == "true"
            if not (truncated and token):
                return out

    def head(self, bucket, key):
        """(size, the store's x-amz-checksum-sha256) of an object; None if there is none."""
        status, h, _ = self.request("HEAD", f"/{bucket}/{key}", headers={"x-amz-checksum-mode": "ENABLED"})
        if status == 404:
            return None
        if status != 200:
            raise RuntimeError(f"HEAD s3://{bucket}/{key}: HTTP {status}")
        return int(h.get("content-length", -1)), h.get("x-amz-checksum-sha256")


def sha256_b64(hex_digest):
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


class Garage:
    """One Garage node of its own (tests/support/garage.rs's setup): a fresh directory, free
    loopback ports, data_fsync and metadata_fsync on, the sqlite metadata engine (the one the
    cached build has), and `server --single-node --default-bucket` creating the access key and
    the bucket from the environment. Started for one timed run and stopped after its check:
    Garage keeps blocks content-addressed and deduplicated, so the same bytes uploaded again into
    the same node would not be written again."""

    BUCKET = "hingnetd-bench"
    REGION = "garage"
    KEY_ID = "GKhingnetdbench0123456789"

    def __init__(self, binary, root, env, secret):
        self.binary, self.root, self.secret = binary, root, secret
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
        self.port = free_port("127.0.0.1")
        rpc = free_port("127.0.0.1")
        while rpc == self.port:
            rpc = free_port("127.0.0.1")
        self.conf = os.path.join(root, "garage.toml")
        with open(self.conf, "w") as f:
            f.write(f'metadata_dir = "{root}/meta"\ndata_dir = "{root}/data"\ndb_engine = "sqlite"\n'
                    "replication_factor = 1\nmetadata_fsync = true\ndata_fsync = true\n"
                    f'rpc_bind_addr = "127.0.0.1:{rpc}"\nrpc_public_addr = "127.0.0.1:{rpc}"\n'
                    f'rpc_secret = "{hashlib.sha256(secret.encode()).hexdigest()}"\n'
                    f'[s3_api]\ns3_region = "{self.REGION}"\napi_bind_addr = "127.0.0.1:{self.port}"\n'
                    'root_domain = ".s3.garage.localhost"\n')
        os.chmod(self.conf, 0o600)
        self.log_path = os.path.join(root, "garage.log")
        genv = dict(env, GARAGE_DEFAULT_ACCESS_KEY=self.KEY_ID, GARAGE_DEFAULT_SECRET_KEY=secret,
                    GARAGE_DEFAULT_BUCKET=self.BUCKET, RUST_LOG="garage=warn")
        log_f = open(self.log_path, "w")
        self.proc = subprocess.Popen([binary, "-c", self.conf, "server", "--single-node", "--default-bucket"],
                                     stdin=subprocess.DEVNULL, stdout=log_f, stderr=subprocess.STDOUT, env=genv,
                                     cwd=root)
        log_f.close()
        self.api = S3Api(self.port, self.REGION, self.KEY_ID, secret)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Garage exited {self.proc.returncode} at start: {self.log_tail()}")
            try:
                if self.api.request("GET", f"/{self.BUCKET}", [("list-type", "2"), ("max-keys", "1")], timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"Garage's bucket did not answer within 60 s: {self.log_tail()}")
            time.sleep(0.05)

    def cpu(self):
        return proc_cpu(self.proc.pid)

    def hwm_kib(self):
        return proc_hwm_kib(self.proc.pid)

    def log_tail(self):
        try:
            return open(self.log_path, errors="replace").read()[-2000:]
        except OSError:
            return ""

    def log_problems(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return [line.strip() for line in f if re.search(r"\b(ERROR|WARN)\b", line)]
        except OSError:
            return []

    def rclone_env(self, config_file):
        """rclone's remote `garage:`, from the environment alone (and an empty config file)."""
        return {
            "RCLONE_CONFIG": config_file,
            "RCLONE_CONFIG_GARAGE_TYPE": "s3",
            "RCLONE_CONFIG_GARAGE_PROVIDER": "Other",
            "RCLONE_CONFIG_GARAGE_ENDPOINT": self.endpoint,
            "RCLONE_CONFIG_GARAGE_REGION": self.REGION,
            "RCLONE_CONFIG_GARAGE_FORCE_PATH_STYLE": "true",
            "RCLONE_CONFIG_GARAGE_ACCESS_KEY_ID": self.KEY_ID,
            "RCLONE_CONFIG_GARAGE_SECRET_ACCESS_KEY": self.secret,
        }

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def remove(self):
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The benchmark


class Bench:
    def __init__(self, args):
        self.args = args
        self.profile = dict(PROFILES["smoke" if args.smoke else "full"])
        if args.rounds:
            self.profile["rounds"] = {w: args.rounds for w in self.profile["rounds"]}
            self.profile["scale_rounds"] = min(args.rounds, self.profile["scale_rounds"])
            self.profile["s3"] = dict(self.profile["s3"], rounds={w: args.rounds for w in self.profile["s3"]["rounds"]})
        self.bin = os.path.abspath(args.bin)
        self.seed = args.seed
        self.rng = random.Random(self.seed)
        self.token = "oh-bench-" + random.Random(self.seed ^ 0x70CE).randbytes(16).hex()
        if args.workdir:
            self.work = os.path.abspath(args.workdir)
            os.makedirs(self.work, exist_ok=True)
            self.own_work = False
        else:
            self.work = tempfile.mkdtemp(prefix="hingnetd-bench.", dir=args.tmpdir)
            self.own_work = True
        os.chmod(self.work, 0o755)
        self.logs = os.path.join(self.work, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.files = Files(os.path.join(self.work, "files"), self.seed)
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
            and k not in ("HINGNET_TOKEN", "HINGNETD_CONFIG", "RUST_LOG", "NOTIFY_SOCKET", "CREDENTIALS_DIRECTORY")
            # The bucket's key and endpoint are given explicitly (--only s3); an AWS_CA_BUNDLE
            # from outside makes rclone 1.60 refuse to start ("unable to load custom CA bundle").
            and not k.startswith(("AWS_", "RCLONE_", "GARAGE_"))
        }
        self.env["NO_PROXY"] = self.env["no_proxy"] = "127.0.0.1,127.0.0.2"
        self.daemon_env = dict(self.env)
        for kv in args.daemon_env:
            k, _, v = kv.partition("=")
            self.daemon_env[k] = v
        self.garage_bin = garage_binary(args.garage)
        self.garages = []  # nodes running, stopped by cleanup() if a run fails
        self.runs = []  # throughput samples
        self.results = {}
        self.anomalies = []
        self.counter = 0
        self.server = None

    # -- helpers --

    def fresh_dir(self, name):
        self.counter += 1
        d = os.path.join(self.work, "runs", f"{self.counter:03d}-{name}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        return d

    def anomaly(self, where, what):
        self.anomalies.append({"where": where, "what": what})
        log(f"  ! {where}: {what}")

    def settle(self):
        """Writes back whatever an earlier run left dirty, so it is not billed to the next one."""
        os.sync()
        time.sleep(0.2)

    def check_space(self):
        p = self.profile
        need = 2 * p["large"] + sum(n * s for n, s in (p["small"], p["medium"], p["conc16"]))
        need += max(p["large"], p["small"][0] * p["small"][1], p["medium"][0] * p["medium"][1])
        need += p["scale_rows"] * 1500 + 512 * MiB
        if "s3" in self.args.only:
            # At most one run at a time: the bucket's copy and, for copyto, the local one too.
            biggest = max(p["large"], p["medium"][0] * p["medium"][1])
            if not set(self.args.only) - {"s3"}:
                need = p["large"] + p["medium"][0] * p["medium"][1] + 512 * MiB
            need += 2 * biggest + 256 * MiB
        st = os.statvfs(self.work)
        free = st.f_bavail * st.f_frsize
        log(f"work dir {self.work}: {free / GiB:.1f} GiB free, about {need / GiB:.1f} GiB needed")
        if free < need:
            raise SystemExit(f"bench: not enough space in {self.work} (use --workdir or --tmpdir)")

    def environment(self):
        cpu = "?"
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        mem = "?"
        try:
            for line in open("/proc/meminfo"):
                if line.startswith("MemTotal"):
                    mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
        except OSError:
            pass
        sha_ni = "?"
        try:
            sha_ni = "yes" if " sha_ni" in open("/proc/cpuinfo").read() else "no"
        except OSError:
            pass
        repo = self.args.repo
        head = cmd_out(["git", "-C", repo, "rev-parse", "--short=12", "HEAD"]) if repo else "?"
        dirty = cmd_out(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"]) if repo else ""
        return {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu,
            "cores": os.cpu_count(),
            "sha_ni": sha_ni,
            "memory": mem,
            "kernel": platform.release(),
            "filesystem": cmd_out(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", self.work]),
            "work_dir": self.work,
            "hingnetd": f"{cmd_out([self.bin, '--version'])} ({self.bin}); checkout at git {head}{' with uncommitted changes' if dirty else ''}",
            "curl": cmd_out(["curl", "--version"]).splitlines()[0] if shutil.which("curl") else "missing",
            "aria2c": cmd_out(["aria2c", "--version"]).splitlines()[0] if shutil.which("aria2c") else "missing",
            "sha256sum": cmd_out(["sha256sum", "--version"]).splitlines()[0],
            "sqlite3": cmd_out(["sqlite3", "--version"]).split(" ")[0],
            "nginx": self.server.version if self.server else "?",
            "python": platform.python_version(),
            "daemon_env": " ".join(self.args.daemon_env) or "none",
            "loadavg_start": open("/proc/loadavg").read().split()[:3],
        }

    def scan_logs(self):
        """WARN/ERROR lines in the daemons' logs, grouped by message."""
        seen = {}
        for name in sorted(os.listdir(self.logs)):
            with open(os.path.join(self.logs, name), errors="replace") as f:
                for line in f:
                    if " WARN " in line or " ERROR " in line or "panicked" in line:
                        # Strip the timestamp and the IDs so that repeats group together.
                        text = line.strip()
                        key = text.split(" ", 1)[1] if text[:4].isdigit() else text
                        key = " ".join(w for w in key.split() if not w.startswith(("video_id=", "elapsed_ms=", "bytes=")))
                        entry = seen.setdefault(key[:300], {"count": 0, "logs": set(), "example": text[:400]})
                        entry["count"] += 1
                        entry["logs"].add(name)
        return [
            {"message": k, "count": v["count"], "runs": sorted(v["logs"])[:5], "example": v["example"]}
            for k, v in sorted(seen.items(), key=lambda kv: -kv[1]["count"])
        ]

    # -- throughput workloads --

    def sample(self, workload, tool, rnd, wall, nbytes, nfiles, ru, maxrss_kib, ok, error=None, extra=None):
        s = {
            "workload": workload,
            "tool": tool,
            "round": rnd,
            "wall_s": wall,
            "bytes": nbytes,
            "files": nfiles,
            "cpu_s": (ru.ru_utime + ru.ru_stime) if ru else None,
            "user_s": ru.ru_utime if ru else None,
            "sys_s": ru.ru_stime if ru else None,
            "maxrss_kib": maxrss_kib,
            "ok": ok,
            "error": error,
            "loadavg": open("/proc/loadavg").read().split()[0],
        }
        if extra:
            s.update(extra)
        self.runs.append(s)
        mib = nbytes / MiB
        log(
            f"  {workload:7} r{rnd} {tool:32} {wall:8.3f} s  {mib / wall:8.1f} MiB/s  "
            f"cpu {s['cpu_s'] or 0:6.2f} s  rss {(s['maxrss_kib'] or 0) / 1024:6.1f} MiB  {'ok' if ok else 'FAILED: ' + str(error)}"
        )

    def run_hingnetd(self, workload, rnd, ids, concurrency, tool="hingnetd", garage=None):
        """One batch on a fresh queue; into a fresh archive directory, or (`garage`) into that
        node's bucket, whose objects are then checked from outside."""
        nbytes = sum(self.files.size(i) for i in ids)
        suffix = "" if tool == "hingnetd" else "-" + re.sub(r"[^a-z0-9]+", "-", tool.split(",", 1)[-1].strip().lower())
        d = Daemon(self, f"{workload}-r{rnd}-hingnetd{suffix}", concurrency=concurrency, garage=garage)
        d.enqueue(ids)
        self.settle()
        err, extra = None, {}
        store_cpu0 = garage.cpu() if garage else None
        busy0 = machine_busy()
        try:
            t0 = d.start()
            d.wait_drained(timeout=self.args.timeout)
            extra["ready_s"] = d.notify.ready_at - t0 if d.notify.ready_at else None
        except RuntimeError as e:
            err = str(e)
        extra.update(self.busy_since(busy0))
        if garage:
            extra["store_cpu_s"] = garage.cpu() - store_cpu0
            extra["store_hwm_kib"] = garage.hwm_kib()
        extra["threads_max"] = d.max_threads
        code, ru = d.stop()
        con = d.ro()
        rows = {r[0]: r[1:] for r in con.execute(
            "SELECT video_id, state, sha256, bytes, last_error, finished_at, path FROM queue")}
        con.close()
        bad = [
            f"{i}: {rows.get(i)}"
            for i in ids
            if i not in rows or rows[i][0] != "done" or rows[i][1] != self.files.sha(i) or rows[i][2] != self.files.size(i)
        ]
        if bad and not err:
            err = f"{len(bad)} rows wrong, e.g. {bad[0]}"
        if garage and not err:
            problem, seen = self.check_bucket_hingnetd(garage, d, ids, rows)
            extra.update(seen)
            err = problem
        wall = None
        if not err:
            t_end = max(parse_ts(r[4]) for r in rows.values())
            wall = t_end - t0
        if code != 0 and not err:
            err = f"exit code {code}"
        self.sample(workload, tool, rnd, wall or float("nan"), nbytes, len(ids), ru, d.hwm_kib, err is None, err, extra)
        d.remove()

    @staticmethod
    def busy_since(start):
        """The whole machine's busy CPU seconds (every core, every process) since `start`, a
        machine_busy() reading: beside a tool's own CPU, it shows what else ran."""
        busy0, _ = start
        busy1, _ = machine_busy()
        return {"machine_busy_s": (busy1 - busy0) / os.sysconf("SC_CLK_TCK")}

    def check_bucket_hingnetd(self, garage, d, ids, rows):
        """What the bucket holds, asked of Garage by the harness's own SigV4 client: each row's
        path is s3://bucket/<prefix><id>/<sha256>.mp4 for the source file's SHA-256, the listing
        shows that key with the file's size (and no other video object), and HeadObject gives
        the same size and the store's own x-amz-checksum-sha256 of what it received, equal to
        the source file's. Nothing is left in staging. (problem or None, figures)."""
        listing = garage.api.list(garage.BUCKET, d.prefix)
        wrong = []
        for i in ids:
            key = f"{d.prefix}{i}/{self.files.sha(i)}.mp4"
            if rows[i][5] != f"s3://{garage.BUCKET}/{key}":
                wrong.append(f"{i}: the row's path is {rows[i][5]}, not s3://{garage.BUCKET}/{key}")
            elif listing.get(key) != self.files.size(i):
                wrong.append(f"{i}: the listing has {key} at {listing.get(key)} bytes, not {self.files.size(i)}")
            else:
                head = garage.api.head(garage.BUCKET, key)
                want = (self.files.size(i), sha256_b64(self.files.sha(i)))
                if head != want:
                    wrong.append(f"{i}: HeadObject {key} says {head}, not {want}")
        videos = [k for k in listing if k.endswith(".mp4")]
        if len(videos) != len(ids):
            wrong.append(f"{len(videos)} video objects under {d.prefix}, for {len(ids)} videos")
        staged = [os.path.join(r, n) for r, _, names in os.walk(d.staging) for n in names]
        if staged:
            wrong.append(f"{len(staged)} files left in staging, e.g. {staged[0]}")
        seen = {"objects": len(listing), "video_objects": len(videos),
                "object_bytes": sum(listing[k] for k in videos), "sidecars": sum(k.endswith(".json") for k in listing)}
        return (f"{len(wrong)} wrong in the bucket, e.g. {wrong[0]}" if wrong else None), seen

    def run_peer(self, workload, rnd, tool, template, ids, garage=None, key_prefix=None, local_files=True):
        nbytes = sum(self.files.size(i) for i in ids)
        d = self.fresh_dir(f"{workload}-r{rnd}-{tool.split()[0].split('+')[0]}")
        out = os.path.join(d, "out")
        os.makedirs(out)
        sums = os.path.join(d, "sums.txt")
        ids_file = os.path.join(d, "ids.txt")
        with open(ids_file, "w") as f:
            f.write("".join(i + "\n" for i in ids))
        urls = os.path.join(d, "urls.txt")
        with open(urls, "w") as f:
            for i in ids:
                f.write(f"{self.server.api}/v1/videos/{i}/content\n  out={i}.mp4\n")
        cmd = template.format(
            curl=CURL.format(hdr=shlex.quote(self.hdr_file)),
            out=shlex.quote(out),
            id=ids[0],
            api=self.server.api,
            sums=shlex.quote(sums),
            ids=shlex.quote(ids_file),
            urls=shlex.quote(urls),
            aria_conf=shlex.quote(self.aria_conf),
            remote=shlex.quote(f"garage:{garage.BUCKET}/{key_prefix}") if garage else "",
        )
        env = self.env
        if garage:
            conf = os.path.join(d, "rclone.conf")  # empty: the remote is in the environment
            open(conf, "w").close()
            env = dict(self.env, **garage.rclone_env(conf))
        # GNU time forks the shell, so the tree's ru_maxrss is not inflated by Python's own RSS
        # (exec() carries the peak RSS of the process that forked over).
        rss_file = os.path.join(d, "rss.txt")
        self.settle()
        extra = {}
        store_cpu0 = garage.cpu() if garage else None
        t0 = time.time()
        p = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", rss_file, "bash", "-c", cmd], env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=open(os.path.join(d, "stderr.txt"), "w"))
        busy0 = machine_busy()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.time() - t0
        extra.update(self.busy_since(busy0))
        if garage:
            extra["store_cpu_s"] = garage.cpu() - store_cpu0
            extra["store_hwm_kib"] = garage.hwm_kib()
        p.returncode = code = os.waitstatus_to_exitcode(status)
        try:
            maxrss = int(open(rss_file).read().split()[-1])
        except (OSError, ValueError, IndexError):
            maxrss = None
        err = None
        if code != 0:
            err = f"exit code {code}: " + open(os.path.join(d, "stderr.txt"), errors="replace").read()[-300:]
        else:
            wrong = []
            if local_files:
                wrong = [i for i in ids if not os.path.exists(os.path.join(out, i + ".mp4"))
                         or os.path.getsize(os.path.join(out, i + ".mp4")) != self.files.size(i)]
            if garage:
                # The peer's objects, from the harness's own listing: every key, its size.
                listing = garage.api.list(garage.BUCKET, key_prefix)
                wrong += [f"{i}: the bucket has {listing.get(key_prefix + i + '.mp4')} bytes" for i in ids
                          if listing.get(key_prefix + i + ".mp4") != self.files.size(i)]
                extra.update(objects=len(listing), object_bytes=sum(listing.values()))
            if "sha256sum" in template:
                got = {}
                for line in open(sums):
                    h, _, name = line.strip().partition("  ")
                    got[os.path.basename(name)[:-4]] = h
                wrong += [i for i in ids if got.get(i) != self.files.sha(i)]
            if wrong:
                err = f"{len(wrong)} files wrong, e.g. {wrong[0]}"
        self.sample(workload, tool, rnd, wall, nbytes, len(ids), ru, maxrss, err is None, err, extra)
        shutil.rmtree(d, ignore_errors=True)

    def throughput(self, workload, ids, concurrency):
        peers = PEERS[PEER_OF[workload]] if PEER_OF[workload] else {}
        rounds = self.profile["rounds"].get(workload, 1) if peers else 1
        if self.args.no_peers:
            peers = {}
        tools = ["hingnetd", *peers]
        self.files.prewarm(ids)
        for rnd in range(1, rounds + 1):
            k = (rnd - 1) % len(tools)
            for tool in tools[k:] + tools[:k]:  # alternate which tool goes first
                if tool == "hingnetd":
                    self.run_hingnetd(workload, rnd, ids, concurrency)
                else:
                    self.run_peer(workload, rnd, tool, peers[tool], ids)

    # -- profiling (--profile): where hingnetd's time goes, not part of the timed run --

    def observe(self, workload, ids, concurrency, tool, out):
        """One hingnetd batch with an observer attached once the daemon is READY and before the
        rows are inserted. Returns (seconds, observer command)."""
        d = Daemon(self, f"profile-{workload}-{tool}", concurrency=concurrency)
        self.settle()
        d.start()
        d.wait_ready()
        pid = str(d.proc.pid)
        if tool == "strace-summary":
            cmd = ["strace", "-c", "-f", "-p", pid, "-o", out]
        elif tool == "strace-io":
            cmd = ["strace", "-f", "-y", "-qq", "-p", pid, "-o", out, "-e",
                   "trace=read,recvfrom,recvmsg,readv,write,writev,pwrite64,pwritev,sendto,sendmsg,"
                   "fsync,fdatasync,sync_file_range,openat,rename,renameat,renameat2,flock,ftruncate,fallocate"]
        else:
            cmd = ["perf", "record", "-F", "999", "-g", "-p", pid, "-o", out, "--quiet"]
        obs = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=open(out + ".stderr", "w"))
        time.sleep(1.5)  # attached to every thread
        t0 = time.time()
        d.enqueue(ids)
        err = None
        try:
            d.wait_drained(timeout=self.args.timeout)
        except RuntimeError as e:
            err = str(e)
        con = d.ro()
        last = con.execute("SELECT max(finished_at) FROM queue").fetchone()[0]
        con.close()
        secs = parse_ts(last) - t0 if last else None
        obs.send_signal(signal.SIGINT)
        try:
            obs.wait(60)
        except subprocess.TimeoutExpired:
            obs.kill()
            obs.wait()
        d.stop()
        d.remove()
        if err:
            raise RuntimeError(err)
        return secs, " ".join(cmd)

    @staticmethod
    def io_histogram(trace):
        """Counts, bytes and size distribution per (syscall, kind of file descriptor)."""
        rx = re.compile(r"^\d+\s+(\w+)\((\d+)<([^>]*)>.*\)\s+=\s+(-?\d+)")
        stats = {}
        pending = {}  # pid -> start of a call another thread's line interrupted
        for line in open(trace, errors="replace"):
            line = line.rstrip("\n")
            pid = line.split(" ", 1)[0]
            if line.endswith("<unfinished ...>"):
                pending[pid] = line[: -len("<unfinished ...>")].rstrip()
                continue
            if "resumed>" in line and pid in pending:
                line = pending.pop(pid) + line.split("resumed>", 1)[1]
            m = rx.match(line)
            if not m:
                continue
            call, target, ret = m.group(1), m.group(3), int(m.group(4))
            if target.startswith(("socket:", "TCP:", "TCPv6:", "UNIX:")) or "TCP" in target:
                kind = "socket"
            elif target.endswith(".part") or target.endswith(".mp4"):
                kind = "video file"
            elif ".db" in target:
                kind = "database"
            elif target.startswith("/"):
                kind = "directory/other file" if not target.endswith((".db", "-wal", "-shm")) else "database"
            else:
                kind = target.split(":")[0] or "?"
            st = stats.setdefault((call, kind), {"calls": 0, "bytes": 0, "sizes": []})
            st["calls"] += 1
            if ret > 0 and call not in ("openat", "flock", "fsync", "fdatasync", "ftruncate"):
                st["bytes"] += ret
                st["sizes"].append(ret)
        lines = [f"{'syscall':14} {'fd':22} {'calls':>9} {'MiB':>9} {'p50 B':>9} {'p90 B':>9} {'max B':>9}"]
        for (call, kind), st in sorted(stats.items(), key=lambda kv: -kv[1]["calls"]):
            sz = sorted(st["sizes"])
            q = lambda p: sz[min(len(sz) - 1, int(len(sz) * p))] if sz else 0  # noqa: E731
            lines.append(f"{call:14} {kind:22} {st['calls']:9d} {st['bytes'] / MiB:9.1f} {q(0.5):9d} {q(0.9):9d} {q(1.0) if sz else 0:9d}")
        return "\n".join(lines)

    def profile_workload(self, workload, ids, concurrency):
        out_dir = self.args.results or os.path.join(HERE, "results")
        os.makedirs(out_dir, exist_ok=True)
        report = os.path.join(out_dir, f"profile-{workload}.txt")
        nbytes = sum(self.files.size(i) for i in ids)
        self.files.prewarm(ids)
        text = [f"hingnetd profile: {workload}, {len(ids)} file(s), {nbytes / MiB:,.0f} MiB, concurrency {concurrency}",
                f"binary {self.bin}; seed {self.seed}; observers attach after READY, before the rows are inserted.",
                "Times under an observer are slower than the real thing: read the counts, not the speed.\n"]
        for tool in ("strace-summary", "strace-io", "perf"):
            exe = "perf" if tool == "perf" else "strace"
            if not shutil.which(exe):
                text.append(f"== {tool}: {exe} not installed\n")
                continue
            raw = os.path.join(self.work, f"profile-{workload}-{tool}.out")
            log(f"  profile {workload}: {tool}")
            secs, cmd = self.observe(workload, ids, concurrency, tool, raw)
            text.append(f"== {tool}: {cmd}\n   batch took {secs:.2f} s under the observer\n")
            if tool == "strace-summary":
                text.append(open(raw, errors="replace").read())
            elif tool == "strace-io":
                text.append(self.io_histogram(raw))
                text.append("")
            else:
                for sort in ("dso", "symbol"):
                    r = subprocess.run(["perf", "report", "-i", raw, "--stdio", "--no-children", "-g", "none",
                                        "--sort", sort, "--percent-limit", "0.7"], capture_output=True, text=True)
                    keep = [re.sub(r"(\s+-)+\s*$", "", l).rstrip() for l in r.stdout.splitlines()
                            if l.strip() and not l.startswith("#")]
                    text.append("\n".join(keep)[:12000])
                    text.append("")
            for f in (raw, raw + ".stderr"):
                try:
                    os.remove(f)
                except FileNotFoundError:
                    pass
        with open(report, "w") as fh:
            fh.write("\n".join(text) + "\n")
        log(f"written: {report}")

    # -- the bandwidth cap (download.rate_limit) --

    def archive_bytes(self, d):
        """Bytes in the archive directory (partials and finished files): what the daemon has
        written, read from outside. Partials are not preallocated, so a size is bytes written."""
        total = 0
        try:
            with os.scandir(d.archive) as it:
                for e in it:
                    if e.name.endswith((".mp4", ".mp4.part")):
                        try:
                            total += e.stat().st_size
                        except FileNotFoundError:
                            pass  # renamed from partial to final between listing and stat
        except FileNotFoundError:
            pass
        return total

    def rate_window(self, name, conc, limit, ids, warmup, window):
        """One daemon, `conc` downloads of files large enough to last the window, a warm-up,
        then the archive's growth over the window, sampled every second."""
        d = Daemon(self, name, concurrency=conc, rate_limit=limit)
        self.settle()
        d.start()
        d.wait_ready()
        d.enqueue(ids)
        con = d.ro()
        deadline = time.time() + 30
        while con.execute("SELECT count(*) FROM queue WHERE state = 'downloading'").fetchone()[0] < conc:
            if time.time() > deadline:
                raise RuntimeError(f"{name}: {conc} downloads did not start: {d.log_tail()}")
            time.sleep(0.01)
        time.sleep(warmup)
        samples = []
        t_end = time.time() + window
        while True:
            t = time.time()
            samples.append((t, self.archive_bytes(d)))
            if t >= t_end:
                break
            time.sleep(min(1.0, max(0.0, t_end - time.time())))
        unfinished = con.execute("SELECT count(*) FROM queue WHERE state = 'downloading'").fetchone()[0]
        con.close()
        d.stop()
        d.remove()
        if unfinished < conc:
            self.anomaly(name, f"only {unfinished} of {conc} downloads were still running at the end of the window")
        (t0, b0), (t1, b1) = samples[0], samples[-1]
        per_s = [(bb - ba) / (tb - ta) for (ta, ba), (tb, bb) in zip(samples, samples[1:]) if tb > ta]
        return (b1 - b0) / (t1 - t0), t1 - t0, b1 - b0, per_s

    def rate(self):
        cfg = self.profile["rate"]
        limit = cfg["limit"]
        # One file, linked under every ID: the server sends one page-cached file, and the disk
        # holds it once, however many downloads read it.
        self.files.ensure(["rate_src"], cfg["file"])
        self.files.prewarm(["rate_src"])
        src = self.files.path("rate_src")
        n = max(cfg["concurrency"])
        ids = [f"rate_{i:02d}" for i in range(n)]
        for i in ids:
            dst = self.files.path(i)
            if not os.path.exists(dst):
                os.link(src, dst)
        out = {"limit_bytes_s": limit, "window_s": cfg["window"], "warmup_s": cfg["warmup"], "runs": []}
        # The headroom: one whole file with no limit, from the INSERT to the row's finished_at.
        d = Daemon(self, "rate-unlimited", concurrency=1)
        self.settle()
        d.start()
        d.wait_ready()
        t0 = time.time()
        d.enqueue(ids[:1])
        d.wait_drained(timeout=self.args.timeout)
        con = d.ro()
        t1 = parse_ts(con.execute("SELECT finished_at FROM queue").fetchone()[0])
        con.close()
        d.stop()
        d.remove()
        got = cfg["file"] / (t1 - t0)
        out["unlimited_c1_bytes_s"] = got
        log(f"  rate: unlimited, 1 download: {got / MiB:.0f} MiB/s ({cfg['file'] / MiB:.0f} MiB in {t1 - t0:.2f} s; "
            "the headroom)")
        for conc in cfg["concurrency"]:
            got, secs, nbytes, per_s = self.rate_window(f"rate-c{conc}", conc, limit, ids[:conc], cfg["warmup"],
                                                        cfg["window"])
            dev = (got - limit) / limit * 100
            r = {"concurrency": conc, "achieved_bytes_s": got, "window_s": secs, "bytes": nbytes,
                 "deviation_pct": dev, "per_second_min": min(per_s) if per_s else None,
                 "per_second_max": max(per_s) if per_s else None}
            out["runs"].append(r)
            log(f"  rate: limit {limit / MiB:.0f} MiB/s, {conc:2} downloads: {got / MiB:.2f} MiB/s over {secs:.1f} s "
                f"({dev:+.2f}%), per second {r['per_second_min'] / MiB:.1f}..{r['per_second_max'] / MiB:.1f} MiB/s")
        self.results["rate"] = out

    # -- pickup latency --

    def pickup(self):
        n = self.profile["pickup"]
        ids = [f"pick_{i:04d}" for i in range(n)]
        d = Daemon(self, "pickup", concurrency=8, poll="60s")
        t0 = d.start()
        d.wait_ready()
        ready_s = d.notify.ready_at - t0
        time.sleep(1)
        since = self.server.log_offset()
        rng = random.Random(self.seed + 1)
        sh = subprocess.Popen(["sqlite3", d.db], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, bufsize=1, env=self.env)
        sh.stdin.write(".timeout 10000\n.print started\n")
        sh.stdin.flush()
        sh.stdout.readline()
        acks, sends, gaps = {}, {}, []
        for vid in ids:
            sends[vid] = time.time()
            sh.stdin.write(f"INSERT OR IGNORE INTO queue(video_id) VALUES ('{vid}');\n.print ok\n")
            sh.stdin.flush()
            line = sh.stdout.readline()
            acks[vid] = time.time()
            if line.strip() != "ok":
                self.anomaly("pickup", f"sqlite3 shell said {line.strip()!r}")
            gap = rng.uniform(0.020, 0.050)
            gaps.append(gap)
            time.sleep(gap)
        sh.stdin.close()
        sh.wait()
        err = None
        try:
            d.wait_drained(timeout=self.args.timeout)
        except RuntimeError as e:
            err = str(e)
        code, ru = d.stop()
        first = self.server.first_requests(since, "pick_")
        missing = [v for v in ids if v not in first]
        if missing:
            err = err or f"{len(missing)} IDs never requested, e.g. {missing[0]}"
        r = {
            **self.pickup_figures(ids, first, sends, acks, gaps),
            "ready_s": ready_s,
            "maxrss_kib": d.hwm_kib,
            "cpu_s": (ru.ru_utime + ru.ru_stime) if ru else None,
            "ok": err is None,
            "error": err,
        }
        log(f"  pickup: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.1f} ms over "
            f"{n - len(missing)} inserts" if r["p50_ms"] is not None else f"  pickup: no latencies ({err})")
        self.results["pickup"] = r
        d.remove()

    @staticmethod
    def pickup_figures(ids, first, sends, acks, gaps):
        """Pickup latency, ms: from the producer's acknowledgement of each INSERT (`acks`) to the
        first request for that ID in the access log (`first`), and from sending it (`sends`)."""
        lat = [(first[v] - acks[v]) * 1000 for v in ids if v in first]
        # The commit happened between sending the INSERT and reading the shell's marker: latency
        # from the marker is the figure (it can come out slightly negative when the daemon is
        # faster than this process reading the pipe); from the send, an upper bound.
        lat_send = [(first[v] - sends[v]) * 1000 for v in ids if v in first]
        ack_ms = [(acks[v] - sends[v]) * 1000 for v in ids]
        return {
            "inserts": len(ids),
            "p50_ms": pct(lat, 50),
            "p90_ms": pct(lat, 90),
            "p99_ms": pct(lat, 99),
            "max_ms": max(lat) if lat else None,
            "min_ms": min(lat) if lat else None,
            "mean_ms": statistics.fmean(lat) if lat else None,
            "over_250ms": sum(1 for x in lat if x > 250),
            "from_send_p50_ms": pct(lat_send, 50),
            "from_send_p99_ms": pct(lat_send, 99),
            "negative": sum(1 for x in lat if x < 0),
            "insert_ack_p50_ms": pct(ack_ms, 50),
            "insert_ack_p99_ms": pct(ack_ms, 99),
            "gap_ms_mean": statistics.fmean(gaps) * 1000,
        }

    # -- idle cost --

    def idle_one(self, label, rows, in_window):
        secs = self.profile["idle_seconds"]
        d = Daemon(self, f"idle-{label}", concurrency=8, poll="5s", initial_delay="10m")
        if rows:
            # The state a 400 ("not ready") leaves behind: one attempt, its next one later.
            # Spread between 10 and 70 minutes from now, so none falls due in the window.
            con = sqlite3.connect(d.db, timeout=30)
            rng = random.Random(self.seed + 2)
            with con:
                con.executemany(
                    "INSERT INTO queue(video_id, attempts, http_status, last_error, first_attempt_at, next_attempt_at) "
                    "VALUES (?, 1, 400, 'not ready (400): Video is not ready yet, try again later', "
                    "strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?))",
                    [(f"notready_{i:05d}", f"+{rng.randint(600, 4200)} seconds") for i in range(rows)],
                )
            con.close()
        since = self.server.log_offset()
        t0 = d.start()
        d.wait_ready()
        # Start-up work (orphan check, first look, the status line) is not idle time.
        time.sleep(self.profile["idle_settle"])
        pid = d.proc.pid
        c0, s0, w0 = proc_cpu(pid), proc_ctxsw(pid), time.time()
        in_window.set()
        time.sleep(secs)
        c1, s1, w1 = proc_cpu(pid), proc_ctxsw(pid), time.time()
        rss = proc_rss_kib(pid)
        code, ru = d.stop()
        # Only this daemon's IDs: pickup runs beside it. (The empty queue has none to ask for.)
        requests = len(self.server.first_requests(since, "notready_"))
        cpu = c1 - c0
        r = {
            "rows": rows,
            "window_s": w1 - w0,
            "cpu_s": cpu,
            "cpu_pct_of_core": 100 * cpu / (w1 - w0),
            "wakeups_per_s": (s1 - s0) / (w1 - w0),
            "rss_kib": rss,
            "requests_during_run": requests,
            "ready_s": d.notify.ready_at - t0,
            "ok": code == 0,
        }
        if requests:
            self.anomaly(f"idle-{label}", f"{requests} API requests while the queue held only not-due rows")
        log(f"  idle {label}: {cpu:.2f} CPU s over {w1 - w0:.0f} s = {r['cpu_pct_of_core']:.3f}% of a core, "
            f"{r['wakeups_per_s']:.1f} context switches/s, RSS {rss / 1024:.1f} MiB")
        d.remove()
        return r

    def idle(self, during=None):
        """Both idle daemons side by side, and `during` (pickup) run while their windows are
        open: one minute for the three instead of three. Each idle daemon's CPU is its own,
        read from /proc, and none of them shares a database or an ID with another."""
        out, errors = {}, []
        cases = [("empty", "empty", 0), ("not_ready", "notready", self.profile["idle_rows"])]
        events = [threading.Event() for _ in cases]

        def one(key, label, rows, ev):
            try:
                out[key] = self.idle_one(label, rows, ev)
            except BaseException as e:  # noqa: BLE001 (re-raised in the main thread)
                errors.append(e)
            finally:
                ev.set()

        threads = [threading.Thread(target=one, args=(*c, ev)) for c, ev in zip(cases, events)]
        for t in threads:
            t.start()
        for ev in events:
            ev.wait()
        try:
            if during and not errors:
                during()
        finally:
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
        self.results["idle"] = out

    # -- queue scale --

    def build_scale_db(self):
        p = self.profile
        n, pending = p["scale_rows"], p["scale_pending"]
        old = n - pending
        d = Daemon(self, "scale-base")
        path = d.db
        t = time.time()
        # Mostly done (one in 110 failed), with the attempt_log row each of them left, then the
        # pending ones. IDs look like real ones ('video_' + 48 hex digits) and, like ULID-based
        # ones, sort in creation order. Timestamps go back 23 days, one per 500 rows.
        # Built with a rollback journal, no syncs and a large cache, then switched back to WAL as
        # the daemon left it.
        blocks = old // 500 + 1
        sql = f"""
PRAGMA journal_mode = DELETE;
PRAGMA synchronous = OFF;
PRAGMA cache_size = -1000000;
BEGIN;
CREATE TEMP TABLE stamp(k INTEGER PRIMARY KEY, t TEXT);
WITH RECURSIVE c(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM c WHERE k < {blocks})
INSERT INTO stamp SELECT k, strftime('%Y-%m-%dT%H:%M:%fZ', 'now', printf('-%d seconds', ({blocks} - k) * 1000 + 3600)) FROM c;
WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {old})
INSERT INTO queue(video_id, state, attempts, next_attempt_at, last_error, http_status, path, sha256,
                  bytes, enqueued_at, first_attempt_at, finished_at)
SELECT id, st, 1, ts,
       CASE st WHEN 'failed' THEN 'not found (404, confirmed by the status endpoint)' END,
       CASE st WHEN 'done' THEN 200 ELSE 404 END,
       CASE st WHEN 'done' THEN '{d.archive}/' || id || '.mp4' END,
       CASE st WHEN 'done' THEN printf('%08x%08x%08x%08x%08x%08x%08x%08x',
            (i * 2654435761) % 4294967296, (i * 2246822519 + 7) % 4294967296,
            (i * 3266489917 + 11) % 4294967296, (i * 668265263 + 13) % 4294967296,
            (i * 374761393 + 17) % 4294967296, (i * 2654435761 + 19) % 4294967296,
            (i * 2246822519 + 23) % 4294967296, i) END,
       CASE st WHEN 'done' THEN 5000000 + (i * 7919) % 60000000 END,
       ts, ts, ts
FROM (SELECT i,
             printf('video_%012x%08x%08x%08x%08x%04x', 1700000000000 + i * 2000,
                    (i * 2654435761 + {self.seed}) % 4294967296, (i * 2246822519) % 4294967296,
                    (i * 3266489917) % 4294967296, (i * 668265263) % 4294967296, i % 65536) AS id,
             CASE WHEN i % 110 = 0 THEN 'failed' ELSE 'done' END AS st,
             (SELECT t FROM stamp WHERE k = i / 500) AS ts
      FROM c);
INSERT INTO attempt_log(video_id, at, attempt, outcome, http_status, bytes, elapsed_ms, detail)
SELECT video_id, finished_at, 1, CASE state WHEN 'done' THEN 'done' ELSE 'failed' END, http_status,
       bytes, 900, CASE state WHEN 'done' THEN 'archived' ELSE last_error END
FROM queue WHERE state IN ('done', 'failed');
WITH RECURSIVE c(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM c WHERE i < {pending - 1})
INSERT INTO queue(video_id, enqueued_at, next_attempt_at)
SELECT printf('scale_p_%04d', i), strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-60 seconds'),
       strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-60 seconds') FROM c;
COMMIT;
PRAGMA journal_mode = WAL;
"""
        r = subprocess.run(["sqlite3", path], input=sql, capture_output=True, text=True, env=self.env)
        if r.returncode != 0:
            raise RuntimeError(f"building the scale database: {r.stderr}")
        build_s = time.time() - t
        base = os.path.join(self.work, "scale-base.db")
        os.replace(path, base)
        d.remove()
        log(f"  scale: built {n:,} rows in {build_s:.1f} s, {os.path.getsize(base) / MiB:.0f} MiB")
        return base, build_s

    def scale(self):
        p = self.profile
        base, build_s = self.build_scale_db()
        probes = [f"scale_probe_{i:02d}" for i in range(p["scale_probes"])]
        rounds = []
        for rnd in range(1, p["scale_rounds"] + 1):
            # The daemon logs each claim's own time (the UPDATE and its commit) at debug level.
            d = Daemon(self, f"scale-r{rnd}", concurrency=8, poll="5s", db=base,
                       env={"RUST_LOG": "info,hingnetd::queue=debug"})
            # After the copy: its 650 MiB of dirty pages would otherwise be written back by the
            # daemon's first WAL checkpoint, and billed to one claim (a 559 ms one was seen).
            self.settle()
            r = {"round": rnd}
            # `status` with no daemon running, straight after the copy (page cache warm).
            r["status_cold_s"] = d.timed("status")
            since = self.server.log_offset()
            log_from = os.path.getsize(d.log_path) if os.path.exists(d.log_path) else 0
            t0 = d.start()
            d.wait_ready()
            r["ready_s"] = d.notify.ready_at - t0
            d.wait_drained(timeout=self.args.timeout, where="video_id >= 'scale_p_' AND video_id < 'scale_q'")
            first = self.server.first_requests(since, "scale_p_")
            r["first_request_s"] = min(first.values()) - t0 if first else None
            r["ready_to_first_request_ms"] = (min(first.values()) - d.notify.ready_at) * 1000 if first else None
            con = d.ro()
            last = con.execute(
                "SELECT max(finished_at) FROM queue WHERE video_id >= 'scale_p_' AND video_id < 'scale_q'"
            ).fetchone()[0]
            con.close()
            r["drain_pending_s"] = parse_ts(last) - min(first.values()) if first and last else None
            time.sleep(1)
            # `status` against a running daemon.
            r["status_s"] = [d.timed("status") for _ in range(p["status_reps"])]
            r["status_json_s"] = d.timed("status", "--json")
            r["list_s"] = d.timed("list", "--limit", "20")
            # Idle cost with a million rows.
            pid = d.proc.pid
            c0, w0 = proc_cpu(pid), time.time()
            time.sleep(p["scale_idle_seconds"])
            r["idle_cpu_pct"] = 100 * (proc_cpu(pid) - c0) / (time.time() - w0)
            # Insert → first request, one ID at a time, on the big table.
            since2 = self.server.log_offset()
            acks = {}
            sh = subprocess.Popen(["sqlite3", d.db], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, bufsize=1, env=self.env)
            sh.stdin.write(".timeout 10000\n.print started\n")
            sh.stdin.flush()
            sh.stdout.readline()
            for vid in probes:
                sh.stdin.write(f"INSERT OR IGNORE INTO queue(video_id) VALUES ('{vid}');\n.print ok\n")
                sh.stdin.flush()
                sh.stdout.readline()
                acks[vid] = time.time()
                time.sleep(0.2)
            sh.stdin.close()
            sh.wait()
            d.wait_drained(timeout=60, where="video_id >= 'scale_probe_' AND video_id < 'scale_probf'")
            f2 = self.server.first_requests(since2, "scale_probe_")
            lat = [(f2[v] - acks[v]) * 1000 for v in probes if v in f2]
            r["insert_to_request_ms"] = {"p50": pct(lat, 50), "max": max(lat) if lat else None, "n": len(lat)}
            code, ru = d.stop()
            with open(d.log_path, errors="replace") as f:
                f.seek(log_from)
                # "claimed due rows claimed=N took_us=T", for the claims that got a row.
                claims = [int(m.group(1)) / 1000 for m in map(CLAIM_LINE.search, f) if m]
            r["claim_ms"] = {"p50": pct(claims, 50), "p99": pct(claims, 99), "max": max(claims) if claims else None,
                             "n": len(claims)}
            r["maxrss_kib"] = d.hwm_kib
            r["exit_code"] = code
            r["db_bytes"] = sum(
                os.path.getsize(d.db + s) for s in ("", "-wal", "-shm") if os.path.exists(d.db + s)
            )
            log(f"  scale r{rnd}: READY {r['ready_s'] * 1000:.0f} ms, first request {r['first_request_s'] * 1000:.0f} ms, "
                f"status {median(r['status_s']) * 1000:.0f} ms (cold {r['status_cold_s'] * 1000:.0f} ms), "
                f"insert→request p50 {r['insert_to_request_ms']['p50']:.1f} ms, idle {r['idle_cpu_pct']:.3f}% of a core, "
                f"claim p50 {r['claim_ms']['p50'] or 0:.2f} ms (n {r['claim_ms']['n']})")
            rounds.append(r)
            d.remove()
        if not self.args.keep_data:
            os.remove(base)
        self.results["scale"] = {
            "rows": p["scale_rows"],
            "pending": p["scale_pending"],
            "build_s": build_s,
            "rounds": rounds,
            "ready_s": median([r["ready_s"] for r in rounds]),
            "first_request_s": median([r["first_request_s"] for r in rounds]),
            "ready_to_first_request_ms": median([r["ready_to_first_request_ms"] for r in rounds]),
            "status_s": median([s for r in rounds for s in r["status_s"]]),
            "status_cold_s": median([r["status_cold_s"] for r in rounds]),
            "status_json_s": median([r["status_json_s"] for r in rounds]),
            "list_s": median([r["list_s"] for r in rounds]),
            "insert_to_request_p50_ms": median([r["insert_to_request_ms"]["p50"] for r in rounds]),
            "claim_p50_ms": median([r["claim_ms"]["p50"] for r in rounds if r["claim_ms"]["n"]]),
            "claim_p99_ms": median([r["claim_ms"]["p99"] for r in rounds if r["claim_ms"]["n"]]),
            "claim_max_ms": max((r["claim_ms"]["max"] for r in rounds if r["claim_ms"]["n"]), default=None),
            "claims": sum(r["claim_ms"]["n"] for r in rounds),
            "idle_cpu_pct": median([r["idle_cpu_pct"] for r in rounds]),
            "db_bytes": max(r["db_bytes"] for r in rounds),
            "maxrss_kib": max(r["maxrss_kib"] or 0 for r in rounds),
        }

    # -- a fleet on PostgreSQL (--only fleet) --

    def fleet_ids(self):
        cfg = self.profile["fleet"]
        return [f"fleet_{i:05d}" for i in range(cfg["files"])], [f"fpick_{i:04d}" for i in range(cfg["pickup"])]

    def fleet_daemons(self, pg, db, label, k):
        """k daemons on one database, each with its own config, archive directory and instance
        name (d1..dk); LISTEN wakes them, the poll is only the safety net. Claims are logged at
        debug level, with the daemon's own timing of each."""
        pg.sql("postgres", f"CREATE DATABASE {db} OWNER hingnetd")
        return [Daemon(self, f"fleet-{label}-d{i}", concurrency=8, poll="60s", database=pg.url(db), instance=f"d{i}",
                       env={"RUST_LOG": "info,hingnetd::queue=debug"}) for i in range(1, k + 1)]

    @staticmethod
    def fleet_wait(con, daemons, timeout):
        """Polls on the harness's own connection until no row is pending or downloading."""
        deadline = time.time() + timeout
        while True:
            left, retry = map(int, con.run(
                "SELECT count(*) FILTER (WHERE state IN ('pending', 'downloading')), "
                "count(*) FILTER (WHERE state = 'pending' AND last_error IS NOT NULL) FROM queue")[0].split("|"))
            if left == 0:
                return
            # As in Daemon.wait_drained: nothing here should need a second attempt.
            if retry:
                row = con.run("SELECT video_id, attempts, last_error FROM queue "
                              "WHERE state = 'pending' AND last_error IS NOT NULL LIMIT 1")[0]
                raise RuntimeError(f"a daemon will retry: {row}")
            for d in daemons:
                if not alive(d.proc.pid):
                    raise RuntimeError(f"{d.name}: hingnetd exited with {left} rows left: {d.log_tail()}")
            if time.time() > deadline:
                raise RuntimeError(f"{left} rows still unfinished after {timeout}s")
            time.sleep(0.1)

    def fleet_check(self, where, ids, con, daemons):
        """Every row done with the file's SHA-256 and size, archived once, by one of the fleet,
        into that daemon's archive, where the file hashes to the same. {instance: rows}."""
        rows = {}
        for line in con.run("SELECT video_id, state, sha256, bytes, archived_on, path FROM queue"):
            vid, *rest = line.split("|")
            rows[vid] = rest
        archives = {d.instance: d.archive for d in daemons}
        shares = dict.fromkeys(archives, 0)
        bad = []
        for i in ids:
            r = rows.get(i)
            if (r is None or r[0] != "done" or r[1] != self.files.sha(i) or r[2] != str(self.files.size(i))
                    or r[3] not in archives or r[4] != os.path.join(archives[r[3]], i + ".mp4")):
                bad.append(f"{i}: {r}")
                continue
            shares[r[3]] += 1
            try:
                with open(r[4], "rb") as f:
                    got = hashlib.sha256(f.read()).hexdigest()  # tiny files
            except OSError as e:
                got = str(e)
            if got != self.files.sha(i):
                bad.append(f"{i}: the file in {r[3]}'s archive: {got}")
        # Each ID in one archive only: a second daemon downloading a claimed row would show here.
        held = {}
        for d in daemons:
            for name in os.listdir(d.archive) if os.path.isdir(d.archive) else []:
                if name.endswith(".mp4") and not name.startswith("."):
                    held.setdefault(name[:-4], []).append(d.instance)
        twice = {v: on for v, on in held.items() if len(on) > 1}
        if bad:
            self.anomaly(where, f"{len(bad)} of {len(ids)} rows or files wrong, e.g. {bad[0]}")
        if twice:
            v = next(iter(twice))
            self.anomaly(where, f"{len(twice)} videos in more than one archive, e.g. {v} in {', '.join(twice[v])}")
        return shares, len(bad) + len(twice)

    @staticmethod
    def fleet_claims(daemons):
        """(rows, ms) of every claim in the daemons' logs (each log is its daemon's alone)."""
        out = []
        for d in daemons:
            with open(d.log_path, errors="replace") as f:
                out += [(int(m.group(1)), int(m.group(2)) / 1000) for m in map(CLAIM_ANY.search, f) if m]
        return out

    @staticmethod
    def claim_figures(claims):
        # Latency of the claims that got a row, as scale reports it; the empty ones counted apart.
        got = [ms for n, ms in claims if n]
        return {"p50": pct(got, 50), "p99": pct(got, 99), "max": max(got) if got else None, "n": len(got),
                "empty": len(claims) - len(got), "rows_per_claim": sum(n for n, _ in claims) / len(got) if got else None}

    def fleet_drain(self, pg, k, ids):
        """k daemons spawned together on a queue that already holds every ID: from the first
        spawn to the latest finished_at."""
        label = f"fleet-k{k}"
        daemons = self.fleet_daemons(pg, f"fleet_{k}", f"k{k}", k)
        # A producer's batch: the producers' statement, once per ID, in one transaction.
        pg.sql(f"fleet_{k}", "BEGIN;\n" + "".join(
            f"INSERT INTO queue(video_id) VALUES ('{i}') ON CONFLICT DO NOTHING;\n" for i in ids) + "COMMIT;\n")
        con = Psql(pg, f"fleet_{k}")
        self.settle()
        since = self.server.log_offset()
        err, wall, spread, t0 = None, None, None, None
        cpu0, (busy0, total0) = pg.cpu(), machine_busy()
        try:
            spawns = [d.start() for d in daemons]
            t0, spread = spawns[0], spawns[-1] - spawns[0]
            self.fleet_wait(con, daemons, self.args.timeout)
            # Before the daemons stop: PostgreSQL's and the machine's CPU over the drain only.
            cpu1, (busy1, total1) = pg.cpu(), machine_busy()
            wall = float(con.run("SELECT extract(epoch FROM max(finished_at)) FROM queue")[0]) - t0
        except RuntimeError as e:
            err = str(e)
            cpu1, (busy1, total1) = pg.cpu(), machine_busy()
        finally:
            stops = [d.stop() for d in daemons]
        shares, wrong = self.fleet_check(label, ids, con, daemons)
        con.close()
        if wrong and not err:
            err = f"{wrong} rows or files wrong"
        # Start-up's part of the drain, which weighs more the smaller the batch.
        first = self.server.first_requests(since, "fleet_")
        per = []
        for d, (code, ru) in zip(daemons, stops):
            cpu = (ru.ru_utime + ru.ru_stime) if ru else None
            c = self.claim_figures(self.fleet_claims([d]))
            per.append({"instance": d.instance, "rows": shares[d.instance], "cpu_s": cpu,
                        "user_s": ru.ru_utime if ru else None, "sys_s": ru.ru_stime if ru else None,
                        "cpu_pct_of_core": 100 * cpu / wall if cpu is not None and wall else None,
                        "maxrss_kib": d.hwm_kib, "exit_code": code, "claims": c})
            if code != 0 and not err:
                err = f"{d.instance} exited {code}"
        run = {
            "daemons": k,
            "files": len(ids),
            "wall_s": wall,
            "files_s": len(ids) / wall if wall else None,
            "spawn_spread_ms": spread * 1000 if spread is not None else None,
            "first_request_s": min(first.values()) - t0 if first and t0 else None,
            "per_daemon": per,
            "daemons_cpu_s": sum(p["cpu_s"] or 0 for p in per),
            "postgres_cpu_s": cpu1 - cpu0,
            "machine_busy_pct": 100 * (busy1 - busy0) / (total1 - total0) if total1 > total0 else None,
            "claim_ms": self.claim_figures(self.fleet_claims(daemons)),
            "loadavg": open("/proc/loadavg").read().split()[0],
            "ok": err is None,
            "error": err,
        }
        c, fr = run["claim_ms"], run["first_request_s"]
        head = (f"{len(ids)} files in {wall:.2f} s = {run['files_s']:.1f} files/s, the first request "
                f"{fr * 1000 if fr is not None else float('nan'):.0f} ms after the spawn") if wall else f"FAILED: {err}"
        log(f"  fleet {k} daemon(s): {head}; rows {' / '.join(str(p['rows']) for p in per)}; "
            f"CPU {' / '.join(format(p['cpu_s'] or 0, '.2f') for p in per)} s, PostgreSQL {run['postgres_cpu_s']:.2f} s, "
            f"machine {run['machine_busy_pct'] or 0:.0f}% busy; claim p50 {c['p50'] or 0:.2f} ms, p99 {c['p99'] or 0:.2f} ms "
            f"(n {c['n']}, {c['empty']} empty)")
        for d in daemons:
            d.remove()
        return run

    def fleet_pickup(self, pg, k, ids):
        """Pickup latency as `pickup` measures it, the producer a long-lived psql, k daemons
        waiting on an empty queue (each INSERT's NOTIFY reaches them all)."""
        label = f"fleet-pickup-k{k}"
        daemons = self.fleet_daemons(pg, f"fleet_pickup_{k}", f"pickup-k{k}", k)
        err, ready, sh = None, [], None
        acks, sends, gaps = {}, {}, []
        try:
            for d in daemons:
                d.start()
            ready = [d.wait_ready() - d.t_spawn for d in daemons]
            time.sleep(1)
            since = self.server.log_offset()
            rng = random.Random(self.seed + 3)
            sh = Psql(pg, f"fleet_pickup_{k}")
            for vid in ids:
                sends[vid] = time.time()
                said = sh.run(f"INSERT INTO queue(video_id) VALUES ('{vid}') ON CONFLICT DO NOTHING")
                acks[vid] = time.time()
                if said:
                    self.anomaly(label, f"psql said {' / '.join(said)!r}")
                gap = rng.uniform(0.020, 0.050)
                gaps.append(gap)
                time.sleep(gap)
            self.fleet_wait(sh, daemons, self.args.timeout)
        except RuntimeError as e:
            err = str(e)
        finally:
            stops = [d.stop() for d in daemons]
        shares = {}
        if sh:
            shares, wrong = self.fleet_check(label, ids, sh, daemons)
            sh.close()
            if wrong and not err:
                err = f"{wrong} rows or files wrong"
        first = self.server.first_requests(since, "fpick_") if acks else {}
        missing = [v for v in ids if v not in first]
        if missing and not err:
            err = f"{len(missing)} IDs never requested, e.g. {missing[0]}"
        for d, (code, _) in zip(daemons, stops):
            if code != 0 and not err:
                err = f"{d.instance} exited {code}"
        r = {
            "daemons": k,
            **(self.pickup_figures(ids, first, sends, acks, gaps) if len(acks) == len(ids) else {"inserts": len(ids)}),
            "ready_s": max(ready) if ready else None,
            "rows_per_daemon": shares,
            "cpu_s": [(ru.ru_utime + ru.ru_stime) if ru else None for _, ru in stops],
            "maxrss_kib": max((d.hwm_kib or 0) for d in daemons),
            "claim_ms": self.claim_figures(self.fleet_claims(daemons)),
            "ok": err is None,
            "error": err,
        }
        log(f"  fleet pickup, {k} daemon(s): p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.1f} ms "
            f"over {len(ids) - len(missing)} inserts; rows {' / '.join(str(n) for n in shares.values())}"
            if r.get("p50_ms") is not None else f"  fleet pickup, {k} daemon(s): no latencies ({err})")
        for d in daemons:
            d.remove()
        return r

    def fleet(self):
        cfg = self.profile["fleet"]
        ids, pick = self.fleet_ids()
        self.files.prewarm(ids + pick)
        pg = Postgres(os.path.join(self.work, "postgres"), self.env)
        out = {"postgres": pg.version, "files": len(ids), "file_bytes": TINY, "concurrency": 8, "runs": [],
               "pickup": []}
        try:
            log(f"  fleet: {pg.version}, 127.0.0.1:{pg.port}, fsync on; {len(ids):,} × {TINY // KiB} KiB files")
            # The daemons' role owns their databases, as in a real fleet; the harness is the superuser.
            pg.sql("postgres", "CREATE ROLE hingnetd LOGIN")
            for k in cfg["daemons"]:
                out["runs"].append(self.fleet_drain(pg, k, ids))
            for k in cfg["pickup_daemons"]:
                out["pickup"].append(self.fleet_pickup(pg, k, pick))
        finally:
            pg.stop()
            out["postgres_log"] = pg.log_problems()
            pg.remove()
        by_k = {r["daemons"]: r for r in out["runs"]}
        one = by_k.get(1)
        out["scaling"] = {f"k{k}_over_k1": r["files_s"] / one["files_s"] for k, r in by_k.items()
                          if k != 1 and one and one["files_s"] and r["files_s"]}
        if one and one["ok"]:
            # What the 2.5× target presumes: one daemon is held back by CPU, its own or the machine's.
            used = one["per_daemon"][0]["cpu_pct_of_core"] or 0
            out["one_daemon_cpu_bound"] = (
                "its own core" if used >= 80 else "the machine's cores, all busy" if (one["machine_busy_pct"] or 0) >= 90
                else None)
        for line in out["postgres_log"][:5]:
            self.anomaly("fleet: PostgreSQL's log", line[:300])
        out["ok"] = all(r["ok"] for r in out["runs"] + out["pickup"])
        self.results["fleet"] = out

    # -- an archive bucket (--only s3) --

    def s3_sets(self):
        p = self.profile
        return {"s3-large": (["large_0"], p["large"], "large"),
                "s3-medium": ([f"medium_{i:03d}" for i in range(p["medium"][0])], p["medium"][1], "many")}

    def garage_node(self, name):
        g = Garage(self.garage_bin, os.path.join(self.work, "garage", name), self.env,
                   "bench-" + random.Random(self.seed ^ 0x53).randbytes(16).hex())
        self.garages.append(g)
        return g

    def garage_done(self, g, where):
        g.stop()
        self.garages.remove(g)
        problems = g.log_problems()
        self.results.setdefault("s3", {}).setdefault("garage_log", []).extend(problems)
        for line in problems[:3]:
            self.anomaly(f"{where}: Garage's log", line[:300])
        g.remove()

    def s3(self):
        """The large and medium files, API to bucket: hingnetd (concurrency 8, archive.dir =
        s3://bucket/prefix/) against curl | rclone rcat and curl + sha256sum + rclone copyto, and
        hingnetd into a local directory for the ratio. Every bucket run gets a fresh Garage."""
        cfg = self.profile["s3"]
        conc = cfg["concurrency"]
        out = {"garage": cmd_out([self.garage_bin, "--version"]), "garage_bin": self.garage_bin,
               "rclone": cmd_out(["rclone", "version"]).splitlines()[0], "bucket": Garage.BUCKET,
               "concurrency": conc, "rounds": cfg["rounds"], "garage_log": []}
        self.results["s3"] = out
        log(f"  s3: {out['garage']}; {out['rclone']}; a fresh node per bucket run, fsync on")
        for w, (ids, _, kind) in self.s3_sets().items():
            peers = {} if self.args.no_peers else S3_PEERS[kind]
            tools = ["hingnetd", S3_LOCAL, *peers]
            for rnd in range(1, cfg["rounds"][w] + 1):
                k = (rnd - 1) % len(tools)
                for tool in tools[k:] + tools[:k]:  # alternate which tool goes first
                    t_run = time.time()
                    # Garage's writes go through the page cache: read the sources in again.
                    self.files.prewarm(ids)
                    t_warm = time.time() - t_run
                    if tool == S3_LOCAL:
                        self.run_hingnetd(w, rnd, ids, conc, tool=tool)
                    else:
                        g = self.garage_node(f"{w}-r{rnd}-{len(self.runs)}")
                        try:
                            if tool == "hingnetd":
                                self.run_hingnetd(w, rnd, ids, conc, garage=g)
                            else:
                                cmd, local = peers[tool]
                                self.run_peer(w, rnd, tool, cmd, ids, garage=g,
                                              key_prefix="rcat/" if "rcat" in tool else "copyto/", local_files=local)
                        finally:
                            self.garage_done(g, f"{w} r{rnd} {tool}")
                    log(f"    ({time.time() - t_run:.0f} s in all: prewarm {t_warm:.1f} s, then the run, its check "
                        "and clean-up)")
        out["ok"] = all(smp["ok"] for smp in self.runs if smp["workload"] in self.s3_sets())

    # -- driver --

    def main(self):
        p = self.profile
        t_start = time.time()
        log(f"hingnetd benchmark ({'smoke' if self.args.smoke else 'full'}): seed {self.seed}, "
            f"rounds {p['rounds']}{', s3 ' + str(p['s3']['rounds']) if 's3' in self.args.only else ''}, "
            f"workloads {', '.join(self.args.only)}")
        self.check_space()
        build = None
        if self.args.build:
            # The build (minutes on 2 cores) runs while the files are generated (I/O mostly).
            log(f"bench: {self.args.build} (while the files are generated)")
            build = subprocess.Popen(shlex.split(self.args.build), cwd=self.args.repo or None)
        self.server = Server(os.path.join(self.work, "nginx"), self.files.root, self.token)
        self.hdr_file = os.path.join(self.work, "auth-header")
        self.aria_conf = os.path.join(self.work, "aria2.conf")
        for path, text in ((self.hdr_file, f"Authorization: Bearer {self.token}\n"),
                           (self.aria_conf, f"header=Authorization: Bearer {self.token}\n")):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(fd, text.encode())
            os.close(fd)
        log(f"server: API {self.server.api}, CDN http://127.0.0.2:{self.server.cdn_port}; token file {self.hdr_file}")

        sets = {
            "large": (["large_0"], p["large"], 1),
            "small": ([f"small_{i:04d}" for i in range(p["small"][0])], p["small"][1], 8),
            "medium": ([f"medium_{i:03d}" for i in range(p["medium"][0])], p["medium"][1], 8),
            "conc16": ([f"conc16_{i:02d}" for i in range(p["conc16"][0])], p["conc16"][1], 16),
        }
        t = time.time()
        made = 0
        for w, (ids, size, _) in sets.items():
            if w in self.args.only:
                made += self.files.ensure(ids, size)
        if "pickup" in self.args.only:
            made += self.files.ensure([f"pick_{i:04d}" for i in range(p["pickup"])], TINY)
        if "scale" in self.args.only:
            made += self.files.ensure([f"scale_p_{i:04d}" for i in range(p["scale_pending"])], TINY)
            made += self.files.ensure([f"scale_probe_{i:02d}" for i in range(p["scale_probes"])], TINY)
        if "fleet" in self.args.only:
            for ids in self.fleet_ids():
                made += self.files.ensure(ids, TINY)
        if "s3" in self.args.only:
            for ids, size, _ in self.s3_sets().values():
                made += self.files.ensure(ids, size)
        os.sync()
        gen_s = time.time() - t
        log(f"files: {made / GiB:.2f} GiB written in {gen_s:.1f} s (seed {self.seed})")
        if build:
            tb = time.time()
            if build.wait() != 0:
                raise RuntimeError(f"the build failed: {self.args.build} exited {build.returncode}")
            log(f"bench: build done ({time.time() - tb:.0f} s after the files)")
        if not os.access(self.bin, os.X_OK):
            raise RuntimeError(f"no hingnetd binary at {self.bin}")
        env = self.environment()

        # The server answers as the daemon expects, before anything is timed.
        probe = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", "-H", f"@{self.hdr_file}",
             f"{self.server.api}/v1/videos/notready_x/content"], capture_output=True, text=True, env=self.env)
        if not probe.stdout.startswith("400"):
            raise RuntimeError(f"server self-check (not ready) failed: {probe.stdout} {probe.stderr}")

        if self.args.profile:
            for w in WORKLOADS:
                if w in self.args.only and w in sets:
                    ids, _, conc = sets[w]
                    self.profile_workload(w, ids, conc)
            self.server.stop()
            return True

        together = "pickup" in self.args.only and "idle" in self.args.only
        for w in WORKLOADS + OPT_IN:
            if w not in self.args.only or (w == "pickup" and together):
                continue
            name = "idle + pickup, side by side" if w == "idle" and together else w
            log(f"== {name}")
            tw = time.time()
            if w in sets:
                ids, _, conc = sets[w]
                self.throughput(w, ids, conc)
            elif w == "idle":
                self.idle(during=self.pickup if together else None)
            else:
                getattr(self, w)()
            took = time.time() - tw
            self.results.setdefault("phase_seconds", {})[name] = took
            log(f"  ({name}: {took:.0f} s)")
        self.server.stop()
        env["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        report = self.report(env, gen_s, time.time() - t_start)
        return report

    # -- report --

    def summary(self):
        """Medians per (workload, tool) over the rounds that succeeded."""
        out = {}
        for s in self.runs:
            out.setdefault((s["workload"], s["tool"]), []).append(s)
        rows = {}
        for (w, tool), ss in out.items():
            good = [s for s in ss if s["ok"]]
            wall = median([s["wall_s"] for s in good])
            nbytes, nfiles = ss[0]["bytes"], ss[0]["files"]
            cpu = median([s["cpu_s"] for s in good])
            rows[(w, tool)] = {
                "workload": w,
                "tool": tool,
                "runs": len(ss),
                "ok_runs": len(good),
                "wall_s": wall,
                "wall_s_all": [s["wall_s"] for s in ss],
                "mib_s": nbytes / MiB / wall if wall else None,
                "files_s": nfiles / wall if wall else None,
                "cpu_s": cpu,
                "cpu_s_per_gib": cpu / (nbytes / GiB) if cpu is not None else None,
                "maxrss_mib": max((s["maxrss_kib"] or 0) for s in good) / 1024 if good else None,
                "bytes": nbytes,
                "files": nfiles,
            }
        for (w, tool), r in rows.items():
            h = rows.get((w, "hingnetd"))
            if tool != "hingnetd" and h and h["wall_s"] and r["wall_s"]:
                r["hingnetd_speedup"] = r["wall_s"] / h["wall_s"]
                r["hingnetd_cpu_ratio"] = h["cpu_s"] / r["cpu_s"] if r["cpu_s"] else None
        return rows

    def targets(self, rows):
        t = []

        def add(name, ok, value):
            t.append({"target": name, "status": "n/a" if ok is None else ("met" if ok else "missed"), "measured": value})

        def speed(w, tool):
            r = rows.get((w, tool))
            return r.get("hingnetd_speedup") if r else None

        x = speed("large", "curl+sha256sum+sync")
        add("large: ≥ 2× curl -o + sha256sum + sync", None if x is None else x >= 2, f"{x:.2f}×" if x else "-")
        x = speed("large", "curl+sync")
        add("large: within 10% of curl -o + sync (time ≤ 1.10×)", None if x is None else 1 / x <= 1.10,
            f"hingnetd takes {1 / x:.2f}× the time" if x else "-")
        x = speed("small", "xargs -P8 curl+sha256sum+sync")
        add("small: ≥ 2× xargs -P 8 curl + sha256sum + sync", None if x is None else x >= 2, f"{x:.2f}×" if x else "-")
        x = speed("small", "aria2c -j8")
        add("small: faster than aria2c -j 8", None if x is None else x > 1, f"{x:.2f}×" if x else "-")
        r = rows.get(("conc16", "hingnetd"))
        m = r["maxrss_mib"] if r else None
        size = self.profile["conc16"][1]
        add(f"peak RSS < 32 MiB at concurrency 16 ({size // MiB} MiB files)", None if m is None else m < 32,
            f"{m:.1f} MiB" if m else "-")
        # The local archive's workloads (the s3 ones are reported on their own below).
        allrss = [r["maxrss_mib"] for (w, tool), r in rows.items()
                  if tool == "hingnetd" and r["maxrss_mib"] and not w.startswith("s3-")]
        if allrss:
            add("peak RSS < 32 MiB, every throughput workload", max(allrss) < 32, f"max {max(allrss):.1f} MiB")
        pk = self.results.get("pickup")
        if pk and pk["p50_ms"] is not None:
            add("pickup p50 < 50 ms", pk["p50_ms"] < 50, f"{pk['p50_ms']:.1f} ms")
            add("pickup p99 < 250 ms", pk["p99_ms"] < 250, f"{pk['p99_ms']:.1f} ms")
        idle = self.results.get("idle")
        if idle:
            for k, label in (("empty", "empty queue"), ("not_ready", f"{idle['not_ready']['rows']:,} not-ready rows")):
                v = idle[k]["cpu_pct_of_core"]
                add(f"idle CPU < 0.5% of a core ({label})", v < 0.5, f"{v:.3f}%")
        sc = self.results.get("scale")
        if sc:
            n = f"{sc['rows']:,} rows"
            add(f"{n}: start-up < 1 s (spawn → READY=1)", sc["ready_s"] < 1, f"{sc['ready_s'] * 1000:.0f} ms")
            add(f"{n}: start-up < 1 s (spawn → first request)", sc["first_request_s"] < 1,
                f"{sc['first_request_s'] * 1000:.0f} ms")
            if sc.get("claim_p50_ms") is not None:
                add(f"{n}: claim < 1 ms (the daemon's own timing of its claim: UPDATE + commit; p50)",
                    sc["claim_p50_ms"] < 1,
                    f"p50 {sc['claim_p50_ms']:.2f} ms, p99 {sc['claim_p99_ms']:.2f} ms, max {sc['claim_max_ms']:.2f} ms "
                    f"over {sc['claims']} claims")
            else:
                add(f"{n}: claim < 1 ms", None, "no claim timings in the daemon's log")
            add(f"{n}: `hingnetd status` < 200 ms", sc["status_s"] < 0.2, f"{sc['status_s'] * 1000:.0f} ms")
        if self.results.get("s3"):
            for w, label in self.s3_labels().items():
                kind = "large" if w == "s3-large" else "many"
                rcat, copyto = S3_PEERS[kind]
                x = speed(w, copyto)
                add(f"s3, {label}: ≥ 2× {copyto}", None if x is None else x >= 2, f"{x:.2f}×" if x else "-")
                x = speed(w, rcat)
                add(f"s3, {label}: faster than {rcat}", None if x is None else x > 1, f"{x:.2f}×" if x else "-")
                h, loc = rows.get((w, "hingnetd")), rows.get((w, S3_LOCAL))
                if h and loc and h["wall_s"] and loc["wall_s"]:
                    t.append({"target": f"s3, {label}: hingnetd's time into the bucket ÷ into a local directory",
                              "status": "reported", "measured": f"{h['wall_s'] / loc['wall_s']:.2f}× "
                              f"({h['wall_s']:.2f} s against {loc['wall_s']:.2f} s)"})
                if h and h["maxrss_mib"]:
                    t.append({"target": f"s3, {label}: hingnetd's peak RSS into the bucket, concurrency "
                              f"{self.profile['s3']['concurrency']}", "status": "reported",
                              "measured": f"{h['maxrss_mib']:.1f} MiB"
                              + (f" (local directory: {loc['maxrss_mib']:.1f} MiB)" if loc and loc["maxrss_mib"] else "")})
        rt = self.results.get("rate")
        if rt:
            for r in rt["runs"]:
                add(f"rate_limit {rt['limit_bytes_s'] / MiB:.0f} MiB/s held within 5% over {rt['window_s']:.0f} s, "
                    f"{r['concurrency']} download(s)", abs(r["deviation_pct"]) <= 5,
                    f"{r['achieved_bytes_s'] / MiB:.2f} MiB/s ({r['deviation_pct']:+.2f}%)")
        fl = self.results.get("fleet")
        if fl:
            x = fl["scaling"].get("k3_over_k1")
            one = next((r for r in fl["runs"] if r["daemons"] == 1 and r["ok"]), None)
            # Whether the premise held is part of the figure: on a machine whose cores are all busy
            # (daemons, PostgreSQL and nginx share them), more daemons cannot go faster.
            why = (f"; one daemon used {one['per_daemon'][0]['cpu_pct_of_core']:.0f}% of a core, the machine "
                   f"{one['machine_busy_pct']:.0f}% busy ({os.cpu_count()} cores): "
                   + (f"CPU-bound on {fl['one_daemon_cpu_bound']}" if fl.get("one_daemon_cpu_bound") else "not CPU-bound")
                   ) if one else ""
            add("fleet: 3 daemons ≥ 2.5× one daemon's drain rate, where one daemon is CPU-bound",
                None if x is None else x >= 2.5, (f"{x:.2f}×" if x else "-") + why)
            for pk in fl["pickup"]:
                v = pk.get("p50_ms")
                add(f"fleet: pickup p50 < 50 ms on PostgreSQL, {pk['daemons']} daemon(s)", None if v is None else v < 50,
                    f"{v:.1f} ms" if v is not None else "-")
        return t

    def s3_labels(self):
        p = self.profile
        return {"s3-large": f"one large file, {p['large'] / MiB:,.0f} MiB",
                "s3-medium": f"{p['medium'][0]:,} × {p['medium'][1] / MiB:g} MiB"}

    def s3_report(self, rows, f):
        s3 = self.results["s3"]
        conc = s3["concurrency"]
        L = ["\n## Archive bucket (S3)\n"]
        L.append(f"API to bucket on a private {s3['garage']} (`{s3['garage_bin']}`): one node on 127.0.0.1, its own "
                 "directory in the work dir (the same disk as the files and the staging directory), "
                 "`data_fsync` and `metadata_fsync` on, sqlite metadata, `server --single-node --default-bucket`; "
                 "a fresh node for every bucket run (Garage deduplicates blocks, so bytes uploaded twice into one "
                 "node would be written once) and stopped after its check. hingnetd: concurrency "
                 f"{conc}, `archive.dir = \"s3://{s3['bucket']}/hingnet/\"`, `path_style = true`, "
                 "`download.max_bytes = \"5GiB\"`, staging beside the queue; the same batch into a local "
                 "directory archive for the ratio. Peers: "
                 f"{s3['rclone']}, the remote `garage:` from the environment (type s3, provider Other, the node's "
                 "endpoint, region garage, force_path_style; an empty config file), rclone's defaults otherwise; "
                 "8 at a time with `xargs -P 8` for the many files. Wall time as in *Throughput*; CPU = "
                 "the tool's process tree (wait4), Garage's separately (its /proc utime+stime over the same span); "
                 f"machine busy = every core's busy time (/proc/stat) over the run ÷ (wall × {os.cpu_count()} cores), "
                 "and other CPU = that busy time less the tool's and Garage's: nginx, the kernel's writeback, and "
                 "whatever else ran on the machine. "
                 "Checked after every run, from outside: hingnetd's rows all `done` with the source's SHA-256 and "
                 "size, each row's path `s3://bucket/hingnet/<id>/<sha256>.mp4`, that key in a ListObjectsV2 "
                 "listing with the file's size, HeadObject's size and `x-amz-checksum-sha256` (the store's own "
                 "hash of what it received) equal to the source's, and nothing left in staging; a peer's "
                 "objects all listed with the right size (and copyto's `sha256sum` output right).\n")
        L.append("| workload | tool | into | wall s | MiB/s | files/s | CPU s/GiB | Garage CPU s/GiB | "
                 "machine busy | other CPU s | peak RSS MiB | hingnetd speed-up | rounds [wall s] |")
        L.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        labels = self.s3_labels()
        for w in labels:
            for (ww, tool), r in rows.items():
                if ww != w:
                    continue
                mine = [smp for smp in self.runs if smp["workload"] == w and smp["tool"] == tool and smp["ok"]]
                store = median([smp.get("store_cpu_s") for smp in mine])
                # Busy = all cores over the run; other = busy less the tool's and Garage's CPU
                # (nginx, kernel threads' writeback, and anything else running on the machine).
                busy = median([100 * smp["machine_busy_s"] / (smp["wall_s"] * os.cpu_count())
                               for smp in mine if smp.get("machine_busy_s") is not None])
                other = median([max(0.0, smp["machine_busy_s"] - (smp["cpu_s"] or 0) - (smp.get("store_cpu_s") or 0))
                                for smp in mine if smp.get("machine_busy_s") is not None])
                name = "hingnetd" if tool in ("hingnetd", S3_LOCAL) else tool.replace("|", "\\|")
                into = "local directory" if tool == S3_LOCAL else "bucket"
                speedup = r.get("hingnetd_speedup") if tool != S3_LOCAL else None
                L.append(
                    f"| {labels[w]} | {name} | {into} | {f(r['wall_s'], '.2f')} | {f(r['mib_s'], '.0f')} | "
                    f"{f(r['files_s'], '.1f')} | {f(r['cpu_s_per_gib'], '.2f')} | "
                    f"{f(store / (r['bytes'] / GiB) if store is not None else None, '.2f')} | "
                    f"{f(busy, '.0f') + '%' if busy is not None else '-'} | {f(other, '.1f')} | "
                    f"{f(r['maxrss_mib'], '.1f')} | {f(speedup, '.2f') + '×' if speedup else '-'} | "
                    f"{r['ok_runs']}/{r['runs']} [{', '.join(f(x, '.2f') for x in r['wall_s_all'])}] |")
        ratios = []
        for w, label in labels.items():
            h, loc = rows.get((w, "hingnetd")), rows.get((w, S3_LOCAL))
            if h and loc and h["wall_s"] and loc["wall_s"]:
                ratios.append(f"{label} {h['wall_s'] / loc['wall_s']:.2f}×")
        if ratios:
            L.append("\nhingnetd's time into the bucket ÷ into a local directory: " + "; ".join(ratios) + ".")
        checked = [smp for smp in self.runs if smp["workload"] in labels and smp["tool"] == "hingnetd" and smp["ok"]]
        if checked:
            L.append(f"\nhingnetd's objects, checked in {len(checked)} run(s): "
                     + "; ".join(f"{smp['workload']} r{smp['round']}: {smp.get('video_objects')} videos "
                                 f"({smp.get('object_bytes', 0) / MiB:,.0f} MiB) + {smp.get('sidecars')} sidecars"
                                 for smp in checked) + ".")
        if s3["garage_log"]:
            L.append(f"\nGarage's logs: {len(s3['garage_log'])} WARN/ERROR line(s), e.g. `{s3['garage_log'][0][:300]}`.")
        return L

    def report(self, env, gen_s, total_s):
        rows = self.summary()
        targets = self.targets(rows)
        logs = self.scan_logs()
        p = self.profile
        kind = "smoke" if self.args.smoke else "full"
        L = []
        L.append(f"# hingnetd benchmark ({kind} run)\n")
        rounds = {w: n for w, n in p["rounds"].items() if w in self.args.only}
        if "s3" in self.args.only:
            rounds.update(p["s3"]["rounds"])
        L.append(f"{env['date']}; seed {self.seed}; rounds per throughput workload: "
                 f"{', '.join(f'{w} {n}' for w, n in (rounds or p['rounds']).items())} (medians shown; tools alternate "
                 f"which goes first); "
                 f"total {total_s:.0f} s (file generation {gen_s:.0f} s).\n")
        L.append(f"Machine: {env['cpu']}, {env['cores']} cores (SHA-NI: {env['sha_ni']}), {env['memory']} RAM, "
                 f"Linux {env['kernel']}, work dir on {env['filesystem']}. Load average at start "
                 f"{' '.join(env['loadavg_start'])}, at end {' '.join(env['loadavg_end'])}.\n")
        L.append(f"Binary: {env['hingnetd']}. Peers: {env['curl']}; {env['aria2c']}; {env['sha256sum']}. "
                 f"Server: {env['nginx']} (1 worker, sendfile). sqlite3 {env['sqlite3']}. Extra environment for "
                 f"hingnetd: {env['daemon_env']}.\n")
        L.append("## Throughput\n")
        L.append("Speed-up = peer's time ÷ hingnetd's time (above 1: hingnetd is faster). CPU = user+sys of the "
                 "whole process tree. Peak RSS = largest single process. Wall times of every round in brackets.\n")
        L.append("| workload | tool | wall s | MiB/s | files/s | CPU s/GiB | peak RSS MiB | hingnetd speed-up | hingnetd CPU ÷ peer CPU | rounds [wall s] |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
        labels = {
            "large": f"one large file, {p['large'] / MiB:,.0f} MiB",
            "small": f"{p['small'][0]:,} × {p['small'][1] / MiB:g} MiB, conc 8",
            "medium": f"{p['medium'][0]:,} × {p['medium'][1] / MiB:g} MiB, conc 8",
            "conc16": f"{p['conc16'][0]:,} × {p['conc16'][1] / MiB:g} MiB, conc 16",
        }
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        for w in ("large", "small", "medium", "conc16"):
            for (ww, tool), r in rows.items():
                if ww != w:
                    continue
                L.append(
                    f"| {labels[w]} | {tool} | {f(r['wall_s'], '.2f')} | {f(r['mib_s'], '.0f')} | {f(r['files_s'], '.1f')} | "
                    f"{f(r['cpu_s_per_gib'], '.2f')} | {f(r['maxrss_mib'], '.1f')} | "
                    f"{f(r.get('hingnetd_speedup'), '.2f') + '×' if r.get('hingnetd_speedup') else '-'} | "
                    f"{f(r.get('hingnetd_cpu_ratio'), '.2f')} | {r['ok_runs']}/{r['runs']} "
                    f"[{', '.join(f(x, '.2f') for x in r['wall_s_all'])}] |"
                )
        thr = {}
        for smp in self.runs:
            if smp["tool"] == "hingnetd" and smp.get("threads_max"):
                thr[smp["workload"]] = max(thr.get(smp["workload"], 0), smp["threads_max"])
        if thr:
            L.append("\nhingnetd's largest thread count seen while it worked: "
                     + ", ".join(f"{w} {n}" for w, n in thr.items()) + ".")
        pk = self.results.get("pickup")
        if pk:
            L.append("\n## Pickup latency\n")
            L.append(f"{pk['inserts']:,} inserts from one `sqlite3` shell, {pk['gap_ms_mean']:.0f} ms apart on average "
                     "(uniform 20–50 ms), `poll_interval = \"60s\"`. Latency = the shell's acknowledgement of the "
                     "committed INSERT → the first `/content` request in nginx's access log (ms resolution).\n")
            L.append("| p50 ms | p90 ms | p99 ms | max ms | min ms | > 250 ms | < 0 ms | from send p50 / p99 ms | INSERT ack p50 ms |")
            L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            L.append(f"| {f(pk['p50_ms'], '.1f')} | {f(pk['p90_ms'], '.1f')} | {f(pk['p99_ms'], '.1f')} | {f(pk['max_ms'], '.1f')} | "
                     f"{f(pk['min_ms'], '.1f')} | {pk['over_250ms']} | {pk['negative']} | "
                     f"{f(pk['from_send_p50_ms'], '.1f')} / {f(pk['from_send_p99_ms'], '.1f')} | {f(pk['insert_ack_p50_ms'], '.2f')} |")
            L.append("\nA negative latency means the daemon requested the video before this process had read the "
                     "shell's acknowledgement (the commit precedes it); \"from send\" counts from writing the INSERT "
                     "to the shell, an upper bound.")
        idle = self.results.get("idle")
        if idle:
            L.append("\n## Idle cost\n")
            L.append("| queue | window s | CPU s | % of one core | context switches/s | RSS MiB |")
            L.append("|---|---:|---:|---:|---:|---:|")
            for k, label in (("empty", "empty"), ("not_ready", f"{idle['not_ready']['rows']:,} not-ready rows, due in 10–70 min")):
                i = idle[k]
                L.append(f"| {label} | {i['window_s']:.0f} | {i['cpu_s']:.2f} | {i['cpu_pct_of_core']:.3f} | "
                         f"{i['wakeups_per_s']:.1f} | {i['rss_kib'] / 1024:.1f} |")
        sc = self.results.get("scale")
        if sc:
            L.append("\n## Queue scale\n")
            L.append(f"{sc['rows']:,} rows: {sc['rows'] - sc['pending']:,} finished (1 in 110 failed) with one "
                     f"attempt_log row each, {sc['pending']:,} pending ({sc['pending']:,} × 4 KiB files). Built in "
                     f"{sc['build_s']:.1f} s. Medians of {len(sc['rounds'])} round(s), each on a fresh copy.\n")
            L.append("| metric | value |")
            L.append("|---|---:|")
            for label, v in (
                ("database size (db + wal + shm)", f"{sc['db_bytes'] / MiB:.0f} MiB"),
                ("start-up: spawn → READY=1", f"{sc['ready_s'] * 1000:.0f} ms"),
                ("start-up: spawn → first request (first claim)", f"{sc['first_request_s'] * 1000:.0f} ms"),
                ("READY=1 → first request", f"{sc['ready_to_first_request_ms']:.1f} ms"),
                ("insert → first request on the big table (p50)", f"{sc['insert_to_request_p50_ms']:.1f} ms"),
                ("claim (UPDATE + commit, timed by the daemon), p50 / p99 / max",
                 f"{sc['claim_p50_ms']:.2f} / {sc['claim_p99_ms']:.2f} / {sc['claim_max_ms']:.2f} ms"
                 if sc.get("claim_p50_ms") is not None else "-"),
                ("`hingnetd status`, daemon running", f"{sc['status_s'] * 1000:.0f} ms"),
                ("`hingnetd status`, daemon stopped", f"{sc['status_cold_s'] * 1000:.0f} ms"),
                ("`hingnetd status --json`", f"{sc['status_json_s'] * 1000:.0f} ms"),
                ("`hingnetd list --limit 20`", f"{sc['list_s'] * 1000:.0f} ms"),
                (f"drain of the {sc['pending']:,} pending rows", f"{(median([r['drain_pending_s'] for r in sc['rounds']]) or 0):.2f} s"),
                ("idle CPU with the daemon running on it", f"{sc['idle_cpu_pct']:.3f}% of a core"),
                ("peak RSS", f"{sc['maxrss_kib'] / 1024:.1f} MiB"),
            ):
                L.append(f"| {label} | {v} |")
        rt = self.results.get("rate")
        if rt:
            L.append("\n## Bandwidth cap (download.rate_limit)\n")
            L.append(f"Limit {rt['limit_bytes_s'] / MiB:.0f} MiB/s for the whole daemon. Achieved = growth of the archive "
                     f"directory (partials and files, their sizes read from outside) over a {rt['window_s']:.0f} s window "
                     f"after a {rt['warmup_s']:g} s warm-up, every download running throughout. Without a limit one "
                     f"download gets {rt['unlimited_c1_bytes_s'] / MiB:.0f} MiB/s here.\n")
            L.append("| downloads | limit MiB/s | achieved MiB/s | deviation | 1-s samples, MiB/s |")
            L.append("|---:|---:|---:|---:|---|")
            for r in rt["runs"]:
                L.append(f"| {r['concurrency']} | {rt['limit_bytes_s'] / MiB:.0f} | {r['achieved_bytes_s'] / MiB:.2f} | "
                         f"{r['deviation_pct']:+.2f}% | {f(r['per_second_min'] / MiB, '.1f')} – "
                         f"{f(r['per_second_max'] / MiB, '.1f')} |")
        fl = self.results.get("fleet")
        if fl:
            L.append("\n## Fleet on PostgreSQL\n")
            L.append(f"{fl['files']:,} × {fl['file_bytes'] // KiB} KiB files, inserted in one transaction before the daemons "
                     f"start; then k daemons spawned together, each with its own config, archive directory and "
                     f"`queue.instance`, concurrency {fl['concurrency']}, `poll_interval = \"60s\"`, on one throwaway "
                     f"{fl['postgres']} on this machine (fsync on), a fresh database each. Drain = first spawn → the "
                     "latest `finished_at` (PostgreSQL's clock, this machine's). CPU per daemon = its wait4 rusage, spawn "
                     "to SIGTERM; PostgreSQL = its server processes' CPU over the drain; machine busy = all "
                     f"{os.cpu_count()} cores over the drain. Claims = the daemons' own timing of each claim "
                     "(`claimed due rows … took_us`) that got a row; empty = claims that got none.\n")
            L.append("| daemons | drain s | files/s | × one daemon | spawn → first request ms | rows per daemon | "
                     "CPU s per daemon | PostgreSQL CPU s | machine busy | claim p50 / p99 / max ms | claims (empty) | "
                     "rows per claim |")
            L.append("|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|")
            for r in fl["runs"]:
                c = r["claim_ms"]
                ratio = fl["scaling"].get(f"k{r['daemons']}_over_k1") if r["daemons"] != 1 else r["files_s"] and 1.0
                L.append(f"| {r['daemons']} | {f(r['wall_s'], '.2f')} | {f(r['files_s'], '.0f')} | "
                         f"{f(ratio, '.2f') + '×' if ratio else '-'} | "
                         f"{f(r['first_request_s'] and r['first_request_s'] * 1000, '.0f')} | "
                         f"{' / '.join(str(p['rows']) for p in r['per_daemon'])} | "
                         f"{' / '.join(f(p['cpu_s'], '.2f') for p in r['per_daemon'])} | {f(r['postgres_cpu_s'], '.2f')} | "
                         f"{f(r['machine_busy_pct'], '.0f')}% | "
                         f"{f(c['p50'], '.2f')} / {f(c['p99'], '.2f')} / {f(c['max'], '.2f')} | {c['n']} ({c['empty']}) | "
                         f"{f(c['rows_per_claim'], '.1f')} |")
            L.append(f"\nThe daemons, PostgreSQL and nginx share the {os.cpu_count()} cores: k CPU-bound daemons cannot "
                     f"drain faster than min(k, {os.cpu_count()})× one, less what PostgreSQL takes.")
            if fl["pickup"]:
                L.append("\nPickup latency on PostgreSQL, measured as in *Pickup latency*, the producer one long-lived "
                         "`psql` (autocommit; its `\\echo` of a marker after each INSERT is the acknowledgement), the "
                         "daemons started and READY on an empty database, woken by the insert trigger's NOTIFY.\n")
                L.append("| daemons | inserts | p50 ms | p90 ms | p99 ms | max ms | min ms | > 250 ms | < 0 ms | "
                         "from send p50 / p99 ms | INSERT ack p50 ms | rows per daemon | claim p50 / p99 ms (empty) |")
                L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
                for pk in fl["pickup"]:
                    c = pk["claim_ms"]
                    g = pk.get
                    L.append(f"| {pk['daemons']} | {pk['inserts']:,} | {f(g('p50_ms'), '.1f')} | {f(g('p90_ms'), '.1f')} | "
                             f"{f(g('p99_ms'), '.1f')} | {f(g('max_ms'), '.1f')} | {f(g('min_ms'), '.1f')} | "
                             f"{g('over_250ms', '-')} | {g('negative', '-')} | {f(g('from_send_p50_ms'), '.1f')} / "
                             f"{f(g('from_send_p99_ms'), '.1f')} | {f(g('insert_ack_p50_ms'), '.2f')} | "
                             f"{' / '.join(str(n) for n in pk['rows_per_daemon'].values()) or '-'} | "
                             f"{f(c['p50'], '.2f')} / {f(c['p99'], '.2f')} ({c['empty']}) |")
            bad = [r for r in fl["runs"] + fl["pickup"] if not r["ok"]]
            for r in bad:
                L.append(f"\n- FAILED, {r['daemons']} daemon(s): {r['error']}")
            if fl["postgres_log"]:
                L.append(f"\nPostgreSQL's log: {len(fl['postgres_log'])} ERROR/FATAL/PANIC line(s), e.g. "
                         f"`{fl['postgres_log'][0][:300]}`.")
        s3 = self.results.get("s3")
        if s3:
            L.extend(self.s3_report(rows, f))
        elif self.args.s3_skipped:
            L.append(f"\n## Archive bucket (S3)\n\nSkipped: {self.args.s3_skipped}.")
        L.append("\n## Targets (issue 5; reported, not asserted)\n")
        L.append("| target | status | measured |")
        L.append("|---|---|---|")
        for t in targets:
            L.append(f"| {t['target'].replace('|', chr(92) + '|')} | {t['status']} | {t['measured']} |")
        L.append("\n## hingnetd warnings and errors in the daemons' logs\n")
        if logs:
            for e in logs[:15]:
                L.append(f"- {e['count']}× `{e['example']}` (runs: {', '.join(e['runs'])})")
        else:
            L.append("None.")
        if self.anomalies:
            L.append("\n## Anomalies seen by the harness\n")
            for a in self.anomalies:
                L.append(f"- {a['where']}: {a['what']}")
        failed = [s for s in self.runs if not s["ok"]]
        if failed:
            L.append("\n## Failed runs\n")
            for s in failed:
                L.append(f"- {s['workload']} r{s['round']} {s['tool']}: {s['error']}")
        md = "\n".join(L) + "\n"

        out_dir = self.args.results or os.path.join(HERE, "results")
        os.makedirs(out_dir, exist_ok=True)
        # `--only s3` alone has a report of its own, beside the full run's.
        name = "smoke" if self.args.smoke else "s3" if self.args.only == ["s3"] else "latest"
        with open(os.path.join(out_dir, f"{name}.md"), "w") as fh:
            fh.write(md)
        with open(os.path.join(out_dir, f"{name}.json"), "w") as fh:
            json.dump(
                {
                    "kind": kind,
                    "seed": self.seed,
                    "profile": p,
                    "environment": env,
                    "total_s": total_s,
                    "generation_s": gen_s,
                    "summary": list(rows.values()),
                    "samples": self.runs,
                    "results": self.results,
                    "targets": targets,
                    "log_warnings": logs,
                    "anomalies": self.anomalies,
                },
                fh,
                indent=1,
                default=str,
            )
        print(md)
        log(f"written: {os.path.join(out_dir, name + '.md')} and .json")
        return not failed and all(
            r.get("ok", True) for r in (self.results.get("pickup") or {}, *(self.results.get("idle") or {}).values(),
                                        self.results.get("fleet") or {}, self.results.get("s3") or {})
        )

    def cleanup(self):
        for g in list(self.garages):
            g.stop()
        if self.server:
            self.server.stop()
        if self.args.keep_data:
            shutil.rmtree(os.path.join(self.work, "runs"), ignore_errors=True)
            log(f"kept {self.work} (--keep-data)")
        elif self.own_work:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            for sub in ("runs", "files", "logs", "nginx"):
                shutil.rmtree(os.path.join(self.work, sub), ignore_errors=True)
            for f in ("scale-base.db", "auth-header", "aria2.conf"):
                try:
                    os.remove(os.path.join(self.work, f))
                except FileNotFoundError:
                    pass


def s3_missing(given):
    """Why the s3 workload cannot run here (one line), or None."""
    if not garage_binary(given):
        return ("no Garage binary (scripts/test builds Garage 2.5.0 into ~/.cache/hingnetd-test/garage-2.5.0; "
                "or set HINGNETD_TEST_GARAGE or --garage)")
    if not shutil.which("rclone"):
        return "no rclone (bench/run installs Debian's rclone for --only s3)"
    return None


def main():
    ap = argparse.ArgumentParser(
        prog="bench/run",
        description="hingnetd against curl + sha256sum + sync, curl + sync, xargs -P 8 and aria2c, plus "
        "pickup latency, idle cost and a 1,000,000-row queue (issue 5). Prints a table and writes "
        "bench/results/latest.{md,json} (smoke.{md,json} with --smoke, s3.{md,json} with --only s3 alone).",
        epilog="Example: bench/run --smoke;  HINGNETD_BIN=target/release/hingnetd bench/run --only large,pickup",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one round (seconds; for CI)")
    ap.add_argument("--bin", required=True, help="the hingnetd binary (bench/run passes it)")
    ap.add_argument("--repo", help="the checkout, to name the commit in the report")
    ap.add_argument("--seed", type=int, default=5, help="seed of the file contents and insert spacing (default 5)")
    ap.add_argument("--rounds", type=int, help="rounds per throughput workload (default 3; smoke 1)")
    ap.add_argument("--only", default=None,
                    help=f"comma-separated subset of {','.join(WORKLOADS)} (the default), or the opt-in "
                    f"{','.join(OPT_IN)} (rate: download.rate_limit at 1, 4 and 16 downloads over 20 s, about 90 s; "
                    "fleet: 1, 2 and 3 daemons on one throwaway PostgreSQL, drain and pickup latency; "
                    "s3: the 2 GiB file and 200 × 32 MiB into a bucket on a private Garage, against rclone, "
                    "about 20 minutes; with --smoke and no --only it is included when Garage is there)")
    ap.add_argument("--garage", help="the garage binary for s3 (default: $HINGNETD_TEST_GARAGE, else "
                    "~/.cache/hingnetd-test/garage-2.5.0/bin/garage as scripts/test builds it, else the PATH's)")
    ap.add_argument("--workdir", help="where files and runs go (default: a new directory under --tmpdir)")
    ap.add_argument("--tmpdir", default=None, help="parent of the default work dir (default $TMPDIR or /tmp)")
    ap.add_argument("--keep-data", action="store_true", help="keep the generated files for the next run (with --workdir)")
    ap.add_argument("--results", help="directory for the report (default bench/results)")
    ap.add_argument("--profile", action="store_true",
                    help="instead of the benchmark: run hingnetd once per selected throughput workload under "
                    "strace -c, strace (I/O sizes) and perf record, into bench/results/profile-WORKLOAD.txt")
    ap.add_argument("--daemon-env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment for every hingnetd run (experiments, e.g. MALLOC_ARENA_MAX=2); "
                    "named in the report")
    ap.add_argument("--build", metavar="COMMAND",
                    help="build --bin with this command (in --repo) while the files are generated")
    ap.add_argument("--no-peers", action="store_true",
                    help="run only hingnetd in the throughput workloads (experiments; no ratios)")
    ap.add_argument("--timeout", type=float, help="seconds a single hingnetd batch may take (default 900; smoke 60)")
    args = ap.parse_args()
    args.s3_skipped = None
    if args.only is None:
        args.only = list(WORKLOADS)
        if args.smoke:
            # A tiny s3 run too, where it needs nothing built: Garage is not in Debian.
            missing = s3_missing(args.garage)
            if missing:
                args.s3_skipped = missing
                log(f"bench: s3 smoke skipped: {missing}")
            else:
                args.only.append("s3")
    else:
        args.only = [w.strip() for w in args.only.split(",") if w.strip()]
        if "s3" in args.only:
            missing = s3_missing(args.garage)
            if missing:
                raise SystemExit(f"bench: s3: {missing}")
    if args.timeout is None:
        args.timeout = 60 if args.smoke else 900
    unknown = set(args.only) - set(WORKLOADS) - set(OPT_IN)
    if unknown:
        ap.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    b = Bench(args)
    ok = False
    try:
        ok = b.main()
    finally:
        b.cleanup()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
