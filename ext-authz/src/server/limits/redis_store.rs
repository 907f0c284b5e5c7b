//! Counters in Redis, shared by every replica: each check-and-reserve, commit and release is one
//! Lua script, so it is atomic across replicas (no check-then-increment race), and windows follow
//! Redis's clock (`TIME`), so replicas with skewed clocks still agree on them.
//!
//! Keys (after the configured prefix). On a Redis Cluster a namespace's counters and
//! reservations share one hash tag, `{c<n>}:`, n = xxh3(namespace) mod [`TAGS`]: every key one
//! script touches is in one hash slot, and the namespaces spread over the nodes. (A request's
//! counters are all of one namespace: a hierarchy is charged in one call.) A standalone Redis
//! has one keyspace, without the tag: the names earlier releases used, so an upgrade keeps every
//! counter.
//! - `{c<n>}:c:{counter key}`: the counter's sliding window ([`llm_policy_core::window`]), a hash
//!   of `s:{slot}` (spent) and `r:{slot}` (reserved) fields; slots no check counts are deleted by
//!   the next check, the key expires a window (plus the grace) after its last write.
//! - `{c<n>}:res:{seq}`: one reservation (counter key, window start, window length, amount);
//!   sequence numbers come from `{c<n>}:res-seq`, and a [`ReservationId`] is `n << 48 | seq` (n
//!   is 0 on a standalone Redis), so any replica can settle any reservation.
//! - `{c<n>}:res-pending`: sorted set of reservation sequence numbers by the time they were made,
//!   for expiry.
//! - `held:{handle}`: the reservations an allowed request's usage report settles.

use std::sync::LazyLock;

use llm_policy_core::decision::{Charge, CounterKind};
use llm_policy_core::reply::LimitState;
use llm_policy_core::window::SLOTS;

use super::{CounterState, CounterStore, Held, ReservationId, Reserved, StoreError, StoreFuture};
use crate::server::redis::{Feature, LuaScript, Redis, RedisError};

/// Settles one reservation: `settle(rkey, pending, id, mode, actual, grace)`, mode `release`,
/// `commit` (the reserved amount is spent), `actual` (this amount is spent instead) or `expire`
/// (an unreported reservation: request counts are committed, they were spent when the request
/// went ahead; tokens and cost released). Usage reported after the window turned is spent in the
/// current window.
const SETTLE: &str = r"
local function settle(rkey, pending, id, mode, actual, grace)
  local r = redis.call('HMGET', rkey, 'k', 'w', 'n', 'a', 'q')
  if not r[1] then return 0 end
  if mode == 'expire' then
    if r[5] == 'r' then mode = 'commit' else mode = 'release' end
  end
  redis.call('DEL', rkey)
  redis.call('ZREM', pending, id)
  local rfield = 'r:' .. r[2]
  if redis.call('HEXISTS', r[1], rfield) == 1 then
    local left = tonumber(redis.call('HINCRBYFLOAT', r[1], rfield, -tonumber(r[4])))
    if left <= 0 then redis.call('HDEL', r[1], rfield) end
  end
  local spend = nil
  if mode == 'commit' then spend = tonumber(r[4]) elseif mode == 'actual' then spend = tonumber(actual) end
  if spend and spend > 0 then
    local now = tonumber(redis.call('TIME')[1])
    local window = tonumber(r[3])
    local len = math.max(1, math.ceil(window / SLOTS))
    redis.call('HINCRBYFLOAT', r[1], 's:' .. math.floor(now / len), spend)
    redis.call('EXPIRE', r[1], window + len + grace + 1)
  end
  return 1
end
";

