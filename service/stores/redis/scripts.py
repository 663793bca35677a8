"""The Lua scripts behind `service.stores.redis.registry`: each change of a task is one script, so
it is atomic however many replicas and workers write at once, and final states stay sticky.

Keys (P is the prefix, `ics:` by default; one Redis, not a Cluster):
  P task:<id>    hash   the summary: status, times, counts, owner, the replica running it
  P urls:<id>    hash   item index -> its URL as a JSON string literal (until the task is final)
  P items:<id>   hash   item index -> the item's JSON, once final
  P state:<id>   hash   item index -> its status, once no longer pending (until the task is final)
  P done:<id>    list   item indices in the order they became final
  P tasks:<owner> zset  sequence number -> task id, per owner ("-": no API keys)
  P active       zset   sequence number -> task id, tasks not yet final
  P finished     zset   finish time (epoch s) -> task id, for expiry
  P seq, P unfinished, P counts (status -> tasks)
  P unfinished:<owner>  string  unfinished images of one owner ("-": no API keys), gone at 0
  P outcomes:<replica>  hash  "status|code" -> images made final among the tasks that replica runs
                         (it exports them as ics_images_total; gone with its lease)
  P idem:<owner, key>  string  what an idempotency key stands for (with its TTL)
  P idem-order   zset   sequence number -> idempotency key, to keep at most so many
  P replica:<id>  string  a replica's lease (expires unless renewed)
  P lease-clock  string  Redis's time (ms) of the last lease renewal, by any replica
  P adoption-paused  string  while it lives, no task is adopted (see RENEW)
Every change that a watcher may wait for is published on the channel P changed (the task id).
An item's JSON is spliced here from its URL literal and the rest, which Python made with
pydantic (`tail`: everything after the URL), so it reads exactly like the in-memory one.
"""

from __future__ import annotations

_COMMON = """
local P = ARGV[1]
local FINAL = {succeeded = true, failed = true, cancelled = true, completed = true}

local function task_key(id) return P .. 'task:' .. id end

local function item_final(id, index, status, code)
  redis.call('RPUSH', P .. 'done:' .. id, index)
  redis.call('HINCRBY', task_key(id), status, 1)
  -- Counted for the replica running the task, whoever wrote the outcome (a worker, mostly).
  local outcomes = P .. 'outcomes:' .. (redis.call('HGET', task_key(id), 'replica') or '-')
  redis.call('HINCRBY', outcomes, status .. '|' .. code, 1)
  if redis.call('PTTL', outcomes) < 0 then redis.call('EXPIRE', outcomes, 3600) end  -- its lease renewals shorten it
  redis.call('DECR', P .. 'unfinished')
  local of_owner = P .. 'unfinished:' .. (redis.call('HGET', task_key(id), 'owner') or '-')
  if redis.call('DECR', of_owner) <= 0 then redis.call('DEL', of_owner) end
end

local function start(id, now_iso)
  redis.call('HSET', task_key(id), 'status', 'running', 'started_at', now_iso)
  redis.call('HINCRBY', P .. 'counts', 'queued', -1)
  redis.call('HINCRBY', P .. 'counts', 'running', 1)
end

local function finish(id, status, now_iso, now_epoch, delivery_id)
  local key = task_key(id)
  local old = redis.call('HGET', key, 'status')
  redis.call('HSET', key, 'status', status, 'finished_at', now_iso)
  redis.call('HINCRBY', P .. 'counts', old, -1)
  redis.call('HINCRBY', P .. 'counts', status, 1)
  redis.call('ZREM', P .. 'active', id)
  -- Every item is final and in items:<id> now, with its URL: the rest is not needed any more.
  redis.call('DEL', P .. 'urls:' .. id, P .. 'state:' .. id)
  -- Strictly increasing scores keep the finish order when the clock does not move.
  local last = redis.call('ZREVRANGE', P .. 'finished', 0, 0, 'WITHSCORES')[2]
  local score = tonumber(now_epoch)
  if last and tonumber(last) >= score then score = tonumber(last) + 0.000001 end
  redis.call('ZADD', P .. 'finished', string.format('%.6f', score), id)
  local callback = redis.call('HGET', key, 'callback')
  if callback then
    redis.call('XADD', P .. 'webhooks', '*', 'delivery', delivery_id, 'task', id, 'url', callback,
      'finished', now_epoch, 'attempts', 0, 'next', now_epoch)
  end
end

local function forget(id)
  local key = task_key(id)
  local status = redis.call('HGET', key, 'status')
  if not status then return 0 end
  local owner = redis.call('HGET', key, 'owner') or '-'
  redis.call('HINCRBY', P .. 'counts', status, -1)
  redis.call('ZREM', P .. 'tasks:' .. owner, id)
  redis.call('ZREM', P .. 'active', id)
  redis.call('ZREM', P .. 'finished', id)
  redis.call('DEL', key, P .. 'urls:' .. id, P .. 'items:' .. id, P .. 'state:' .. id, P .. 'done:' .. id)
  redis.call('PUBLISH', P .. 'changed', id)
  return 1
end
"""

