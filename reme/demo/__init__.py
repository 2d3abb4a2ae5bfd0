"""``reme demo``: a local web page to segment a photo with custom classes and see, for any
segment, the reference segments its label was retrieved from.

Needs the ``demo`` extra (``pip install "reme[demo]"``: FastAPI, uvicorn, python-multipart).
Why a small FastAPI page and not Gradio: the page needs one custom interaction (click a pixel
of the overlay, show that segment's evidence with reference thumbnails), which is a few lines
of plain JavaScript here, while the extra stays at three small packages; the page loads
nothing from the internet (works offline), and its DOM is stable for the Playwright test.
"""

from reme.demo.backend import DemoBackend

__all__ = ["DemoBackend", "create_app", "serve"]


def create_app(backend: DemoBackend, **kwargs):
    """The FastAPI app of a [`DemoBackend`][reme.demo.backend.DemoBackend] (see
    [`reme.demo.app.create_app`][reme.demo.app.create_app])."""
    from reme.demo.app import create_app as _create

    return _create(backend, **kwargs)


def serve(references, **kwargs) -> None:
    """Run the demo server (see [`reme.demo.app.serve`][reme.demo.app.serve])."""
    from reme.demo.app import serve as _serve

    _serve(references, **kwargs)
