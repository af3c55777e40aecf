# Runs on a node (python3 - receive|send ...; this text on standard input; spark_cluster/model_sync.py
# prepends the transfer's one-time TOKEN and, for send, FILES): copies model files node to node
# over the cluster link.
#
#   receive DEST PARTIAL BIND PEER   listen on BIND (the node's cluster address, a free port), accept
#                                    one connection from PEER presenting TOKEN, then write each file
#                                    announced into PARTIAL (resuming at the offset announced) and move
#                                    it into DEST once whole. Prints "listening PORT", "got BYTES"
#                                    every half second, "done PATH" per file.
#   send SRC HOST PORT RATE          connect and send each file of FILES ([path, size, offset]) from
#                                    its offset; RATE MB/s, 0 = unlimited.
#   receive-uncached ..., send-uncached ...
#                                    as receive and send, each file's pages then dropped from the page
#                                    cache (written ones once on disk): on unified memory the page cache
#                                    holds memory the model load needs (memory.drop_page_cache)
#   receive-pipe CMD BIND PEER       as receive, but the bytes go into CMD's standard input (docker load)
#   send-pipe CMD HOST PORT RATE     as send, but the bytes are CMD's standard output (docker save IMAGE)
# Paths are relative and never leave DEST (".." and absolute paths are refused). Files arrive as
# regular files (a symlink of the source, e.g. a Hugging Face snapshot, is read through), owned by
# the SSH user.
import json
import os
import socket
import subprocess
import sys
import time

CHUNK = 1 << 20


def safe(root, rel):
    path = os.path.normpath(os.path.join(root, rel))
    if os.path.isabs(rel) or not path.startswith(os.path.normpath(root) + os.sep):
        raise SystemExit(f"refused path {rel!r}")
    return path


ACCEPT_S = 60  # the sender connects within seconds, or it failed
TOKEN_S = 5  # a connection presents the token at once, or it is not the sender


def token_of(conn):
    """What a connection presents as the token: at most its length, within TOKEN_S ("" when it stalls or ends)."""
    want = len(TOKEN)  # noqa: F821 (prepended)
    buf = b""
    conn.settimeout(TOKEN_S)
    try:
        while len(buf) < want:
            part = conn.recv(want - len(buf))
            if not part:
                return b""
            buf += part
    except OSError:  # a timeout, a reset
        return b""
    return buf


def accept(bind, peer):
    """The one connection from the peer that presents the token; any other (another address, a wrong
    token, one that stalls or closes early) is closed and the receiver goes on listening, until ACCEPT_S."""
    srv = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET)
    srv.bind((bind, 0))
    srv.listen(8)
    deadline = time.monotonic() + ACCEPT_S
    print(f"listening {srv.getsockname()[1]}", flush=True)
    while True:
        srv.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            conn, addr = srv.accept()
        except socket.timeout:
            raise SystemExit(f"no sender presented the token within {ACCEPT_S}s")
        if addr[0] == peer and token_of(conn) == TOKEN.encode():  # noqa: F821 (prepended)
            conn.settimeout(300)
            return conn
        conn.close()


def connect(host, port):
    conn = socket.create_connection((host, int(port)), timeout=30)
    conn.sendall(TOKEN.encode())  # noqa: F821 (prepended)
    return conn


class Pace:
    """Progress lines (receiving) and the rate limit (sending)."""

    def __init__(self, rate=0):
        self.per_s, self.t0, self.n, self.shown = float(rate) * 1e6, time.monotonic(), 0, time.monotonic()

    def add(self, n, show=False):
        self.n += n
        if show and time.monotonic() - self.shown >= 0.5:
            print(f"got {self.n}", flush=True)
            self.shown = time.monotonic()
        if self.per_s:
            ahead = self.n / self.per_s - (time.monotonic() - self.t0)
            if ahead > 0:
                time.sleep(ahead)


def forget(f, written):
    """Drop a file's pages from the page cache (what was written, once it is on disk)."""
    if written:
        f.flush()
        os.fsync(f.fileno())
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def receive(dest, partial, bind, peer, uncached=False):
    conn = accept(bind, peer)
    pace = Pace()
    while True:
        head = bytearray()
        while not head.endswith(b"\n"):
            part = conn.recv(1)
            if not part:
                print(f"got {pace.n}", flush=True)
                return
            head += part
        path, size, offset = json.loads(head)
        target, part_path = safe(dest, path), safe(partial, path)
        os.makedirs(os.path.dirname(part_path), exist_ok=True)
        with open(part_path, "ab") as f:
            f.truncate(offset)
            left = size - offset
            while left:
                data = conn.recv(min(CHUNK, left))
                if not data:
                    raise SystemExit(f"the sender went away in {path}")
                f.write(data)
                left -= len(data)
                pace.add(len(data), show=True)
            if uncached:
                forget(f, written=True)
        if os.path.getsize(part_path) != size:
            raise SystemExit(f"{path}: {os.path.getsize(part_path)} bytes written, {size} expected")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(part_path, target)  # replaces a dangling symlink or a short file in one step
        print(f"done {path}", flush=True)


def send(src, host, port, rate, uncached=False):
    conn, pace = connect(host, port), Pace(rate)
    for path, size, offset in FILES:  # noqa: F821 (prepended)
        with open(safe(src, path), "rb") as f:
            conn.sendall(json.dumps([path, size, offset]).encode() + b"\n")
            f.seek(offset)
            left = size - offset
            while left:
                data = f.read(min(CHUNK, left))
                if not data:
                    raise SystemExit(f"{path} is shorter than its listed {size} bytes")
                conn.sendall(data)
                left -= len(data)
                pace.add(len(data))
            if uncached:
                forget(f, written=False)
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)  # until the receiver closes: everything is written
    print(f"sent {pace.n}", flush=True)


def receive_pipe(cmd, bind, peer):
    conn, pace = accept(bind, peer), Pace()
    proc = subprocess.Popen(cmd, shell=True, stdin=subprocess.PIPE)
    while True:
        data = conn.recv(CHUNK)
        if not data:
            break
        proc.stdin.write(data)
        pace.add(len(data), show=True)
    proc.stdin.close()
    code = proc.wait()
    print(f"got {pace.n}", flush=True)
    sys.exit(code)


def send_pipe(cmd, host, port, rate):
    conn, pace = connect(host, port), Pace(rate)
    proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE)
    while True:
        data = proc.stdout.read(CHUNK)
        if not data:
            break
        conn.sendall(data)
        pace.add(len(data))
    code = proc.wait()
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(600)  # the receiving command may still be at work after the last byte (docker load unpacking layers)
    conn.recv(1)
    print(f"sent {pace.n}", flush=True)
    sys.exit(code)


MODES = {"receive": receive, "send": send, "receive-pipe": receive_pipe, "send-pipe": send_pipe,
         "receive-uncached": lambda *a: receive(*a, uncached=True), "send-uncached": lambda *a: send(*a, uncached=True)}
MODES[sys.argv[1]](*sys.argv[2:])
