"""ZConfig support: ``%import tidecache`` makes a ``<tidecache>`` section
that wraps any storage section (as ``zc.zlibstorage`` does)::

    %import tidecache
    <zodb>
      <tidecache>
        socket /run/tidecached.sock
        # database zeo:main        (optional; default derived from the base)
        # timeout-ms 50            (optional)
        <zeoclient>
          server /run/zeo.sock
        </zeoclient>
      </tidecache>
    </zodb>
"""

from ZODB.config import BaseConfig


class TideCacheStorageFactory(BaseConfig):
    """ZConfig datatype of ``<tidecache>``: opens the wrapped storage
    section and returns a :class:`tidecache.TideCacheStorage` over it."""

    def open(self):
        from tidecache.storage import TideCacheStorage

        base = self.config.base.open()
        return TideCacheStorage(
            base,
            socket=self.config.socket,
            database=self.config.database,
            timeout_ms=self.config.timeout_ms,
        )
