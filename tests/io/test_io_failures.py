"""Read errors survive a process boundary: a worker's ImageReadError (a curation pool, a data-loader worker)
reaches the parent with its file, kind and reason, not as a TypeError from unpickling."""

from __future__ import annotations

import pickle

from chexfound.errors import ConfigError, CXRReadError, DeviceError
from chexfound.io import ImageReadError, ReadFailure


def test_read_errors_pickle_with_path_kind_and_reason():
    e = ImageReadError("scan.dcm", ReadFailure.TRUNCATED, "truncated pixel data: the file ends early")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is ImageReadError and back.kind is ReadFailure.TRUNCATED
    assert (back.path, back.reason, str(back)) == (e.path, e.reason, str(e))
    for err in (CXRReadError("a.png", "corrupt"), ConfigError(None, "bad key"), DeviceError(None, "no cuda:3")):
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err) and (again.path, again.reason, str(again)) == (err.path, err.reason, str(err))
