"""tidecache: an MVCC-aware state cache for ZODB, shared by every process
on a host through the ``tidecached`` sidecar.

Use::

    import ZODB
    from tidecache import TideCacheStorage
    db = ZODB.DB(TideCacheStorage(base_storage, socket="/run/tidecached.sock"))

or in ZConfig::

    %import tidecache
    <zodb>
      <tidecache>
        socket /run/tidecached.sock
        <filestorage>
          path /var/db/Data.fs
        </filestorage>
      </tidecache>
    </zodb>

``tidecache.DB(storage, shared_state=True)`` (or ``shared-state on`` in the
section) also shares unpickled states between the connections of a process
(:mod:`tidecache.shared`).

``Client`` is the raw client of the sidecar's protocol, for tools and
benchmarks.
"""

from tidecache._native import BadRequestError
from tidecache._native import Client
from tidecache._native import FutureTidError
from tidecache._native import GapError
from tidecache._native import LimitError
from tidecache._native import ProtocolError
from tidecache._native import RefusedError
from tidecache._native import StaleError
from tidecache._native import TideCacheError
from tidecache._native import Unavailable
from tidecache._native import UnknownViewError
from tidecache._native import __version__
from tidecache.shared import DB
from tidecache.storage import TideCacheStorage
from tidecache.storage import database_key

__all__ = [
    "BadRequestError",
    "Client",
    "DB",
    "FutureTidError",
    "GapError",
    "LimitError",
    "ProtocolError",
    "RefusedError",
    "StaleError",
    "TideCacheError",
    "TideCacheStorage",
    "Unavailable",
    "UnknownViewError",
    "__version__",
    "database_key",
]
