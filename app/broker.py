"""The embedded broker: kombu's filesystem transport, made safe for one more reader.

kombu's filesystem channel creates a message's file under its final name and
then writes it, while a consumer moves and reads every file with that name that
it lists — without the writer's lock. A consumer polling every 50 ms can read
a file still empty and die on the JSON ("Unrecoverable error: JSONDecodeError"),
which stopped the demo's worker mid-run. Here a message is written under a name
no consumer picks up and renamed into place when complete: a rename within one
folder is atomic, so a reader sees a whole message or none.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

ALIAS = "filesystem"


class Channel(filesystem.Channel):
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + ".partial"  # not "<queue>.msg": consumers skip it
        with open(partial, "wb") as f:
            f.write(str_to_bytes(dumps(payload)))  # type: ignore[no-untyped-call]
        os.replace(partial, final)


class Transport(filesystem.Transport):
    Channel = Channel


def use_atomic_filesystem_transport() -> None:
    """Make `filesystem://` URLs use this transport, in the process that calls it."""
    TRANSPORT_ALIASES[ALIAS] = f"{__name__}:Transport"
