"""The demo's web layer: a FastAPI app serving one static page and a small JSON API.

Routes::

    GET  /                              the page (static/index.html, app.js, style.css)
    GET  /api/config                    reference names, bundled photos, default classes
    GET  /api/sample/{name}.png         a bundled photo
    POST /api/segment                   form: classes, reference, and image (file) or sample
    GET  /api/evidence?result_id&x&y    evidence of the segment under pixel (x, y)
    GET  /api/refcrop/{ref}/{id}.png    thumbnail of a reference segment
    GET  /favicon.ico                   the page icon (static/favicon.svg)

Misuse guards: only requests whose ``Host`` is one of the allowed host names are answered
(Starlette's ``TrustedHostMiddleware``; by default the names of the interface the server is
bound to), a POST from another site (``Sec-Fetch-Site: cross-site``, or an ``Origin`` /
``Referer`` naming another host) is refused with 403, uploads are size-checked before decoding
and decoded a few at a time ([`read_upload`][reme.demo.backend.read_upload]), class lists are
capped ([`check_classes`][reme.demo.backend.check_classes]) and a request waits a bounded time
for the segmenter. Every error is JSON ``{"error": "<plain sentence>"}``.
"""

# no `from __future__ import annotations`: FastAPI reads the route annotations at run time
import logging
import socket
from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import urlsplit

from reme.demo.backend import DemoBackend, png_bytes

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"


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

    from reme.demo.backend import BusyError, check_classes
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

    # added last, so it runs first: a wrong Host gets 400 before anything else happens
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)

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
    def segment(classes: str = Form(""), reference: str = Form(""), sample: str = Form(""),
                image: UploadFile | None = File(None)):
        from reme.demo.backend import MAX_UPLOAD_BYTES, read_upload

        try:
            check_classes(classes)  # before reading the photo: a bad request costs nothing
            if reference and reference not in backend.references:
                raise KeyError(f"unknown reference set {reference!r}; choose from {', '.join(backend.references)}")
            if image is not None and image.filename:
                if image.size is not None and image.size > MAX_UPLOAD_BYTES:
                    return JSONResponse({"error": f"the upload is over {MAX_UPLOAD_BYTES // 2**20} MiB"},
                                        status_code=413)
                img = read_upload(image.file.read(MAX_UPLOAD_BYTES + 1))
            elif sample:
                img = backend.sample(sample)
            else:
                raise ValueError("upload a photo or pick a bundled one")
            return backend.segment(img, classes, reference or None)
        except (ValueError, ImageReadError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except KeyError as exc:
            return JSONResponse({"error": exc.args[0]}, status_code=404)
        except BusyError as exc:
            return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "10"})

    @app.get("/api/evidence")
    def evidence(result_id: str, x: int, y: int):
        try:
            return backend.evidence(result_id, x, y)
        except KeyError as exc:
            return JSONResponse({"error": exc.args[0]}, status_code=404)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    @app.get("/api/refcrop/{reference}/{segment_id}.png")
    def refcrop(reference: str, segment_id: int):
        try:
            tile = backend.reference_crop(reference, segment_id)
        except (KeyError, IndexError) as exc:
            raise HTTPException(404, str(exc)) from exc
        return Response(png_bytes(tile), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    return app


def serve(references: Mapping[str, str | Path], *, host: str = "127.0.0.1", port: int = 7860,
          image_roots: Sequence[str | Path] = (), device: str | None = None, preload: bool = True,
          segmenter_kwargs=None, allowed_hosts: Sequence[str] | None = None) -> None:
    """Run the demo server until interrupted.

    Args:
        references: display name -> reference folder; the first is selected by default.
        host: interface to listen on (127.0.0.1 = this machine only).
        port: TCP port.
        image_roots: folders with the reference sets' source photos (evidence thumbnails).
        device: torch device (None: CUDA if available).
        preload: load the default reference set before listening, so the first request is quick.
        segmenter_kwargs: extra [`reme.segmenter.Segmenter`][reme.segmenter.Segmenter] arguments
            (``top_k``, ...).
        allowed_hosts: ``Host`` names answered (default: [`bound_host_names`][reme.demo.app.bound_host_names]
            of ``host``); other names get 400.

    Raises:
        ImportError: the ``demo`` extra is not installed.
    """
    require_demo_extra()
    import uvicorn

    backend = DemoBackend(references, image_roots=image_roots, device=device, segmenter_kwargs=segmenter_kwargs)
    if preload:
        backend.segmenter(backend.default_reference)
    app = create_app(backend, allowed_hosts=list(allowed_hosts or bound_host_names(host)))
    logger.info("reme demo on http://%s:%d", host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
