"""Serving the app with waitress: a production WSGI server in pure Python that streams each write
as it comes and runs every request in its own thread (a stream holds one while it lasts)."""
import threading

import waitress

from nanochat_jax.web.validation import MAX_BODY_BYTES


def make_server(app, host: str = "127.0.0.1", port: int = 8000, threads: int = 16):
    """A waitress server bound to host:port (port 0: a free one; see `.effective_port`).
    `channel_request_lookahead` lets a handler ask whether its client has disconnected. Waitress
    reads a whole body before the app sees it, so its own cap bounds memory; the app's smaller
    one answers in JSON."""
    return waitress.create_server(app, host=host, port=port, threads=threads, channel_request_lookahead=1,
                                  max_request_body_size=16 * MAX_BODY_BYTES, ident="nanochat-jax")


class BackgroundServer:
    """`make_server` running in a daemon thread, for tests and benchmarks: `with BackgroundServer(app)
    as url: ...` serves on a free loopback port and stops on exit (the loop is stopped before the
    sockets close, so it never selects on a closed one)."""

    def __init__(self, app, threads: int = 16):
        self.server = make_server(app, port=0, threads=threads)
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nanochat-waitress", daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.server.asyncore.loop(timeout=0.05, map=self.server._map, count=1)

    def __enter__(self) -> str:
        self._thread.start()
        return self.url

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.server.close()
        self.server.task_dispatcher.shutdown(timeout=5)