/// Every charge or none, in one call. `KEYS`: id sequence, reservation key prefix, pending set,
/// then one counter key per charge. `ARGV`: grace seconds, `1` to reserve (else a peek), then per
/// charge limit, amount, window seconds, kind (`r`, `t`, `u`). Returns per charge `{fits,
/// remaining, reset_secs, id}` (remaining as a string: Lua numbers become integers on the way
/// out); when one does not fit, or on a peek, nothing is reserved and every id is 0. The sliding
/// window's arithmetic is [`llm_policy_core::window`]'s.
static RESERVE_ALL: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(&format!(
        r"
local SLOTS = {SLOTS}
local now = tonumber(redis.call('TIME')[1])
local grace = tonumber(ARGV[1])
local n = #KEYS - 3
local seen = {{}}
local out = {{}}
local all = true
for i = 1, n do
  local ckey = KEYS[3 + i]
  local limit = tonumber(ARGV[3 + (i - 1) * 4])
  local amount = tonumber(ARGV[4 + (i - 1) * 4])
  local window = tonumber(ARGV[5 + (i - 1) * 4])
  local len = math.max(1, math.ceil(window / SLOTS))
  local first = math.floor(math.max(now - window - 1, 0) / len)
  local h = redis.call('HGETALL', ckey)
  local used = seen[ckey] or 0
  local oldest = nil
  local stale = {{}}
  for j = 1, #h, 2 do
    local f = h[j]
    local idx = tonumber(string.sub(f, 3))
    local v = tonumber(h[j + 1]) or 0
    if idx and idx >= first then
      used = used + v
      if v > 0 and (oldest == nil or idx < oldest) then oldest = idx end
    elseif idx and (string.sub(f, 1, 1) == 's' or v <= 0) then
      table.insert(stale, f)
    end
  end
  if #stale > 0 then redis.call('HDEL', ckey, unpack(stale)) end
  local fits
  if amount > 0 then fits = used + amount <= limit else fits = used < limit end
  if not fits then all = false end
  seen[ckey] = (seen[ckey] or 0) + amount
  local reset = len
  if oldest then reset = math.max((oldest + 1) * len + window + 1 - now, 1) end
  out[i] = {{fits and 1 or 0, tostring(math.max(limit - used - (fits and amount or 0), 0)), reset, 0}}
end
if not all then
  for i = 1, n do
    if out[i][1] == 1 then out[i][2] = tostring(math.max(tonumber(out[i][2]) + tonumber(ARGV[4 + (i - 1) * 4]), 0)) end
  end
  return out
end
if ARGV[2] ~= '1' then return out end
for i = 1, n do
  local ckey = KEYS[3 + i]
  local amount = ARGV[4 + (i - 1) * 4]
  local window = tonumber(ARGV[5 + (i - 1) * 4])
  local len = math.max(1, math.ceil(window / SLOTS))
  local cur = math.floor(now / len)
  redis.call('HINCRBYFLOAT', ckey, 'r:' .. cur, amount)
  redis.call('HSET', ckey, 'n', window)
  redis.call('EXPIRE', ckey, window + len + grace + 1)
  local id = redis.call('INCR', KEYS[1])
  local rkey = KEYS[2] .. id
  redis.call('HSET', rkey, 'k', ckey, 'w', cur, 'n', window, 'a', amount, 'q', ARGV[6 + (i - 1) * 4])
  redis.call('EXPIRE', rkey, window + 2 * grace)
  redis.call('ZADD', KEYS[3], now, id)
  out[i][4] = id
end
return out
"
    ))
});

/// `KEYS`: counter key. `ARGV`: window seconds (0: the counter's own, field `n`). Returns
/// `{spent, reserved, reset_secs, window}` of the slots a check now counts (`reset_secs` 0:
/// nothing counts).
static STATE: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(&format!(
        r"
local SLOTS = {SLOTS}
local now = tonumber(redis.call('TIME')[1])
local window = tonumber(ARGV[1])
if window == 0 then window = tonumber(redis.call('HGET', KEYS[1], 'n') or '0') or 0 end
if window <= 0 then return {{'0', '0', 0, 0}} end
local len = math.max(1, math.ceil(window / SLOTS))
local first = math.floor(math.max(now - window - 1, 0) / len)
local h = redis.call('HGETALL', KEYS[1])
local spent, reserved, oldest = 0, 0, nil
for i = 1, #h, 2 do
  local f = h[i]
  local v = tonumber(h[i + 1]) or 0
  local idx = tonumber(string.sub(f, 3))
  if idx and idx >= first and v > 0 then
    if string.sub(f, 1, 1) == 's' then spent = spent + v else reserved = reserved + v end
    if oldest == nil or idx < oldest then oldest = idx end
  end
end
local reset = 0
if oldest then reset = math.max((oldest + 1) * len + window + 1 - now, 1) end
return {{tostring(spent), tostring(reserved), reset, window}}
"
    ))
});

/// `KEYS`: reservation key, pending set. `ARGV`: id, mode, actual, grace.
static SETTLE_ONE: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(&format!(
        "local SLOTS = {SLOTS}\n{SETTLE}\nreturn settle(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]))"
    ))
});

