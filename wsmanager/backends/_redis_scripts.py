"""The Redis backend's Lua scripts: each one a step that must be atomic across processes.

The key layout they work on is in :mod:`wsmanager.backends.redis`'s docstring; ``{p}`` is the
prefix, ``{n}`` a node id. Every script names keys it computes from ``ARGV`` (the per-user
hashes, the per-node heartbeat keys), so they run on one Redis, not on Redis Cluster.
"""
from __future__ import annotations

__all__ = ["RESERVE", "HEARTBEAT", "COLLECT", "UNION_LIVE", "ALL"]

#: Admission against the cluster-wide per-user limit. Entries of nodes whose heartbeat is gone
#: do not count and are deleted on the way. Returns 1 (admitted, recorded) or 0 (full).
#: KEYS: {p}:user:{u}, {p}:conns:{n}, {p}:users:{n}
#: ARGV: connection id, node id, limit (< 0: none), heartbeat key head "{p}:node:", user id
RESERVE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 1 end
local limit = tonumber(ARGV[3])
if limit >= 0 then
  local held = redis.call('HGETALL', KEYS[1])
  local live = {}
  local count = 0
  for i = 1, #held, 2 do
    local owner = held[i + 1]
    local up = live[owner]
    if up == nil then
      up = (owner == ARGV[2]) or (redis.call('EXISTS', ARGV[4] .. owner) == 1)
      live[owner] = up
    end
    if up then
      count = count + 1
    else
      redis.call('HDEL', KEYS[1], held[i])
    end
  end
  if count >= limit then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[5])
redis.call('SADD', KEYS[3], ARGV[5])
return 1
"""

#: The node's heartbeat: its stats summary under a TTL, its name in the node set, its indexes
#: kept alive. Returns 1 when the heartbeat key existed before; 0 means Redis lost this node's
#: entries (a restart, or a stall past the TTL after which another node collected them).
#: KEYS: {p}:node:{n}, {p}:nodes, then the index keys to keep alive
#: ARGV: summary JSON, node_ttl (ms), node id, index_ttl (ms)
HEARTBEAT = """
local existed = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
for i = 3, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
return existed
"""

#: Remove a node's entries: its per-user hash fields, channel sets, indexes and heartbeat.
#: Only when its heartbeat is gone, unless forced (a node leaving on purpose). Returns 1 when
#: it collected, 0 when the node is alive.
#: KEYS: {p}:node:{n}, {p}:nodes, {p}:conns:{n}, {p}:users:{n}, {p}:chans:{n}
#: ARGV: node id, prefix, force ("1")
COLLECT = """
if ARGV[3] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local conns = redis.call('HGETALL', KEYS[3])
for i = 1, #conns, 2 do
  local user = conns[i + 1]
  if user ~= '' then
    local hash = ARGV[2] .. ':user:' .. user
    if redis.call('HGET', hash, conns[i]) == ARGV[1] then redis.call('HDEL', hash, conns[i]) end
  end
end
for _, channel in ipairs(redis.call('SMEMBERS', KEYS[5])) do
  redis.call('DEL', ARGV[2] .. ':chan:' .. channel .. ':' .. ARGV[1])
end
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4], KEYS[5])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""

#: The union of the sets ``head .. node .. tail`` over the nodes whose heartbeat exists.
#: KEYS: {p}:nodes.  ARGV: heartbeat key head "{p}:node:", set key head, set key tail
UNION_LIVE = """
local sets = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. node) == 1 then sets[#sets + 1] = ARGV[2] .. node .. ARGV[3] end
end
if #sets == 0 then return {} end
return redis.call('SUNION', unpack(sets))
"""

#: Every script by the name the backend registers it under.
ALL = {"reserve": RESERVE, "heartbeat": HEARTBEAT, "collect": COLLECT, "union": UNION_LIVE}
