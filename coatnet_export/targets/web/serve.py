#!/usr/bin/env python3
"""Serve this site with the headers that let onnxruntime-web use threads.

    python serve.py [--port 8000] [--bind 127.0.0.1]

Cross-Origin-Opener-Policy: same-origin and Cross-Origin-Embedder-Policy: require-corp make
the page cross-origin isolated, which WebAssembly threads need. Any static server that sends
those two headers (and JavaScript / WebAssembly MIME types) works as well; without them the
page runs on one thread. Python's standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
from pathlib import Path

ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
}


class IsolatedHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with the cross-origin isolation headers and explicit MIME types."""

    extensions_map = {  # noqa: RUF012 (the base class declares it as a plain dict)
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".html": "text/html",
        ".js": "text/javascript",
        ".mjs": "text/javascript",
        ".css": "text/css",
        ".json": "application/json",
        ".wasm": "application/wasm",
        ".onnx": "application/octet-stream",
    }

    def end_headers(self) -> None:
        for name, value in ISOLATION_HEADERS.items():
            self.send_header(name, value)
        super().end_headers()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on")
    args = parser.parse_args()
    handler = functools.partial(IsolatedHandler, directory=str(Path(__file__).parent))
    with http.server.ThreadingHTTPServer((args.bind, args.port), handler) as server:
        host, port = str(server.server_address[0]), server.server_address[1]
        print(f"serving {Path(__file__).parent} at http://{host}:{port}/ (Ctrl-C stops)")
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()


if __name__ == "__main__":
    main()