/// `KEYS`: pending set, reservation key prefix. `ARGV`: timeout seconds, mode (`commit`, or
/// `expire`: see `settle`), most to settle in one call, grace. Returns how many were settled.
static EXPIRE: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(&format!(
        "local SLOTS = {SLOTS}\n{SETTLE}
local now = tonumber(redis.call('TIME')[1])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[1])), 'LIMIT', 0, tonumber(ARGV[3]))
local n = 0
for _, id in ipairs(ids) do
  n = n + settle(KEYS[2] .. id, KEYS[1], id, ARGV[2], '', tonumber(ARGV[4]))
  redis.call('ZREM', KEYS[1], id)
end
return n"
    ))
});

/// Reservations one expiry call settles at most (bounds the script's run time; the rest wait
/// for the next tick).
const EXPIRE_BATCH: u64 = 1000;

/// Hash tags the counters are spread over (a [`ReservationId`] carries its tag in bits 48..).
pub const TAGS: u64 = 16;

/// Bits of a [`ReservationId`] below its tag: the tag's sequence number.
const SEQ_BITS: u32 = 48;

/// Counters in Redis (see the module docs).
pub struct RedisStore {
    redis: Redis,
    /// How long a reservation may wait for its usage report (the windows and reservations outlive
    /// their end by this much).
    grace_secs: u64,
    /// Per tag: its keys.
    tags: Vec<TagKeys>,
}

/// The keys of one hash tag.
struct TagKeys {
    /// `{c<n>}:`: prefix of the tag's counter keys.
    counters: String,
    seq: String,
    res_prefix: String,
    pending: String,
}

/// The hash tag of a counter key: its namespace's (the part before the first `/`; counter keys
/// are `namespace/rule/...` with `/` escaped inside each part).
pub fn tag_of(counter_key: &str) -> u64 {
    let ns = counter_key.split('/').next().unwrap_or_default();
    xxhash_rust::xxh3::xxh3_64(ns.as_bytes()) % TAGS
}

fn kind_tag(kind: CounterKind) -> char {
    match kind {
        CounterKind::Requests => 'r',
        CounterKind::Tokens => 't',
        CounterKind::Usd => 'u',
    }
}

fn tag_kind(tag: &str) -> Option<CounterKind> {
    match tag {
        "r" => Some(CounterKind::Requests),
        "t" => Some(CounterKind::Tokens),
        "u" => Some(CounterKind::Usd),
        _ => None,
    }
}

/// A number for Lua: finite, never in exponent form.
fn number(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else if x > 0.0 {
        String::from("1e308")
    } else {
        String::from("0")
    }
}

impl RedisStore {
    /// Counters on `redis`; reservations wait at most `reservation_timeout_secs` for a usage
    /// report.
    pub fn new(redis: Redis, reservation_timeout_secs: u64) -> RedisStore {
        // A standalone Redis has one keyspace: the names (and reservation ids) of earlier
        // releases, so an upgrade keeps every counter and reservation.
        let tags = if redis.is_cluster() {
            (0..TAGS)
                .map(|n| {
                    let tag = format!("c{n}");
                    TagKeys {
                        counters: redis.tagged(&tag, "c:"),
                        seq: redis.tagged(&tag, "res-seq"),
                        res_prefix: redis.tagged(&tag, "res:"),
                        pending: redis.tagged(&tag, "res-pending"),
                    }
                })
                .collect()
        } else {
            vec![TagKeys {
                counters: redis.key("c:"),
                seq: redis.key("res-seq"),
                res_prefix: redis.key("res:"),
                pending: redis.key("res-pending"),
            }]
        };
        RedisStore {
            grace_secs: reservation_timeout_secs.max(1),
            tags,
            redis,
        }
    }

    /// The tag of a counter key in this store (0 on a standalone Redis).
    fn tag_index(&self, counter_key: &str) -> u64 {
        if self.tags.len() == 1 {
            0
        } else {
            tag_of(counter_key)
        }
    }

    /// The keys of tag `n`.
    fn tag(&self, n: u64) -> &TagKeys {
        let i = usize::try_from(n).unwrap_or(0) % self.tags.len().max(1);
        &self.tags[i]
    }

    /// The Redis key of a counter.
    fn counter_key(&self, key: &str) -> String {
        format!("{}{key}", self.tag(self.tag_index(key)).counters)
    }

