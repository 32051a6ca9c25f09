"""The key broker over HTTP (aiohttp): the routes of ``broker.broker``'s :class:`Broker`, TLS, and
running it in a background thread (``start_broker``, for tests and the demo) or in the foreground
(``serve``, ``branchy-tee key-broker``). Every error is ``{"error": "<one line>", "code": "..."}``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import ssl
import sys
import threading
from typing import Callable

from branchy_tee.broker.broker import Broker, Refusal, load_keystore
from branchy_tee.core.commandline import parse_listen
from branchy_tee.core.errors import BranchyError, UsageError
from branchy_tee.tee.attest import identity as ident
from branchy_tee.tee.attest.protocol import MAX_BODY
from branchy_tee.tee.attest.providers import simulated_warning
from branchy_tee.verifier.policy import load_policy

__all__ = ["BrokerHandle", "make_app", "serve", "serve_in_background", "start_broker"]


def make_app(broker: Broker):
    """The aiohttp application serving ``broker``."""
    from aiohttp import web

    def reply(status: int, obj: dict):
        return web.json_response(obj, status=status, headers={"Cache-Control": "no-store"})

    @web.middleware
    async def json_errors(request, handler):
        try:
            return await handler(request)
        except web.HTTPException as e:  # 404/405 from the router, etc.
            if e.status < 400:
                raise
            return reply(e.status, {"error": e.reason, "code": "http"})

    async def health(request):
        return reply(200, broker.health())

    async def nonce(request):
        return reply(200, broker.nonce())

    async def identity(request):
        return reply(200, broker.identity_document())

    async def keys(request):
        remote = request.remote
        if request.content_length is not None and request.content_length > MAX_BODY:
            r = broker.refuse_unread(remote, 413, "too_large", f"request body over {MAX_BODY} bytes")
            return reply(r.status, {"error": r.reason, "code": r.code})
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            r = broker.refuse_unread(remote, 413, "too_large", f"request body over {MAX_BODY} bytes")
            return reply(r.status, {"error": r.reason, "code": r.code})
        loop = asyncio.get_running_loop()
        try:
            out = await loop.run_in_executor(None, broker.request_keys, body, remote)
        except Refusal as r:
            return reply(r.status, {"error": r.reason, "code": r.code})
        return reply(200, out)

    app = web.Application(client_max_size=MAX_BODY, middlewares=[json_errors])
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/nonce", nonce)
    app.router.add_get("/v1/identity", identity)
    app.router.add_post("/v1/keys", keys)
    return app


def _ssl_context(tls_cert, tls_key) -> ssl.SSLContext | None:
    if bool(tls_cert) != bool(tls_key):
        raise UsageError("give both --tls-cert and --tls-key, or neither")
    if not tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls_cert, tls_key)
    except (OSError, ssl.SSLError) as e:
        raise BranchyError(f"cannot load TLS certificate/key ({tls_cert}, {tls_key}): {e}") from None
    return ctx


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(host: str, port: int, tls: bool) -> str:
    h = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{h}:{port}"


async def _start_site(broker: Broker, host: str, port: int, ssl_ctx):
    from aiohttp import web

    runner = web.AppRunner(make_app(broker), access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_ctx, backlog=1024)
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise BranchyError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return runner, runner.addresses[0][1]


def _startup_warnings(broker: Broker, host: str, tls: bool, warn: Callable[[str], None]) -> None:
    if not tls and not _is_loopback(host):
        warn(
            f"serving plain HTTP on non-loopback address {host}: the network sees nonces and evidence (keys "
            "stay HPKE-sealed to the enclave); use --tls-cert/--tls-key"
        )
    if broker.policy.allow_simulation:
        simulated_warning(f"ALLOWED by policy {broker.policy.source}: this broker releases keys to non-enclaves")


class BrokerHandle:
    """A broker serving in a background thread. ``.url``, ``.stop()``; also a context manager."""

    def __init__(self, broker: Broker, host: str, tls: bool):
        self.broker, self.host, self.tls = broker, host, tls
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def url(self) -> str:
        return _url(self.host, self.port, self.tls)

    def stop(self, timeout: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise BranchyError(f"key broker at {self.url} did not stop within {timeout} s")
        self.broker.close()

    def __enter__(self) -> "BrokerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_broker(
    keys,
    policy,
    host: str = "127.0.0.1",
    port: int = 0,
    audit_log: str | os.PathLike[str] | None = None,
    *,
    identity=None,
    tls_cert=None,
    tls_key=None,
    nonce_ttl: float = 60.0,
    clock: Callable[[], float] | None = None,
    log: Callable[[str], None] | None = None,
) -> BrokerHandle:
    """Serve a key broker in a background thread; return once it listens (``handle.url``).

    ``keys``: a keystore path, a ``{key id: key}`` mapping or a list of keys. ``policy``: a
    :class:`Policy`, a mapping of policy settings, or a TOML path. ``identity``: an identity file,
    an Ed25519 private key, or None for a fresh one (``handle.broker.identity_hex``). ``clock``:
    seconds since the epoch (tests inject one to expire nonces or to verify quotes at a chosen time).
    """
    broker = Broker(keys, policy, identity=identity, audit_log=audit_log, nonce_ttl=nonce_ttl, clock=clock, log=log)
    return serve_in_background(broker, host, port, tls_cert=tls_cert, tls_key=tls_key)


def serve_in_background(
    broker: Broker, host: str = "127.0.0.1", port: int = 0, *, tls_cert=None, tls_key=None
) -> BrokerHandle:
    """Serve an existing :class:`Broker` in a background thread (``start_broker`` builds one for you)."""
    try:
        ssl_ctx = _ssl_context(tls_cert, tls_key)
    except BranchyError:
        broker.close()
        raise
    handle = BrokerHandle(broker, host, ssl_ctx is not None)
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            runner, handle.port = loop.run_until_complete(_start_site(broker, host, port, ssl_ctx))
        except BaseException as e:  # reported to the caller
            failure.append(e)
            started.set()
            loop.close()
            return
        handle._loop = loop
        started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    thread = threading.Thread(target=run, name=f"key-broker-{host}", daemon=True)
    handle._thread = thread
    thread.start()
    started.wait()
    if failure:
        broker.close()
        raise failure[0]
    _startup_warnings(broker, host, handle.tls, _warn)
    return handle


def _warn(m: str) -> None:
    sys.stderr.write(f"key-broker: warning: {m}\n")


def _err(m: str) -> None:
    sys.stderr.write(f"key-broker: {m}\n")
    sys.stderr.flush()


def serve(
    keys_path,
    policy_path,
    listen: str,
    *,
    identity,
    tls_cert=None,
    tls_key=None,
    audit_log=None,
    nonce_ttl: float = 60.0,
    out=None,
    quiet: bool = False,
) -> int:
    """Run a key broker in the foreground until SIGINT/SIGTERM (``branchy-tee key-broker``)."""
    import signal

    out = out or sys.stdout
    host, port = parse_listen(listen)
    if nonce_ttl <= 0:
        raise UsageError("--nonce-ttl must be positive")
    keys = load_keystore(keys_path)
    policy = load_policy(policy_path)
    broker = Broker(
        keys,
        policy,
        identity=ident.load_identity(identity),
        audit_log=audit_log,
        nonce_ttl=nonce_ttl,
        log=None if quiet else _err,
    )
    ssl_ctx = _ssl_context(tls_cert, tls_key)

    async def main() -> None:
        runner, real_port = await _start_site(broker, host, port, ssl_ctx)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        _startup_warnings(broker, host, ssl_ctx is not None, lambda m: _err(f"warning: {m}"))
        out.write(f"key broker listening on {_url(host, real_port, ssl_ctx is not None)}\n")
        out.write(f"  identity {broker.identity_hex}\n")
        out.write(
            f"  releases key id(s) {', '.join(broker.released_ids)} under policy {policy.source}"
            + (f"; audit log {audit_log}" if audit_log else "; no audit log")
            + "\n"
        )
        out.flush()
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        broker.close()
    if not quiet:
        _err(f"stopped ({broker.granted} granted, {broker.refused} refused)")
    return 0
