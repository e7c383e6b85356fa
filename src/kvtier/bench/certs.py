"""Throw-away TLS certificates for benchmarks and tests: a CA and a server certificate signed
by it for one IP address (SubjectAltName), made with the `openssl` command line (P-256 keys,
valid for two days). Never for production use."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

_SERVER_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:{ip}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


class Certs(NamedTuple):
    ca: Path  # the CA certificate (what clients trust: StoreConfig.remote_ca)
    cert: Path  # the server certificate (kvtier serve --tls-cert)
    key: Path  # its private key (kvtier serve --tls-key)


def make_certs(directory: Path, ip: str = "127.0.0.1", name: str = "kvtier test") -> Certs:
    """A new CA and a certificate for `ip` signed by it, in `directory`; RuntimeError
    without the `openssl` command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl not found: install it to make test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key = directory / "server.pem", directory / "server.key"
    csr, ext = directory / "server.csr", directory / "server.ext"
    ext.write_text(_SERVER_EXTENSIONS.format(ip=ip))
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _run(openssl, "req", "-x509", *new_key, "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", f"/CN={name} CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    _run(openssl, "req", *new_key, "-keyout", key, "-out", csr, "-subj", f"/CN={ip}")
    _run(openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", ext)  # fmt: skip
    return Certs(ca, cert, key)


def _run(*args: str | Path) -> None:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args[:3]))} failed: {result.stderr.strip()}")