    /// One charge, reserved (`reserve`) or peeked at.
    async fn check(&self, charge: &Charge, reserve: bool) -> Result<Reserved, StoreError> {
        let mut one = self
            .check_all(std::slice::from_ref(charge), reserve)
            .await?;
        one.pop().ok_or(StoreError::Poisoned)
    }

    /// Reserves (`reserve`) or peeks at every charge, all or none.
    async fn check_all(
        &self,
        charges: &[Charge],
        reserve: bool,
    ) -> Result<Vec<Reserved>, StoreError> {
        let Some(first) = charges.first() else {
            return Ok(Vec::new());
        };
        let tag = self.tag_index(&first.key);
        if let Some(c) = charges.iter().find(|c| self.tag_index(&c.key) != tag) {
            // One request's counters are of one namespace; anything else is a bug, and cannot
            // be charged atomically on a Redis Cluster.
            return Err(StoreError::Spread(format!("{} and {}", first.key, c.key)));
        }
        let t = self.tag(tag);
        let keys: Vec<String> = charges.iter().map(|c| self.counter_key(&c.key)).collect();
        let answers: Vec<(i64, String, u64, u64)> = self
            .redis
            .run(Feature::Counters, |mut conn| {
                let keys = &keys;
                async move {
                    let mut call = RESERVE_ALL.prepare_invoke();
                    call.key(&t.seq).key(&t.res_prefix).key(&t.pending);
                    for k in keys {
                        call.key(k);
                    }
                    call.arg(self.grace_secs)
                        .arg(if reserve { "1" } else { "0" });
                    for c in charges {
                        call.arg(number(c.limit))
                            .arg(number(c.amount))
                            .arg(c.window_secs.max(1))
                            .arg(kind_tag(c.kind).to_string());
                    }
                    call.invoke_async(&mut conn).await
                }
            })
            .await
            .map_err(StoreError::from)?;
        charges
            .iter()
            .zip(answers)
            .map(|(c, (fits, remaining, reset, seq))| {
                if seq >> SEQ_BITS != 0 {
                    return Err(StoreError::Redis(RedisError::Failed(format!(
                        "the reservation sequence of tag c{tag} is spent"
                    ))));
                }
                let id = if seq == 0 { 0 } else { tag << SEQ_BITS | seq };
                Ok(Reserved {
                    reservation: (fits == 1).then_some(ReservationId(id)),
                    state: LimitState {
                        limit: c.limit,
                        remaining: remaining.parse().unwrap_or(0.0),
                        reset_secs: reset,
                    },
                })
            })
            .collect()
    }

    async fn settle(
        &self,
        id: ReservationId,
        mode: &'static str,
        actual: f64,
    ) -> Result<(), StoreError> {
        if id.0 == 0 {
            return Ok(());
        }
        let t = self.tag(id.0 >> SEQ_BITS);
        let seq = id.0 & ((1 << SEQ_BITS) - 1);
        let rkey = format!("{}{seq}", t.res_prefix);
        let _: i64 = self
            .redis
            .run(Feature::Counters, |mut conn| async move {
                SETTLE_ONE
                    .key(&rkey)
                    .key(&t.pending)
                    .arg(seq)
                    .arg(mode)
                    .arg(number(actual))
                    .arg(self.grace_secs)
                    .invoke_async(&mut conn)
                    .await
            })
            .await
            .map_err(StoreError::from)?;
        Ok(())
    }

    /// Spent and reserved amounts of a counter's sliding window (tests and diagnostics).
    pub async fn usage(&self, key: &str, window_secs: u64) -> Result<(f64, f64), StoreError> {
        let state = self.state_of(key, window_secs).await?;
        Ok(state.map_or((0.0, 0.0), |s| (s.spent, s.reserved)))
    }

    /// A counter's sliding window (`window_secs`: its length, as its rule says; 0: as the
    /// counter recorded it).
    async fn state_of(
        &self,
        key: &str,
        window_secs: u64,
    ) -> Result<Option<CounterState>, StoreError> {
        let ckey = self.counter_key(key);
        let (spent, reserved, reset, window): (String, String, u64, u64) = self
            .redis
            .run(Feature::Counters, |mut conn| async move {
                STATE
                    .key(&ckey)
                    .arg(window_secs)
                    .invoke_async(&mut conn)
                    .await
            })
            .await
            .map_err(StoreError::from)?;
        let spent: f64 = spent.parse().unwrap_or(0.0);
        let reserved: f64 = reserved.parse().unwrap_or(0.0);
        if reset == 0 {
            return Ok(None);
        }
        Ok(Some(CounterState {
            spent,
            reserved,
            window_secs: window,
            reset_secs: Some(reset),
        }))
    }
}

