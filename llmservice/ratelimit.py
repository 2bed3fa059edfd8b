"""Per-key requests-per-minute and tokens-per-minute limits over a sliding 60-second window.

Without Redis the counts live in this process's memory: right for the single-process server
`llm-service serve` runs. With `LLM_SERVICE_REDIS_URL` they live in Redis (a sorted set per key
and limit, checked and updated by one Lua script), so every server process behind a balancer
enforces the same limits.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict, deque

WINDOW = 60.0


class Limiter:
    def __init__(self) -> None:
        self._requests: dict[int, deque[float]] = defaultdict(deque)
        self._tokens: dict[int, deque[tuple[float, int]]] = defaultdict(deque)
        self._lock = threading.Lock()

    def check(self, key_id: int, rpm: int | None, tpm: int | None) -> tuple[str, float] | None:
        """Admit one request, or say which limit it hits and how many seconds until it frees."""
        now = time.monotonic()
        with self._lock:
            requests = self._requests[key_id]
            while requests and requests[0] <= now - WINDOW:
                requests.popleft()
            tokens = self._tokens[key_id]
            while tokens and tokens[0][0] <= now - WINDOW:
                tokens.popleft()
            if rpm is not None and len(requests) >= rpm:
                return "requests", requests[0] + WINDOW - now
            if tpm is not None and sum(n for _, n in tokens) >= tpm:
                return "tokens", tokens[0][0] + WINDOW - now
            requests.append(now)
            return None

    def add_tokens(self, key_id: int | None, count: int) -> None:
        if key_id is None or count <= 0:
            return
        with self._lock:
            self._tokens[key_id].append((time.monotonic(), count))


# KEYS: the key's request set, its token set. ARGV: now, window, rpm, tpm (-1: none), member.
# Token members are "<uuid>:<count>". Returns nil when admitted, else {limit, seconds}.
_CHECK = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
if rpm >= 0 and redis.call('ZCARD', KEYS[1]) >= rpm then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {'requests', tostring(tonumber(first[2]) + window - now)}
end
if tpm >= 0 then
  local total = 0
  for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    total = total + tonumber(string.match(member, ':(%d+)$'))
  end
  if total >= tpm then
    local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {'tokens', tostring(tonumber(first[2]) + window - now)}
  end
end
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('EXPIRE', KEYS[1], math.ceil(window) + 1)
return nil
"""


class RedisLimiter:
    """The same limits, shared by every process that uses this Redis."""

    def __init__(self, url: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(url)
        self._check = self._redis.register_script(_CHECK)

    @staticmethod
    def _keys(key_id: int) -> list[str]:
        return [f"llm-service:rpm:{key_id}", f"llm-service:tpm:{key_id}"]

    def check(self, key_id: int, rpm: int | None, tpm: int | None) -> tuple[str, float] | None:
        hit = self._check(
            keys=self._keys(key_id),
            args=[
                time.time(),
                WINDOW,
                -1 if rpm is None else rpm,
                -1 if tpm is None else tpm,
                uuid.uuid4().hex,
            ],
        )
        if not hit:
            return None
        limit, seconds = hit
        return limit.decode(), max(0.0, float(seconds))

    def add_tokens(self, key_id: int | None, count: int) -> None:
        if key_id is None or count <= 0:
            return
        key = self._keys(key_id)[1]
        pipe = self._redis.pipeline()
        pipe.zadd(key, {f"{uuid.uuid4().hex}:{count}": time.time()})
        pipe.expire(key, int(WINDOW) + 1)
        pipe.execute()


class _Lazy:
    """The limiter the settings ask for, made on first use (after Django's settings load)."""

    _made: Limiter | RedisLimiter | None = None

    def _get(self) -> Limiter | RedisLimiter:
        if self._made is None:
            from django.conf import settings

            self._made = RedisLimiter(settings.REDIS_URL) if settings.REDIS_URL else Limiter()
        return self._made

    def check(self, key_id: int, rpm: int | None, tpm: int | None) -> tuple[str, float] | None:
        return self._get().check(key_id, rpm, tpm)

    def add_tokens(self, key_id: int | None, count: int) -> None:
        self._get().add_tokens(key_id, count)


limiter = _Lazy()
