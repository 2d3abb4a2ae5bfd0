"""The demo's web layer: a FastAPI app serving one static page and a small JSON API.

Routes::

    GET  /                              the page (static/index.html, app.js, style.css)
    GET  /api/config                    reference names, bundled photos, default classes
    GET  /api/sample/{name}.png         a bundled photo
    POST /api/segment                   form: classes, reference, and image (file) or sample
    GET  /api/evidence?result_id&x&y    evidence of the segment under pixel (x, y)
    GET  /api/refcrop/{ref}/{id}.png    thumbnail of a reference segment
"""

# no `from __future__ import annotations`: FastAPI reads the route annotations at run time
import logging
from pathlib import Path
from typing import Mapping, Sequence

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


def create_app(backend: DemoBackend):
    """The FastAPI application of ``backend``.

    Raises:
        ImportError: FastAPI, uvicorn or python-multipart missing (names the ``demo`` extra).
    """
    require_demo_extra()
    from fastapi import FastAPI, File, Form, HTTPException, UploadFile
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles

    from reme.errors import ImageReadError

    app = FastAPI(title="reme demo", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

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
    def segment(classes: str = Form(...), reference: str = Form(""), sample: str = Form(""),
                image: UploadFile | None = File(None)):
        from reme.demo.backend import read_upload

        try:
            if image is not None and image.filename:
                img = read_upload(image.file.read())
            elif sample:
                img = backend.sample(sample)
            else:
                raise ValueError("upload a photo or pick a bundled one")
            return backend.segment(img, classes, reference or None)
        except (ValueError, ImageReadError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except KeyError as exc:
            return JSONResponse({"error": exc.args[0]}, status_code=404)

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
          segmenter_kwargs=None) -> None:
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

    Raises:
        ImportError: the ``demo`` extra is not installed.
    """
    require_demo_extra()
    import uvicorn

    backend = DemoBackend(references, image_roots=image_roots, device=device, segmenter_kwargs=segmenter_kwargs)
    if preload:
        backend.segmenter(backend.default_reference)
    app = create_app(backend)
    logger.info("reme demo on http://%s:%d", host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
