"""A real S3 server for the tests: moto's ThreadedMotoServer on 127.0.0.1, reached only through the AWS
environment variables (``AWS_ENDPOINT_URL`` ...), as a user's job reaches S3."""

from __future__ import annotations

import logging
import os
import uuid

BUCKET = "kbest"


class S3Server:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        self._saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        self.client().create_bucket(Bucket=BUCKET)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def url(self, name: str = "") -> str:
        """A fresh prefix in the test bucket."""
        return f"s3://{BUCKET}/{name or 't'}-{uuid.uuid4().hex[:10]}"

    def keys(self, url: str) -> list[str]:
        """Every key under ``url``'s prefix, relative to it."""
        prefix = url.split(f"s3://{BUCKET}/", 1)[1].rstrip("/") + "/"
        out, kw = [], {"Bucket": BUCKET, "Prefix": prefix}
        while True:
            page = self.client().list_objects_v2(**kw)
            out += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(out)
            kw["ContinuationToken"] = page["NextContinuationToken"]

    def uploads(self, url: str) -> list[str]:
        prefix = url.split(f"s3://{BUCKET}/", 1)[1].rstrip("/") + "/"
        page = self.client().list_multipart_uploads(Bucket=BUCKET, Prefix=prefix)
        return [u["Key"] for u in page.get("Uploads", [])]

    def stop(self) -> None:
        self.server.stop()
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class IgnoringConditions:
    """An HTTP proxy in front of the test server that drops ``If-None-Match`` and ``If-Match``: a store as an
    S3-compatible server without conditional writes behaves (the real server behind it never sees them)."""

    DROPPED = ("if-none-match", "if-match")

    def __init__(self, endpoint: str) -> None:
        import http.client
        import http.server
        import threading
        import urllib.parse

        target = urllib.parse.urlparse(endpoint)
        dropped = self.DROPPED

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                conn.request(self.command, self.path, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status, reply.reason)
                for k, v in reply.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
