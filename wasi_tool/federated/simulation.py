"""Simulation on one machine without Ray: a Flower ``Grid`` that delivers each message to the
ClientApp in this process, one client after another.

Flower's own simulation engine runs ClientApps on Ray actors (``flwr[simulation]``). Ray
installs here, but on a 2-core edge-class box its actor pool adds processes, memory and start-up
time that would swamp the per-client peak RSS we measure, so ``wasi-tool federate`` drives the
same ``server_app`` logic (``serve``) and the same ``client_app`` through this in-process grid.
A client that raises becomes an error reply (as a crashed SuperNode's ClientApp does under
deployment), so the server drops it and the round goes on.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE = 1  # the SuperLink's node id in Flower's messages

Hook = Callable[[int, Message, Message], Message | None]


class LocalGrid(Grid):
    """Nodes 1001.. with ``partition-id`` 0.. in their node config; ``hook(node, sent, reply)``
    may replace or drop (None) a reply: fault injection in tests."""

    def __init__(
        self,
        client_app: Any,
        clients: int,
        node_config: dict[str, Any] | None = None,
        hook: Hook | None = None,
    ) -> None:
        self.client_app = client_app
        self.hook = hook
        self._run = Run.create_empty(run_id=1)
        # what Flower's ServerApp process sets before its main runs (Message needs it)
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = SERVER_NODE
        TaskIdentity.task_id = 1
        self.contexts = {
            1001 + k: Context(
                run_id=1,
                node_id=1001 + k,
                node_config={"partition-id": k, "num-partitions": clients, **(node_config or {})},
                state=RecordDict(),
                run_config={},
            )
            for k in range(clients)
        }
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            meta = msg.metadata.__dict__
            meta["_message_id"] = str(uuid.uuid4())
            meta["_run_id"] = self._run.run_id
            meta["_src_node_id"] = SERVER_NODE
            node = msg.metadata.dst_node_id
            try:
                reply = self.client_app(msg, self.contexts[node])
            except Exception as exc:  # a crashed client: an error reply, as in deployment
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            if self.hook is not None:
                reply = self.hook(node, msg, reply)
            if reply is not None:
                self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
