//! Counters in Redis, shared by every replica: each check-and-reserve, commit and release is one
//! Lua script, so it is atomic across replicas (no check-then-increment race), and windows follow
//! Redis's clock (`TIME`), so replicas with skewed clocks still agree on them.
//!
//! Keys (after the configured prefix):
//! - `c:{counter key}@{window start}`: hash `s` (spent), `r` (reserved); expires when its window
//!   has ended and no reservation can still refer to it.
//! - `res:{id}`: one reservation (counter key, window start, window length, amount); ids come from
//!   `res-seq`, so any replica can settle any reservation.
//! - `res-pending`: sorted set of reservation ids by the time they were made, for expiry.
//! - `held:{handle}`: the reservations an allowed request's usage report settles.

use std::sync::LazyLock;

use llm_policy_core::decision::{Charge, CounterKind};
use llm_policy_core::reply::LimitState;
use redis::Script;

use super::{CounterStore, Held, ReservationId, Reserved, StoreError, StoreFuture};
use crate::server::redis::{Feature, Redis};

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
  local wkey = r[1] .. '@' .. r[2]
  if redis.call('EXISTS', wkey) == 1 then
    local left = tonumber(redis.call('HINCRBYFLOAT', wkey, 'r', -tonumber(r[4])))
    if left < 0 then redis.call('HSET', wkey, 'r', '0') end
  end
  local spend = nil
  if mode == 'commit' then spend = tonumber(r[4]) elseif mode == 'actual' then spend = tonumber(actual) end
  if spend and spend > 0 then
    local now = tonumber(redis.call('TIME')[1])
    local window = tonumber(r[3])
    local start = now - (now % window)
    local ckey = r[1] .. '@' .. start
    redis.call('HINCRBYFLOAT', ckey, 's', spend)
    redis.call('EXPIRE', ckey, window + grace)
  end
  return 1
end
";

/// `KEYS`: counter key, id sequence, reservation key prefix, pending set. `ARGV`: limit, amount,
/// window seconds, `1` to reserve (else a peek), grace seconds, kind (`r`, `t`, `u`). Returns `{fits, remaining,
/// reset_secs, id}` (remaining as a string: Lua numbers become integers on the way out).
static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local now = tonumber(redis.call('TIME')[1])
local window = tonumber(ARGV[3])
local start = now - (now % window)
local wkey = KEYS[1] .. '@' .. start
local v = redis.call('HMGET', wkey, 's', 'r')
local used = (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0)
local limit = tonumber(ARGV[1])
local amount = tonumber(ARGV[2])
local fits
if amount > 0 then fits = used + amount <= limit else fits = used < limit end
local reset = start + window - now
if not fits then
  return {0, tostring(math.max(limit - used, 0)), reset, 0}
end
if ARGV[4] ~= '1' then
  return {1, tostring(math.max(limit - used - amount, 0)), reset, 0}
end
local grace = tonumber(ARGV[5])
redis.call('HINCRBYFLOAT', wkey, 'r', amount)
redis.call('EXPIRE', wkey, window + grace)
local id = redis.call('INCR', KEYS[2])
local rkey = KEYS[3] .. id
redis.call('HSET', rkey, 'k', KEYS[1], 'w', start, 'n', window, 'a', ARGV[2], 'q', ARGV[6])
redis.call('EXPIRE', rkey, window + 2 * grace)
redis.call('ZADD', KEYS[4], now, id)
return {1, tostring(math.max(limit - used - amount, 0)), reset, id}
",
    )
});

/// `KEYS`: reservation key, pending set. `ARGV`: id, mode, actual, grace.
static SETTLE_ONE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{SETTLE}\nreturn settle(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]))"
    ))
});

/// `KEYS`: pending set, reservation key prefix. `ARGV`: timeout seconds, mode (`commit`, or
/// `expire`: see `settle`), most to settle in one call, grace. Returns how many were settled.
static EXPIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{SETTLE}
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

/// Counters in Redis (see the module docs).
pub struct RedisStore {
    redis: Redis,
    /// How long a reservation may wait for its usage report (the windows and reservations outlive
    /// their end by this much).
    grace_secs: u64,
    seq: String,
    res_prefix: String,
    pending: String,
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
        RedisStore {
            seq: redis.key("res-seq"),
            res_prefix: redis.key("res:"),
            pending: redis.key("res-pending"),
            grace_secs: reservation_timeout_secs.max(1),
            redis,
        }
    }

    async fn check(&self, charge: &Charge, reserve: bool) -> Result<Reserved, StoreError> {
        let key = self.redis.key(&format!("c:{}", charge.key));
        let args = (
            number(charge.limit),
            number(charge.amount),
            charge.window_secs.max(1),
            if reserve { "1" } else { "0" },
            self.grace_secs,
        );
        let (fits, remaining, reset, id): (i64, String, u64, u64) = self
            .redis
            .run(Feature::Counters, |mut conn| async move {
                RESERVE
                    .key(&key)
                    .key(&self.seq)
                    .key(&self.res_prefix)
                    .key(&self.pending)
                    .arg(args.0)
                    .arg(args.1)
                    .arg(args.2)
                    .arg(args.3)
                    .arg(args.4)
                    .arg(kind_tag(charge.kind).to_string())
                    .invoke_async(&mut conn)
                    .await
            })
            .await
            .map_err(StoreError::from)?;
        let state = LimitState {
            limit: charge.limit,
            remaining: remaining.parse().unwrap_or(0.0),
            reset_secs: reset,
        };
        Ok(Reserved {
            reservation: (fits == 1).then_some(ReservationId(id)),
            state,
        })
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
        let rkey = format!("{}{}", self.res_prefix, id.0);
        let _: i64 = self
            .redis
            .run(Feature::Counters, |mut conn| async move {
                SETTLE_ONE
                    .key(&rkey)
                    .key(&self.pending)
                    .arg(id.0)
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

    /// Spent and reserved amounts of a counter's current window (tests and diagnostics).
    pub async fn usage(&self, key: &str, window_secs: u64) -> Result<(f64, f64), StoreError> {
        let base = self.redis.key(&format!("c:{key}"));
        let (s, r): (Option<String>, Option<String>) = self
            .redis
            .run(Feature::Counters, |mut conn| async move {
                let (now, _): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
                let w = window_secs.max(1);
                let wkey = format!("{base}@{}", now - now % w);
                redis::cmd("HMGET")
                    .arg(wkey)
                    .arg("s")
                    .arg("r")
                    .query_async(&mut conn)
                    .await
            })
            .await
            .map_err(StoreError::from)?;
        let f = |v: Option<String>| v.and_then(|v| v.parse().ok()).unwrap_or(0.0);
        Ok((f(s), f(r)))
    }
}

impl CounterStore for RedisStore {
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

    fn expire(&self, _now: u64, timeout_secs: u64, commit: bool) -> StoreFuture<'_, usize> {
        Box::pin(async move {
            let mode = if commit { "commit" } else { "expire" };
            let n: Result<u64, _> = self
                .redis
                .run(Feature::Counters, |mut conn| async move {
                    EXPIRE
                        .key(&self.pending)
                        .key(&self.res_prefix)
                        .arg(timeout_secs)
                        .arg(mode)
                        .arg(EXPIRE_BATCH)
                        .arg(self.grace_secs)
                        .invoke_async(&mut conn)
                        .await
                })
                .await;
            n.ok().and_then(|n| usize::try_from(n).ok()).unwrap_or(0)
        })
    }
}