# ARGV: P, id, model, precision, top_k, owner ('' = none), created_at, replica, callback ('' = none),
# idempotency key ('' = none), its submission JSON, its ttl (ms), most keys kept, priority, most
# unfinished images of the service and of the owner ('' = no limit), then each item's URL literal.
# Returns {seq} for a new task, {0, submission JSON} if the idempotency key is taken already,
# {-1, unfinished} if the task would take the service past its limit, {-2, the owner's
# unfinished} the owner past its own. Keys expire by their TTL; beyond the most kept, the
# oldest go first.
CREATE = (
    _COMMON
    + """
local id = ARGV[2]
local key = task_key(id)
if redis.call('EXISTS', key) == 1 then  -- a create retried after its answer was lost
  return {tonumber(redis.call('HGET', key, 'seq'))}
end
local seq = tonumber(redis.call('GET', P .. 'seq') or '0') + 1
local total = #ARGV - 16
local owner = ARGV[6]
if owner == '' then owner = '-' end
if ARGV[10] ~= '' then
  local taken = redis.call('GET', P .. 'idem:' .. ARGV[10])
  if taken then return {0, taken} end
end
local unfinished = tonumber(redis.call('GET', P .. 'unfinished') or '0')
if ARGV[15] ~= '' and unfinished + total > tonumber(ARGV[15]) then return {-1, unfinished} end
local of_owner = tonumber(redis.call('GET', P .. 'unfinished:' .. owner) or '0')
if ARGV[16] ~= '' and of_owner + total > tonumber(ARGV[16]) then return {-2, of_owner} end
if ARGV[10] ~= '' then
  redis.call('SET', P .. 'idem:' .. ARGV[10], ARGV[11], 'PX', ARGV[12])
  redis.call('ZADD', P .. 'idem-order', seq, ARGV[10])
  local excess = redis.call('ZCARD', P .. 'idem-order') - tonumber(ARGV[13])
  if excess > 0 then
    for _, name in ipairs(redis.call('ZRANGE', P .. 'idem-order', 0, excess - 1)) do
      redis.call('DEL', P .. 'idem:' .. name)
    end
    redis.call('ZREMRANGEBYRANK', P .. 'idem-order', 0, excess - 1)
  end
end
redis.call('SET', P .. 'seq', seq)
redis.call('HSET', key, 'seq', seq, 'model', ARGV[3], 'precision', ARGV[4], 'top_k', ARGV[5],
  'created_at', ARGV[7], 'status', 'queued', 'total', total, 'replica', ARGV[8], 'priority', ARGV[14])
if ARGV[6] ~= '' then redis.call('HSET', key, 'owner', ARGV[6]) end
if ARGV[9] ~= '' then redis.call('HSET', key, 'callback', ARGV[9]) end
for i = 17, #ARGV do
  redis.call('HSET', P .. 'urls:' .. id, i - 17, ARGV[i])
end
redis.call('ZADD', P .. 'tasks:' .. owner, seq, id)
redis.call('ZADD', P .. 'active', seq, id)
redis.call('INCRBY', P .. 'unfinished', total)
redis.call('INCRBY', P .. 'unfinished:' .. owner, total)
redis.call('HINCRBY', P .. 'counts', 'queued', 1)
return {seq}
"""
)

# Move items on, each as the registry's update_item does (a batch's outcomes in one call).
# ARGV: P, now_iso, now_epoch, then per item: id, index, status, final (1/0), tail, error code ('' = none),
# delivery_id.
# Returns per item 1, or 0 if refused (its task or the item is final, or the task is gone).
UPDATE_ITEMS = (
    _COMMON
    + """
local function update(id, index, status, final, tail, code, delivery_id)
  local key = task_key(id)
  local task_status = redis.call('HGET', key, 'status')
  if not task_status or FINAL[task_status] then return 0 end
  local before = redis.call('HGET', P .. 'state:' .. id, index)
  if before and FINAL[before] then return 0 end
  redis.call('HSET', P .. 'state:' .. id, index, status)
  local changed = false
  if task_status == 'queued' then
    start(id, ARGV[2])
    changed = true
  end
  if final == '1' then
    local url = redis.call('HGET', P .. 'urls:' .. id, index)
    redis.call('HSET', P .. 'items:' .. id, index, '{"index":' .. index .. ',"url":' .. url .. tail)
    item_final(id, index, status, code)
    if redis.call('LLEN', P .. 'done:' .. id) == tonumber(redis.call('HGET', key, 'total')) then
      finish(id, 'completed', ARGV[2], ARGV[3], delivery_id)
    end
    changed = true
  end
  if changed then redis.call('PUBLISH', P .. 'changed', id) end
  return 1
end

local results = {}
for first = 4, #ARGV, 7 do
  results[#results + 1] = update(ARGV[first], ARGV[first + 1], ARGV[first + 2], ARGV[first + 3],
    ARGV[first + 4], ARGV[first + 5], ARGV[first + 6])
end
return results
"""
)

