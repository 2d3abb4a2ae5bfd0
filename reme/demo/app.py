"""The demo's web layer: a FastAPI app serving one static page and a small JSON API.

Routes::

    GET  /                              the page (static/index.html, app.js, style.css)
    GET  /api/config                    reference names, bundled photos, default classes
    GET  /api/sample/{name}.png         a bundled photo
    POST /api/segment                   form: classes, reference, and image (file) or sample
    GET  /api/evidence?result_id&x&y    evidence of the segment under pixel (x, y)
    GET  /api/refcrop/{ref}/{id}.png    thumbnail of a reference segment
    POST /api/examples                  form: result_id, label, segment_id or x and y, resegment;
                                        teach that segment, answer the new segmentation
    POST /api/examples/undo             form: example_id (id, "" = last, "all"), result_id, reference
    GET  /api/examples?reference        this session's examples
    GET  /api/examplecrop/{result}/{id}.png  thumbnail of a taught segment
    GET  /favicon.ico                   the page icon (static/favicon.svg)

Misuse guards: only requests whose ``Host`` is one of the allowed host names are answered
(Starlette's ``TrustedHostMiddleware``; by default the names of the interface the server is
bound to), a POST from another site (``Sec-Fetch-Site: cross-site``, or an ``Origin`` /
``Referer`` naming another host) is refused with 403, uploads are size-checked before decoding
and decoded a few at a time ([`read_upload`][reme.demo.inputs.read_upload]), class lists are
capped ([`check_classes`][reme.demo.inputs.check_classes]) and a request waits a bounded time
for the segmenter. Every error is JSON ``{"error": "<plain sentence>"}``.

Every answer carries `SECURITY_HEADERS` (Content-Security-Policy: own script, style and images
plus ``data:`` images, no inline script, no framing; X-Frame-Options: DENY; nosniff).

Sessions: every browser gets a random session id (``secrets.token_urlsafe``) in an
``HttpOnly; SameSite=Strict`` cookie; its results and taught examples are its own
([`DemoBackend`][reme.demo.backend.DemoBackend] keeps one overlay per session and reference set,
unless the server shares one overlay folder). Teaching is capped: a label of at most
60 characters without `,` or `;`, at most 200 examples per session (2000 in a shared overlay).
"""

# no `from __future__ import annotations`: FastAPI reads the route annotations at run time
import logging
import secrets
import socket
from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import urlsplit

from reme.demo.backend import DemoBackend
from reme.demo.inputs import png_bytes
from reme.demo.sessions import BusyError

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
#: Name of the session cookie.
SESSION_COOKIE = "reme_session"
#: Sent with every answer. The page loads only its own script, style sheet and icon, and shows
#: the overlays as ``data:`` PNGs; it runs no inline script and may not be framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def require_demo_extra() -> None:
    """Fail early when the ``demo`` extra is missing.

    Raises:
        ImportError: FastAPI, uvicorn or python-multipart missing; the message names the extra.
    """
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart, for uploads)
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"the demo needs FastAPI, uvicorn and python-multipart ({exc.name} is missing); "
            'install them with: pip install "reme[demo]"'
        ) from exc


#: Host names a server bound to a loopback address answers to.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def bound_host_names(host: str) -> list[str]:
    """Host names a browser may use to reach a server listening on ``host``.

    Loopback (``127.0.0.1``, ``localhost``, ``::1``): the loopback names. IPv6 addresses are
    returned in brackets (``[::1]``), as they appear in a ``Host`` header. A wildcard (``0.0.0.0``,
    ``::``, ``""``): the loopback names plus this machine's host name, fully qualified name and
    their addresses. Any other address or name: itself plus the loopback names.
    """
    names = list(LOOPBACK_HOSTS)
    if host in ("0.0.0.0", "::", ""):
        me = socket.gethostname()
        names += [me, socket.getfqdn()]
        try:
            names += socket.gethostbyname_ex(me)[2]
        except OSError:
            pass
    elif host != "::1":
        names.append(host)
    return list(dict.fromkeys(_bracket(n.lower()) for n in names if n))


