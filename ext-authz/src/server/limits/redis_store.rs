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
use crate::server::redis::{Feature, Redis, RedisError};

/// Settles one reservation: `settle(rkey, pending, id, mode, actual, grace)`, mode `release`,
/// `commit` (the reserved amount is spent) or `actual` (this amount is spent instead). Usage
/// reported after the window turned is spent in the current window.
const SETTLE: &str = r"
local function settle(rkey, pending, id, mode, actual, grace)
  local r = redis.call('HMGET', rkey, 'k', 'w', 'n', 'a')
  if not r[1] then return 0 end
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
/// window seconds, `1` to reserve (else a peek), grace seconds. Returns `{fits, remaining,
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
redis.call('HSET', rkey, 'k', KEYS[1], 'w', start, 'n', window, 'a', ARGV[2])
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

/// `KEYS`: pending set, reservation key prefix. `ARGV`: timeout seconds, mode (`commit` /
/// `release`), most to settle in one call, grace. Returns how many were settled.
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

fn store_error(e: RedisError) -> StoreError {
    StoreError(e.to_string())
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
                    .invoke_async(&mut conn)
                    .await
            })
            .await
            .map_err(store_error)?;
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
            .map_err(store_error)?;
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
            .map_err(store_error)?;
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
                .map_err(store_error)?;
            Ok(true)
        })
    }

    fn take<'a>(&'a self, handle: &'a str) -> StoreFuture<'a, Result<Option<Held>, StoreError>> {
        Box::pin(async move {
            let key = self.redis.key(&format!("held:{handle}"));
            let value: Option<String> = self
                .redis
                .run(Feature::Usage, |mut conn| async move {
                    redis::cmd("GETDEL").arg(&key).query_async(&mut conn).await
                })
                .await
                .map_err(store_error)?;
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

    fn expire(&self, _now: u64, timeout_secs: u64, commit: bool) -> StoreFuture<'_, usize> {
        Box::pin(async move {
            let mode = if commit { "commit" } else { "release" };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::metrics::Metrics;
    use crate::server::redis::testing::RedisServer;
    use crate::server::redis::RedisConfig;
    use llm_policy_core::decision::ChargeSource;
    use llm_policy_core::model::Scope;
    use std::sync::Arc;

    fn charge(key: &str, amount: f64, limit: f64) -> Charge {
        Charge {
            rule: "r".into(),
            source: ChargeSource::Budget,
            key: key.into(),
            kind: CounterKind::Tokens,
            limit,
            window_secs: 3600,
            amount,
            scope: Scope::Global,
        }
    }

    fn store(server: &RedisServer, timeout_ms: u64) -> (RedisStore, Metrics) {
        let metrics = Metrics::new().unwrap();
        let config = RedisConfig {
            url: Some(server.url()),
            timeout_ms,
            backoff_ms: 100,
            ..RedisConfig::default()
        };
        let redis = Redis::connect(&config, metrics.clone()).unwrap().unwrap();
        (RedisStore::new(redis, 300), metrics)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn three_replicas_never_overshoot_a_shared_budget() {
        let server = RedisServer::start();
        // Three stores, three connections: what three server processes would hold.
        let replicas: Vec<Arc<RedisStore>> =
            (0..3).map(|_| Arc::new(store(&server, 1000).0)).collect();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let s = Arc::clone(&replicas[i % 3]);
            tasks.push(tokio::spawn(async move {
                s.reserve(&charge("t/budget", 7.0, 1000.0), 0)
                    .await
                    .unwrap()
                    .reservation
            }));
        }
        let mut granted = Vec::new();
        for t in tasks {
            if let Some(id) = t.await.unwrap() {
                granted.push(id);
            }
        }
        // 142 × 7 = 994 ≤ 1000 < 143 × 7.
        assert_eq!(granted.len(), 142);
        let ids: std::collections::HashSet<_> = granted.iter().collect();
        assert_eq!(ids.len(), 142, "reservation ids are unique across replicas");
        assert_eq!(
            replicas[0].usage("t/budget", 3600).await.unwrap(),
            (0.0, 994.0)
        );
        // Settled on other replicas than the one that reserved.
        for (i, id) in granted.iter().enumerate() {
            let s = &replicas[(i + 1) % 3];
            if i % 2 == 0 {
                s.commit(*id, Some(1.0)).await.unwrap();
            } else {
                s.release(*id).await.unwrap();
            }
        }
        assert_eq!(
            replicas[2].usage("t/budget", 3600).await.unwrap(),
            (71.0, 0.0)
        );
        // Settling twice changes nothing.
        replicas[1].commit(granted[0], Some(500.0)).await.unwrap();
        assert_eq!(replicas[1].usage("t/budget", 3600).await.unwrap().0, 71.0);
    }

    #[tokio::test]
    async fn a_request_limit_allows_exactly_n_and_peeks_reserve_nothing() {
        let server = RedisServer::start();
        let (s, _) = store(&server, 1000);
        let mut c = charge("t/rpm", 1.0, 5.0);
        c.kind = CounterKind::Requests;
        c.window_secs = 60;
        let p = s.peek(&c, 0).await.unwrap();
        assert!(p.reservation.is_some());
        assert_eq!(p.state.remaining, 4.0);
        let mut allowed = 0;
        for _ in 0..8 {
            if let Some(id) = s.reserve(&c, 0).await.unwrap().reservation {
                s.commit(id, None).await.unwrap();
                allowed += 1;
            }
        }
        assert_eq!(allowed, 5);
        let over = s.reserve(&c, 0).await.unwrap();
        assert!(over.reservation.is_none());
        assert_eq!(over.state.remaining, 0.0);
        assert!(over.state.reset_secs <= 60 && over.state.reset_secs >= 1);
    }

    #[tokio::test]
    async fn usage_handles_are_taken_once_and_expiry_settles() {
        let server = RedisServer::start();
        let (a, _) = store(&server, 1000);
        let (b, _) = store(&server, 1000);
        let r = a.reserve(&charge("t/u", 100.0, 1000.0), 0).await.unwrap();
        let id = r.reservation.unwrap();
        assert!(a.hold("h1", &[(id, CounterKind::Tokens)]).await.unwrap());
        // Another replica takes it; a second take finds nothing.
        assert_eq!(
            b.take("h1").await.unwrap(),
            Some(vec![(id, CounterKind::Tokens)])
        );
        assert_eq!(b.take("h1").await.unwrap(), None);
        // Reservations older than the timeout are settled by whichever replica expires first.
        let r2 = a.reserve(&charge("t/u", 50.0, 1000.0), 0).await.unwrap();
        assert!(r2.reservation.is_some());
        assert_eq!(b.expire(0, 3600, true).await, 0, "not old yet");
        // A timeout of 0 s: everything made before this second.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        assert_eq!(b.expire(0, 0, true).await, 2);
        assert_eq!(a.usage("t/u", 3600).await.unwrap(), (150.0, 0.0));
    }

    #[tokio::test]
    async fn redis_down_fails_fast_and_recovers_by_itself() {
        let mut server = RedisServer::start();
        let (s, metrics) = store(&server, 50);
        assert!(s.reserve(&charge("t/d", 1.0, 10.0), 0).await.is_ok());
        server.kill();
        let started = std::time::Instant::now();
        for _ in 0..20 {
            assert!(s.reserve(&charge("t/d", 1.0, 10.0), 0).await.is_err());
        }
        // Each call is bounded by the deadline; after the first, calls fail at once.
        assert!(
            started.elapsed() < std::time::Duration::from_millis(1000),
            "{:?}",
            started.elapsed()
        );
        let errors: u64 = ["timeout", "unavailable", "error"]
            .iter()
            .map(|k| {
                metrics
                    .redis_errors
                    .with_label_values(&["counters", k])
                    .get()
            })
            .sum();
        assert_eq!(errors, 20);
        server.restart();
        let back = async {
            loop {
                if s.reserve(&charge("t/d", 1.0, 10.0), 0).await.is_ok() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), back)
            .await
            .expect("the store works again once Redis is back");
    }
}
