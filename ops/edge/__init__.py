"""The HTTP edge (``gridq edge``): clients that cannot open a Redis connection — a browser, a
phone, another language's runtime — reach the grid through it. It verifies each signed
envelope (a sender it admits, the signature, expiry, a fresh nonce and job id) and enqueues
it on the same Celery queues as the Python client, with a broker user of its own
(``ops/acl.py``, role ``edge``); it relays the signed (and sealed) replies. It holds no
participant's key: it can neither forge a request nor read a release.

    from ops.edge import EdgeSettings, make_app
    app = make_app(EdgeSettings(broker="redis://edge:…@127.0.0.1:6379/0", users=Path("~/.gridq/keys")))

``app.py`` has the routes, ``checks.py`` what is checked before the broker (envelopes, sizes,
rates), ``broker.py`` the broker side (admission, sending, long-polls), ``run.py`` uvicorn.
"""

from ops.edge.app import make_app
from ops.edge.settings import EdgeSettings

__all__ = ["EdgeSettings", "make_app"]