def _bracket(name: str) -> str:
    return f"[{name}]" if ":" in name and not name.startswith("[") else name


def _same_site(request) -> bool:
    """False for a browser request sent from another site (a cross-site form or fetch)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    for header in ("origin", "referer"):
        value = request.headers.get(header)
        if value:
            if value == "null":
                return False
            # the page's own origin: same host name and port as the request
            return urlsplit(value).netloc.lower() == request.headers.get("host", "").lower()
    return True  # no browser headers: a script or curl on an allowed host


def create_app(backend: DemoBackend, *, allowed_hosts: Sequence[str] = LOOPBACK_HOSTS):
    """The FastAPI application of ``backend``.

    Args:
        backend: the segmenters and results ([`DemoBackend`][reme.demo.backend.DemoBackend]).
        allowed_hosts: ``Host`` header names answered (port ignored; ``"*"`` answers any,
            which lets other web sites reach the server through DNS rebinding); others get 400.

    Raises:
        ImportError: FastAPI, uvicorn or python-multipart missing (names the ``demo`` extra).
    """
    require_demo_extra()
    from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    from reme.demo.backend import SESSION_ID
    from reme.demo.inputs import check_classes
    from reme.errors import ImageReadError

    hosts = [h.lower() for h in allowed_hosts]
    app = FastAPI(title="reme demo", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def refuse_cross_site_posts(request: Request, call_next):
        if request.method not in ("GET", "HEAD", "OPTIONS") and not _same_site(request):
            return JSONResponse({"error": "cross-site requests are refused; use the demo page itself"},
                                status_code=403)
        return await call_next(request)

    @app.middleware("http")
    async def session_cookie(request: Request, call_next):
        sid = request.cookies.get(SESSION_COOKIE, "")
        new = None if SESSION_ID.fullmatch(sid) else secrets.token_urlsafe(24)
        request.state.session = new or sid
        response = await call_next(request)
        if new:
            response.set_cookie(SESSION_COOKIE, new, httponly=True, samesite="strict", path="/")
        return response

    # added after the others, so it runs first: a wrong Host gets 400 before anything else happens
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)

    @app.middleware("http")  # outermost: every answer, the Host check's 400 included
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def form_error(request, exc):
        fields = ", ".join(str(e.get("loc", ["", "?"])[-1]) for e in exc.errors())
        return JSONResponse({"error": f"missing or malformed form field(s): {fields}"}, status_code=400)

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml",
                            headers={"Cache-Control": "max-age=86400"})

    @app.get("/api/config")
    def config():
        return backend.config()

    @app.get("/api/sample/{name}.png")
    def sample(name: str):
        try:
            from PIL import Image

            return Response(png_bytes(Image.fromarray(backend.sample(name))), media_type="image/png")
        except ImageReadError as exc:
            raise HTTPException(404, str(exc)) from exc

    @app.post("/api/segment")
    def segment(request: Request, classes: str = Form(""), reference: str = Form(""), sample: str = Form(""),
                image: UploadFile | None = File(None)):
        from reme.demo.inputs import MAX_UPLOAD_BYTES, read_upload

        def run():
            check_classes(classes)  # before reading the photo: a bad request costs nothing
            if reference and reference not in backend.references:
                raise KeyError(f"unknown reference set {reference!r}; choose from {', '.join(backend.references)}")
            if image is not None and image.filename:
                if image.size is not None and image.size > MAX_UPLOAD_BYTES:
                    return JSONResponse({"error": f"the upload is over {MAX_UPLOAD_BYTES // 2**20} MiB"},
                                        status_code=413)
                img = read_upload(image.file.read(MAX_UPLOAD_BYTES + 1))
                name = Path(image.filename).name[:80]
            elif sample:
                img, name = backend.sample(sample), sample
            else:
                raise ValueError("upload a photo or pick a bundled one")
            return backend.segment(img, classes, reference or None, session=request.state.session, image_name=name)

        return _answer(run)

    @app.get("/api/evidence")
    def evidence(request: Request, result_id: str, x: int, y: int):
        return _answer(lambda: backend.evidence(result_id, x, y, session=request.state.session))

    @app.post("/api/examples")
    def add_example(request: Request, result_id: str = Form(""), label: str = Form(""),
                    segment_id: int | None = Form(None), x: int | None = Form(None), y: int | None = Form(None),
                    resegment: bool = Form(True)):
        return _answer(lambda: backend.add_example(request.state.session, result_id, label, segment_id=segment_id,
                                                   x=x, y=y, resegment=resegment))

    @app.post("/api/examples/undo")
    def undo_example(request: Request, example_id: str = Form(""), result_id: str = Form(""),
                     reference: str = Form("")):
        return _answer(lambda: backend.undo_example(request.state.session, example_id or None,
                                                    reference=reference or None, result_id=result_id or None))

    @app.get("/api/examples")
    def examples(request: Request, reference: str = ""):
        return _answer(lambda: {"examples": backend.examples(request.state.session, reference or None)})

    @app.get("/api/examplecrop/{result_id}/{segment_id}.png")
    def example_crop(request: Request, result_id: str, segment_id: int):
        try:
            tile = backend.example_crop(request.state.session, result_id, segment_id)
        except (KeyError, IndexError) as exc:
            raise HTTPException(404, str(exc)) from exc
        return Response(png_bytes(tile), media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.get("/api/refcrop/{reference}/{segment_id}.png")
    def refcrop(reference: str, segment_id: int):
        try:
            tile = backend.reference_crop(reference, segment_id)
        except (KeyError, IndexError) as exc:
            raise HTTPException(404, str(exc)) from exc
        return Response(png_bytes(tile), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    return app


def _answer(call):
    """``call()``, with the backend's errors as JSON answers: 503 busy (`BusyError`), 404 an
    unknown result, reference or example (KeyError), 400 bad input (ValueError, ImageReadError)."""
    from fastapi.responses import JSONResponse

    try:
        return call()
    except BusyError as exc:
        return _busy(exc)
    except KeyError as exc:
        return JSONResponse({"error": exc.args[0]}, status_code=404)
    except ValueError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)


def _busy(exc):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "10"})


def serve(references: Mapping[str, str | Path], *, host: str = "127.0.0.1", port: int = 7860,
          image_roots: Sequence[str | Path] = (), device: str | None = None, preload: bool = True,
          segmenter_kwargs=None, allowed_hosts: Sequence[str] | None = None, overlay: str | Path | None = None) -> None:
    """Run the demo server until interrupted.

    Args:
        references: display name -> reference folder; the first is selected by default.
        host: interface to listen on (127.0.0.1 = this machine only).
        port: TCP port.
        image_roots: folders with the reference sets' source photos (evidence thumbnails).
        device: torch device (None: CUDA if available).
        preload: load the default reference set before listening, so the first request is quick.
        segmenter_kwargs: extra [`reme.inference.segmenter.Segmenter`][reme.inference.segmenter.Segmenter] arguments
            (``top_k``, ...).
        allowed_hosts: ``Host`` names answered (default: [`bound_host_names`][reme.demo.app.bound_host_names]
            of ``host``); other names get 400.
        overlay: an overlay folder every session teaches into (one reference set only; see
            [`DemoBackend`][reme.demo.backend.DemoBackend]); None: one in-memory overlay per session.

    Raises:
        ImportError: the ``demo`` extra is not installed.
        ValueError: a shared overlay with several reference sets.
    """
    require_demo_extra()
    import uvicorn

    backend = DemoBackend(references, image_roots=image_roots, device=device, segmenter_kwargs=segmenter_kwargs,
                          overlay=overlay)
    if preload:
        backend.segmenter(backend.default_reference)
        if overlay is not None:  # a wrong or foreign overlay folder fails here, before listening
            backend.session_segmenter("", backend.default_reference)
    app = create_app(backend, allowed_hosts=list(allowed_hosts or bound_host_names(host)))
    logger.info("reme demo on http://%s:%d", host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
