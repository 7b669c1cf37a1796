"""Adapters between each RPC's chunk messages and :mod:`swarm.transport.transfer` items.

Training RPCs (SubmitJob, DownloadResult, FetchJobData, FetchStageWeights, UploadCheckpoint)
carry a ``file`` (``FileHeader``) or ``data`` field per message; the inference gateway's
UploadModel announces every file in its header and tags each data chunk with its file's path.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from swarm.proto.v1 import inference_pb2
from swarm.proto.v1 import training_pb2
from swarm.transport.transfer import FileHeader, Item


def header_to_pb(h: FileHeader) -> training_pb2.FileHeader:
    return training_pb2.FileHeader(name=h.name, size_bytes=h.size_bytes, sha256=h.sha256)


def header_from_pb(m: training_pb2.FileHeader) -> FileHeader:
    """Raises InvalidRequestError for a malformed header."""
    return FileHeader(name=m.name, size_bytes=int(m.size_bytes), sha256=m.sha256)


def to_messages(items: Iterable[Item], message_type) -> Iterator:
    """``message_type(file=...)`` for each header and ``message_type(data=...)`` for each chunk."""
    for item in items:
        if isinstance(item, FileHeader):
            yield message_type(file=header_to_pb(item))
        else:
            yield message_type(data=item)


def from_messages(messages: Iterable) -> Iterator[Item]:
    """Headers and data chunks of messages with ``file`` and ``data`` fields, in order."""
    for m in messages:
        if m.HasField("file"):
            yield header_from_pb(m.file)
        if m.data:
            yield m.data


def upload_file_to_pb(h: FileHeader) -> inference_pb2.ServeUploadFile:
    return inference_pb2.ServeUploadFile(path=h.name, size_bytes=h.size_bytes, sha256=h.sha256)


def upload_file_from_pb(f: inference_pb2.ServeUploadFile) -> FileHeader:
    return FileHeader(name=f.path, size_bytes=int(f.size_bytes), sha256=f.sha256)
