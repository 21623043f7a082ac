"""The Lua scripts: each atomic step of the store is one script run in Redis."""


# KEYS: placement, version, history, generation, lease.
# ARGV: expected version, new JSON, history size, channel, generation for a new table,
#       fence holder ('' = unfenced), fence token.
# Returns {1, new_version, generation} on success, {0, current_version, ''} when the
# version moved, {-1, 0, ''} when the fence (lease holder and token) does not hold,
# {-2, 0, holder} when an unfenced publish finds the lease held (only its holder publishes).
PUBLISH_PLACEMENT = """
if ARGV[6] ~= '' then
  local cur = redis.call('GET', KEYS[5])
  if not cur then
    return {-1, 0, ''}
  end
  local rec = cjson.decode(cur)
  if rec.holder ~= ARGV[6] or string.format('%d', rec.token or 0) ~= ARGV[7] then
    return {-1, 0, ''}
  end
else
  local cur = redis.call('GET', KEYS[5])
  if cur then
    return {-2, 0, cjson.decode(cur).holder}
  end
end
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local expected = tonumber(ARGV[1])
if current ~= expected then
  return {0, current, ''}
end
local generation = redis.call('GET', KEYS[4])
if expected == 0 or not generation then
  generation = ARGV[5]
  redis.call('SET', KEYS[4], generation)
end
local new_version = expected + 1
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], new_version)
redis.call('LPUSH', KEYS[3], ARGV[2])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[3]) - 1)
redis.call('PUBLISH', ARGV[4], new_version)
return {1, new_version, generation}
"""

# KEYS: lease, last token. ARGV: holder, now, expires_at, ttl ms, token candidate (Redis time, us).
# Free, lapsed (by `now`) or already ours: take it. A new holding gets a token past every
# earlier one; re-acquiring your own keeps its token. Returns the token, or 0.
ACQUIRE_LEASE = """
local cur = redis.call('GET', KEYS[1])
local token = nil
if cur then
  local rec = cjson.decode(cur)
  if rec.holder ~= ARGV[1] and tonumber(rec.expires_at) > tonumber(ARGV[2]) then
    return 0
  end
  if rec.holder == ARGV[1] and tonumber(rec.expires_at) > tonumber(ARGV[2]) and rec.token then
    token = tonumber(rec.token)
  end
end
if not token then
  local last = tonumber(redis.call('GET', KEYS[2]) or '0')
  token = math.max(tonumber(ARGV[5]), last + 1)
  redis.call('SET', KEYS[2], string.format('%d', token))
end
local rec = '{"holder":' .. cjson.encode(ARGV[1]) .. ',"expires_at":' .. ARGV[3] .. ',"token":' .. string.format('%d', token) .. '}'
redis.call('SET', KEYS[1], rec, 'PX', ARGV[4])
return token
"""

# KEYS: lease. ARGV: holder, now, expires_at, ttl ms, token ('' = any).
# Only a current (by `now`) holder renews, keeping its token. Returns the token, or 0.
RENEW_LEASE = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  return 0
end
local rec = cjson.decode(cur)
if rec.holder ~= ARGV[1] or tonumber(rec.expires_at) <= tonumber(ARGV[2]) then
  return 0
end
local token = tonumber(rec.token or 0)
if ARGV[5] ~= '' and string.format('%d', token) ~= ARGV[5] then
  return 0
end
local out = '{"holder":' .. cjson.encode(ARGV[1]) .. ',"expires_at":' .. ARGV[3] .. ',"token":' .. string.format('%d', token) .. '}'
redis.call('SET', KEYS[1], out, 'PX', ARGV[4])
return math.max(token, 1)
"""

# KEYS: lease. ARGV: holder.
RELEASE_LEASE = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  return 0
end
if cjson.decode(cur).holder ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: load window hash, totals hash, the window's sources hash. ARGV: window TTL ms, source ('' = none), the
# call's total for the source, then field, tokens pairs (each added to the window and to the totals).
RECORD_LOAD = """
for i = 4, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then
  redis.call('HINCRBY', KEYS[3], ARGV[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[1])
end
return 1
"""

# KEYS: workers hash, expiry zset. ARGV: id, JSON, expires_at, prune entries expired before this.
REGISTER_WORKER = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[4], 'LIMIT', 0, 100)
for _, id in ipairs(old) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
end
return #old
"""



# The fence of a leader's write: the lease (KEYS[1]) is held by ARGV[1] with token ARGV[2].
_FENCE = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  return -1
end
local rec = cjson.decode(cur)
if rec.holder ~= ARGV[1] or string.format('%d', rec.token or 0) ~= ARGV[2] then
  return -1
end
"""

# KEYS: lease. ARGV: token. 1 when the lease is held under that token now, else 0.
# (A worker checks the token a command carries against the lease's current holding.)
CHECK_FENCE = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  return 0
end
if string.format('%d', cjson.decode(cur).token or 0) ~= ARGV[1] then
  return 0
end
return 1
"""

# KEYS: lease, record. ARGV: holder, token, JSON. Returns 1, or -1 when the fence does not hold.
PUT_RECORD_FENCED = _FENCE + """
redis.call('SET', KEYS[2], ARGV[3])
return 1
"""

# KEYS: lease, stream. ARGV: holder, token, maxlen, JSON. Returns the entry id, or -1.
EMIT_EVENT_FENCED = _FENCE + """
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'event', ARGV[4])
"""

# KEYS: lease, counter hash. ARGV: holder, token, then field, increment pairs. Returns 1, or -1.
ADD_COUNTERS_FENCED = _FENCE + """
for i = 3, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', KEYS[2], ARGV[i], ARGV[i + 1])
end
return 1
"""
