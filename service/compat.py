"""The gunicorn and Werkzeug internals convserve borrows, each named once here and checked at boot.

None of them is a public API, so an upgrade may remove one. Reaching them through ``getattr(..., None)`` would then
lose what they give without a word (JSON errors from gunicorn, closing a connection after ``Connection: close``,
the OpenAPI enums); instead ``check()`` runs before any worker starts (service/gunicorn_config.py), and a missing one
stops the start with one line naming it and the versions that work (deploy/constraints.txt).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from importlib import metadata


@dataclasses.dataclass(frozen=True)
class Borrowed:
    name: str  # where it lives, dotted
    purpose: str  # what convserve loses without it
    present: Callable[[], bool]


class MissingInternal(RuntimeError):
    def __init__(self, borrowed: Borrowed):
        package = borrowed.name.split(".")[0]
        super().__init__(f"convserve: {borrowed.name} is missing from {package} {_version(package)}; it is needed for "
                         f"{borrowed.purpose}: install the versions in deploy/constraints.txt")
        self.borrowed = borrowed


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _worker_error_writer() -> bool:
    from gunicorn import util
    from gunicorn.workers import base

    return base.util is util and callable(getattr(util, "write_error", None)) \
        and callable(getattr(util, "write_nonblock", None))


def _response_force_close() -> bool:
    from gunicorn.http.wsgi import Response

    return callable(getattr(Response, "force_close", None)) and callable(getattr(Response, "start_response", None))


def _gevent_worker_hooks() -> bool:
    from gunicorn.workers.ggevent import GeventWorker

    return all(callable(getattr(GeventWorker, hook, None)) for hook in ("patch", "handle", "run", "load_wsgi"))


def _rule_converters() -> bool:
    from werkzeug.routing import Map, Rule

    rule = Rule("/<any(a, b):choice>", endpoint="probe")
    Map([rule])  # binding a rule compiles it, which sets its converters
    return getattr(getattr(rule, "_converters", {}).get("choice"), "items", None) is not None


BORROWED = (
    Borrowed("gunicorn.workers.base.util", "JSON bodies on the errors gunicorn answers itself (its write_error is "
             "swapped in the worker)", _worker_error_writer),
    Borrowed("gunicorn.http.wsgi.Response.force_close", "closing the connection after an answer that says "
             "Connection: close", _response_force_close),
    Borrowed("gunicorn.workers.ggevent.GeventWorker", "the serving worker (service/worker.py overrides patch, handle, "
             "run and load_wsgi)", _gevent_worker_hooks),
    Borrowed("werkzeug.routing.Rule._converters", "the choices of an any() path parameter in the OpenAPI document",
             _rule_converters),
)


def check() -> None:
    """Raise MissingInternal for the first borrowed internal this environment lacks."""
    for borrowed in BORROWED:
        try:
            present = borrowed.present()
        except (ImportError, AttributeError):
            present = False
        if not present:
            raise MissingInternal(borrowed)


# ---- the uses, each through the one name checked above ---------------------------------------------------------------

def replace_worker_error_writer(writer) -> None:
    """gunicorn's worker calls ``util.write_error`` for a request it cannot parse: ``writer`` answers instead, in
    this worker process only."""
    from gunicorn.workers import base

    base.util = writer


def close_after_response(start_response) -> None:
    """Make gunicorn close the connection once this response is sent (its own handling drops ``Connection: close``
    set by the app). ``start_response`` is gunicorn's bound ``Response.start_response``."""
    start_response.__self__.force_close()


def any_converter_choices(rule, argument: str) -> list[str]:
    """The values an ``<any(...):argument>`` path parameter of a bound Werkzeug rule accepts."""
    return sorted(rule._converters[argument].items)
