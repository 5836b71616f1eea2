"""Blobs go with their oid.

Every child gets the same blob directory (``blob-dir`` in each partition,
or the composite's ``blob-dir``).  Oids are unique across partitions, so
the children's bushy layouts never collide, a ZEO client with a shared blob
directory finds every blob by its composite oid, and a child opened alone
still finds its own blobs.
"""


class BlobMethods:
    """IBlobStorage for a composite; declared only if every child has it."""

    @property
    def fshelper(self):
        return self.primary.storage.fshelper

    def temporaryDirectory(self):
        return self.primary.storage.temporaryDirectory()

    def storeBlob(self, oid, oldserial, data, blobfilename, version,
                  transaction):
        state, part = self._writable(oid, transaction, 'store a blob for')
        state.stored(oid, oldserial, data)
        data = self.to_child(part, oid, data, state)
        txn = self._coordinator.begin(state, part)
        part.storage.storeBlob(oid, oldserial, data, blobfilename, '', txn)
        part.saw_oid(oid)

    def restoreBlob(self, oid, serial, data, blobfilename, prev_txn,
                    transaction):
        state, part = self._writable(oid, transaction, 'restore a blob for')
        if data is not None:
            state.restored(oid, data)
            data = self.to_child(part, oid, data, state)
        txn = self._coordinator.begin(state, part)
        part.storage.restoreBlob(oid, serial, data, blobfilename, prev_txn,
                                 txn)
        part.saw_oid(oid)

    def loadBlob(self, oid, serial):
        return self.partition_for(oid).storage.loadBlob(oid, serial)

    def openCommittedBlobFile(self, oid, serial, blob=None):
        return self.partition_for(oid).storage.openCommittedBlobFile(
            oid, serial, blob)