# Cancel or fail a task: every item not final yet gets `tail` (its status and error).
# ARGV: P, id, item status, tail, task status, task error JSON ('' = none), now_iso, now_epoch,
# delivery_id, owner check ('' = skip it, '-' = no owner, else the owner), the items' error code
# ('' = none). Returns 1 + the
# number of items it closed, 0 if the task was final already, -1 if there is no such task
# (for that owner).
CLOSE = (
    _COMMON
    + """
local id = ARGV[2]
local key = task_key(id)
local task_status = redis.call('HGET', key, 'status')
if not task_status then return -1 end
if ARGV[10] ~= '' and (redis.call('HGET', key, 'owner') or '-') ~= ARGV[10] then return -1 end
if FINAL[task_status] then return 0 end
local total = tonumber(redis.call('HGET', key, 'total'))
local closed = 0
for index = 0, total - 1 do
  local before = redis.call('HGET', P .. 'state:' .. id, index)
  if not (before and FINAL[before]) then
    redis.call('HSET', P .. 'state:' .. id, index, ARGV[3])
    local url = redis.call('HGET', P .. 'urls:' .. id, index)
    redis.call('HSET', P .. 'items:' .. id, index, '{"index":' .. index .. ',"url":' .. url .. ARGV[4])
    item_final(id, index, ARGV[3], ARGV[11])
    closed = closed + 1
  end
end
if ARGV[6] ~= '' then redis.call('HSET', key, 'error', ARGV[6]) end
finish(id, ARGV[5], ARGV[7], ARGV[8], ARGV[9])
redis.call('PUBLISH', P .. 'changed', id)
return 1 + closed
"""
)

# ARGV: P, id. Forget a task (its caller cancelled it first). Returns 1, or 0 if unknown.
FORGET = (
    _COMMON
    + """
return forget(ARGV[2])
"""
)

# ARGV: P, deadline (epoch s: finished by then go), most finished tasks kept. Returns how many went.
EXPIRE = (
    _COMMON
    + """
local gone = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'finished', '-inf', ARGV[2])) do
  gone = gone + forget(id)
end
local excess = redis.call('ZCARD', P .. 'finished') - tonumber(ARGV[3])
if excess > 0 then
  for _, id in ipairs(redis.call('ZRANGE', P .. 'finished', 0, excess - 1)) do
    gone = gone + forget(id)
  end
end
return gone
"""
)

# Renew a replica's lease (and the time to live of its outcome counts). Redis's own clock
# tells a stall apart from a dead replica: when no renewal reached Redis for over half a lease
# (Redis stopped, frozen, or every replica was away), every lease may have run out meanwhile
# although its replica lives; so no task is adopted for one lease from now, time for every
# live replica to renew (its renewals come every third of a lease).
# ARGV: P, replica id, lease (ms), outcome counts' time to live (ms).
RENEW = """
local P = ARGV[1]
local lease = tonumber(ARGV[3])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local last = tonumber(redis.call('GET', P .. 'lease-clock') or '0')
if last > 0 and now - last > lease / 2 then
  redis.call('SET', P .. 'adoption-paused', 1, 'PX', lease)
end
redis.call('SET', P .. 'lease-clock', now)
redis.call('SET', P .. 'replica:' .. ARGV[2], '1', 'PX', lease)
redis.call('PEXPIRE', P .. 'outcomes:' .. ARGV[2], ARGV[4])
return 1
"""

# Take over the active tasks whose replica is gone (its lease key expired), checked and
# taken in one step; none while leases may have run out in a stall (see RENEW), nor by a
# replica whose own lease has run out.
# ARGV: P, this replica's id, at most this many. Returns the ids taken over.
ADOPT = (
    _COMMON
    + """
if redis.call('EXISTS', P .. 'adoption-paused') == 1 or redis.call('EXISTS', P .. 'replica:' .. ARGV[2]) == 0 then
  return {}
end
local taken = {}
for _, id in ipairs(redis.call('ZRANGE', P .. 'active', 0, -1)) do
  local replica = redis.call('HGET', task_key(id), 'replica')
  if replica ~= ARGV[2] and redis.call('EXISTS', P .. 'replica:' .. replica) == 0 then
    redis.call('HSET', task_key(id), 'replica', ARGV[2])
    taken[#taken + 1] = id
    if #taken >= tonumber(ARGV[3]) then break end
  end
end
return taken
"""
)
