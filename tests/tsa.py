"""A local RFC 3161 time-stamping authority for tests: OpenSSL's `ts -reply` behind HTTP on 127.0.0.1.

`make_authority(dir)` makes a CA (self-signed) and a TSA certificate it issues (extendedKeyUsage
timeStamping, critical, as RFC 3161 requires) with `openssl req` / `openssl x509`, plus the
`openssl ts` config. `serve(authority)` answers each POSTed TimeStampReq with `openssl ts -reply`
(the TSA's certificate included), on a free port of 127.0.0.1, until the context exits.
"""

from __future__ import annotations

import contextlib
import http.server
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

TS_CONFIG = """\
[ tsa ]
default_tsa = tsa_config
[ tsa_config ]
dir = {dir}
serial = $dir/serial
crypto_device = builtin
signer_cert = $dir/tsa.pem
signer_key = $dir/tsa.key
signer_digest = sha256
default_policy = 1.2.3.4.1
other_policies = 1.2.3.4.5
digests = sha256, sha384, sha512
accuracy = secs:1
ordering = no
tsa_name = no
ess_cert_id_chain = no
ess_cert_id_alg = sha256
"""

TSA_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, nonRepudiation
extendedKeyUsage = critical, timeStamping
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class Authority:
    dir: Path
    name: str

    @property
    def ca_pem(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def tsa_pem(self) -> Path:
        return self.dir / "tsa.pem"

    @property
    def config(self) -> Path:
        return self.dir / "ts.cnf"


def _openssl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True)
    if res.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} failed: {res.stderr.decode(errors='replace')}")
    return res


def make_authority(dir: Path, name: str = "sasgate test TSA") -> Authority:
    """A CA and the TSA certificate it issues, in dir (made if absent)."""
    dir.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "3650",
             "-subj", f"/CN={name} CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=dir)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tsa.key", "-out", "tsa.csr",
             "-subj", f"/CN={name}", cwd=dir)
    (dir / "tsa.ext").write_text(TSA_EXT)
    _openssl("x509", "-req", "-in", "tsa.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "tsa.pem", "-days", "3650", "-extfile", "tsa.ext", cwd=dir)
    (dir / "serial").write_text("01\n")
    (dir / "ts.cnf").write_text(TS_CONFIG.format(dir=dir))
    return Authority(dir, name)


def reply(authority: Authority, query: bytes) -> bytes:
    """`openssl ts -reply` for one DER TimeStampReq."""
    with tempfile.TemporaryDirectory(dir=authority.dir) as tmp:
        q, r = Path(tmp) / "q.tsq", Path(tmp) / "r.tsr"
        q.write_bytes(query)
        _openssl("ts", "-reply", "-config", str(authority.config), "-queryfile", str(q), "-out", str(r),
                 cwd=authority.dir)
        return r.read_bytes()


@contextlib.contextmanager
def serve(authority: Authority) -> Iterator[str]:
    """An HTTP TSA on 127.0.0.1 for the duration of the context; yields its URL."""
    lock = threading.Lock()  # openssl's serial file is not safe for parallel replies

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Type") != "application/timestamp-query":
                self.send_error(415, "expected application/timestamp-query")
                return
            try:
                with lock:
                    data = reply(authority, body)
            except AssertionError as exc:
                self.send_error(400, str(exc)[:200])
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/timestamp-reply")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/tsa"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
