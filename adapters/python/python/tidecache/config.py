"""ZConfig support: ``%import tidecache`` makes a ``<tidecache>`` section
that wraps any storage section (as ``zc.zlibstorage`` does)::

    %import tidecache
    <zodb>
      <tidecache>
        socket /run/tidecached.sock
        # database zeo:main        (optional; default derived from the base)
        # timeout-ms 50            (optional)
        # shared-state on          (optional: shared unpickled state)
        # shared-state-mb 64       (optional: its bound per process)
        # shared-state-decode-first off  (optional: decode at a second read)
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

        config = self.config
        if config.shared_state and config.shared_state_mb <= 0:
            raise ValueError("shared-state-mb must be positive, got %r" % (config.shared_state_mb,))
        base = config.base.open()
        storage = TideCacheStorage(
            base,
            socket=config.socket,
            database=config.database,
            timeout_ms=config.timeout_ms,
        )
        if config.shared_state:
            from tidecache.shared import _configure_globally

            storage._tc_shared_state_mb = config.shared_state_mb
            storage._tc_shared_decode_first = config.shared_state_decode_first
            _configure_globally()
        return storage