impl CounterStore for RedisStore {
    fn reserve_all<'a>(
        &'a self,
        charges: &'a [Charge],
        _now: u64,
    ) -> StoreFuture<'a, Result<Vec<Reserved>, StoreError>> {
        Box::pin(self.check_all(charges, true))
    }

    fn peek<'a>(
        &'a self,
        charge: &'a Charge,
        _now: u64,
    ) -> StoreFuture<'a, Result<Reserved, StoreError>> {
        Box::pin(self.check(charge, false))
    }

    fn reserve<'a>(
        &'a self,
        charge: &'a Charge,
        _now: u64,
    ) -> StoreFuture<'a, Result<Reserved, StoreError>> {
        Box::pin(self.check(charge, true))
    }

    fn commit(
        &self,
        id: ReservationId,
        actual: Option<f64>,
    ) -> StoreFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            match actual {
                Some(a) => self.settle(id, "actual", a).await,
                None => self.settle(id, "commit", 0.0).await,
            }
        })
    }

    fn release(&self, id: ReservationId) -> StoreFuture<'_, Result<(), StoreError>> {
        Box::pin(self.settle(id, "release", 0.0))
    }

    fn hold<'a>(
        &'a self,
        handle: &'a str,
        ids: &'a [(ReservationId, CounterKind)],
    ) -> StoreFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let key = self.redis.key(&format!("held:{handle}"));
            let value = ids
                .iter()
                .map(|(id, kind)| format!("{}:{}", id.0, kind_tag(*kind)))
                .collect::<Vec<_>>()
                .join(",");
            let ttl = self.grace_secs;
            let _: () = self
                .redis
                .run(Feature::Usage, |mut conn| async move {
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(&value)
                        .arg("EX")
                        .arg(ttl)
                        .query_async(&mut conn)
                        .await
                })
                .await
                .map_err(StoreError::from)?;
            Ok(true)
        })
    }

    fn held<'a>(&'a self, handle: &'a str) -> StoreFuture<'a, Result<Option<Held>, StoreError>> {
        Box::pin(async move {
            let key = self.redis.key(&format!("held:{handle}"));
            let value: Option<String> = self
                .redis
                .run(Feature::Usage, |mut conn| async move {
                    redis::cmd("GET").arg(&key).query_async(&mut conn).await
                })
                .await
                .map_err(StoreError::from)?;
            Ok(value.map(|v| {
                v.split(',')
                    .filter_map(|item| {
                        let (id, tag) = item.split_once(':')?;
                        Some((ReservationId(id.parse().ok()?), tag_kind(tag)?))
                    })
                    .collect()
            }))
        })
    }

    fn forget<'a>(&'a self, handle: &'a str) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let key = self.redis.key(&format!("held:{handle}"));
            self.redis
                .run(Feature::Usage, |mut conn| async move {
                    redis::cmd("DEL").arg(&key).query_async(&mut conn).await
                })
                .await
                .map_err(StoreError::from)
        })
    }

    fn remote(&self) -> bool {
        true
    }

    fn state<'a>(
        &'a self,
        key: &'a str,
        _now: u64,
    ) -> StoreFuture<'a, Result<Option<CounterState>, StoreError>> {
        Box::pin(self.state_of(key, 0))
    }

    fn expire(&self, _now: u64, timeout_secs: u64, commit: bool) -> StoreFuture<'_, usize> {
        Box::pin(async move {
            let mode = if commit { "commit" } else { "expire" };
            let mut settled = 0;
            for t in &self.tags {
                let n: Result<u64, _> = self
                    .redis
                    .run(Feature::Counters, |mut conn| async move {
                        EXPIRE
                            .key(&t.pending)
                            .key(&t.res_prefix)
                            .arg(timeout_secs)
                            .arg(mode)
                            .arg(EXPIRE_BATCH)
                            .arg(self.grace_secs)
                            .invoke_async(&mut conn)
                            .await
                    })
                    .await;
                settled += n.ok().and_then(|n| usize::try_from(n).ok()).unwrap_or(0);
            }
            settled
        })
    }
}
