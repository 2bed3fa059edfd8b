"""The status websocket: staff only, one status snapshot per second."""

from __future__ import annotations

import asyncio
import logging

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from llmservice.dashboard.status import TokenRate, snapshot

log = logging.getLogger(__name__)

PUSH_INTERVAL = 1.0
FORBIDDEN = 4403  # application close code: not a staff session

# Off the thread that sync views share, so a slow admin request never stalls the push.
_snapshot = database_sync_to_async(snapshot, thread_sensitive=False)


class StatusConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if not (user is not None and user.is_active and user.is_staff):
            await self.close(code=FORBIDDEN)
            return
        await self.accept()
        self._task = asyncio.create_task(self._push())

    async def disconnect(self, code):
        task = getattr(self, "_task", None)
        if task is not None:
            task.cancel()

    async def _push(self):
        rate = TokenRate()
        try:
            while True:
                await self.send_json(rate.update(await _snapshot()))
                await asyncio.sleep(PUSH_INTERVAL)
        except Exception:  # not CancelledError (a BaseException): disconnect still stops the loop
            log.exception("status push failed")
            await self.close()
