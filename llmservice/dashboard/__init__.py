"""The operator dashboard: custom admin views (Status, Models, Playground, Analytics, Settings)
and the status websocket. Mounted on the admin site by llmservice.admin_site."""

from __future__ import annotations

import time

# The ASGI module imports the websocket routing (and so this package) at server start: uptime
# counts from here.
STARTED_AT = time.time()
