"""``edgevlm serve``: an OpenAI-compatible HTTP server over one ``edgevlm.runtime.Session`` (Starlette + uvicorn).

    >>> from edgevlm.serve import create_app, run_server, ServeSettings
    >>> app = create_app(ServeSettings(bundle="out/tiny-bundle"))     # a Starlette app (loads the Session now)
    >>> run_server(ServeSettings(bundle="out/tiny-bundle", port=8000))  # uvicorn until SIGINT / SIGTERM

    edgevlm serve out/tiny-bundle --port 8000 --api-key-file key.txt --media-dir ./images

Modules: ``settings`` (ServeSettings), ``app`` (routes, create_app, run_server), ``schema`` (OpenAI request
validation, prompt rendering, response objects), ``images`` (image_url resolution + safe decode), ``worker`` (the
bounded queue and the thread that owns the Session), ``metrics`` (Prometheus), ``errors`` (ServeError), ``static/``
(the web page at ``/``). Needs the ``serve`` extra (``pip install 'edgevlm[serve]'``); never imports torch.
"""

from edgevlm.serve.app import create_app, run_server
from edgevlm.serve.errors import ServeError
from edgevlm.serve.settings import ServeSettings

__all__ = ["create_app", "run_server", "ServeSettings", "ServeError"]
