//! The benchmark's results: JSON for machines, Markdown (BENCHMARKS.md) for people.

use std::fmt::Write as _;

use serde::Serialize;

use super::edge_verify::EdgeVerifyReport;
use super::exactness::ExactnessReport;
use super::load::LoadResult;
use super::stream::{RevocationLatency, StreamsReport};

#[derive(Debug, Default, Serialize)]
pub struct RunReport {
    pub issue: Option<LoadResult>,
    pub noop: Option<LoadResult>,
    /// noop paced at half of this run's noop throughput.
    pub noop_half_load: Option<LoadResult>,
    pub verify_hit: Option<LoadResult>,
    /// verify-hit paced at half of this run's verify-hit throughput.
    pub verify_hit_half_load: Option<LoadResult>,
    pub verify_naive: Option<LoadResult>,
    pub verify_miss: Option<LoadResult>,
    /// verify-miss paced at half of this run's verify-miss throughput.
    pub verify_miss_half_load: Option<LoadResult>,
    /// verify-hit with a limit no run reaches, counted in memory / in Redis.
    pub verify_ratelimited_memory: Option<LoadResult>,
    pub verify_ratelimited_redis: Option<LoadResult>,
    /// verify-hit on the unlimited server, in turns with each of the two above.
    pub verify_hit_beside_memory: Option<LoadResult>,
    pub verify_hit_beside_redis: Option<LoadResult>,
    /// verify-hit on keys that also count against a team pool and a workspace pool, each
    /// with a limit no run reaches, counted in memory.
    pub verify_pooled: Option<LoadResult>,
    /// verify-hit on keys with their own limit only, on the same server, in turns with
    /// verify-pooled.
    pub verify_own_limit_beside_pooled: Option<LoadResult>,
    pub h2load: Option<H2loadReport>,
    /// `--scenario memory`: RSS per verified key with the default limit on.
    pub memory: Option<MemoryReport>,
    pub revocation_latency: Option<RevocationLatency>,
    pub streams: Option<StreamsReport>,
    /// The edge `Verifier` in process, on cached rate-limited keys, against a hash lookup.
    pub edge_verify: Option<EdgeVerifyReport>,
    pub exactness: Option<ExactnessReport>,
    /// The bare tonic no-op server, each beside Keywarden's own figure in alternating
    /// slices (`bare.rs`).
    pub bare: Option<BareFloor>,
    /// The bare server's no-op through h2load, just before h2load's other figures.
    pub h2load_bare_rps: Option<f64>,
    /// verify-miss and the database's own lookup by hash, in alternating slices.
    pub miss_floor: Option<MissFloor>,
}

/// Server memory per verified key with the deployment's default limit counted (the cache
/// entry, the key's counters, its usage record), over many keys each verified once.
#[derive(Debug, Serialize)]
pub struct MemoryReport {
    /// Keys seeded.
    pub keys: usize,
    /// Keys verified VALID (each once).
    pub verified: u64,
    pub errors: u64,
    pub seconds: f64,
    pub rss_before: Option<u64>,
    pub rss_after: Option<u64>,
    /// RSS growth over the run divided by the keys verified.
    pub bytes_per_verified_key: Option<f64>,
}

/// The database's floor for a cache miss: the statement a miss issues, by a plain sqlx
/// loop through a pool of the server's size, taken in turns with verify-miss.
#[derive(Debug, Serialize)]
pub struct MissFloor {
    pub verify_miss: LoadResult,
    pub database: LoadResult,
}

/// The transport's floor, each figure taken in turns with the one it is read against.
#[derive(Debug, Serialize)]
pub struct BareFloor {
    pub bare_beside_noop: LoadResult,
    /// Keywarden's Ping.
    pub noop: LoadResult,
    pub bare_beside_hit: LoadResult,
    pub verify_hit: LoadResult,
}

#[derive(Debug, Default, Serialize)]
pub struct H2loadReport {
    pub noop_rps: f64,
    pub verify_hit_rps: f64,
    /// VerifyKey on the cache-off server, same key (the naive design's figure).
    pub verify_naive_rps: Option<f64>,
    /// verify-json: the same VerifyKey by the Connect protocol in JSON, right after
    /// verify-hit.
    pub verify_json_rps: Option<f64>,
    /// The exact command lines (caller token elided).
    pub commands: Vec<String>,
}

impl RunReport {
    pub fn hit_over_noop(&self) -> Option<f64> {
        Some(self.verify_hit.as_ref()?.throughput / self.noop.as_ref()?.throughput)
    }

    pub fn hit_over_naive(&self) -> Option<f64> {
        Some(self.verify_hit.as_ref()?.throughput / self.verify_naive.as_ref()?.throughput)
    }
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub machine: String,
    pub command: String,
    pub store: String,
    pub concurrency: usize,
    pub connections: usize,
    pub duration_secs: f64,
    pub keys: usize,
    pub miss_keys: usize,
    /// The already running server driven with `--target`, if any.
    pub target: Option<String>,
    pub runs: Vec<RunReport>,
}

/// What the figures mean, what changed them and what falls short: kept by hand in
/// `src/bench/notes.md` and part of every generated report.
const NOTES: &str = include_str!("notes.md");

/// Picks one scenario's result out of a run.
type Pick = fn(&RunReport) -> Option<&LoadResult>;

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

impl BenchReport {
    fn med(&self, f: impl Fn(&RunReport) -> Option<f64>) -> Option<f64> {
        median(self.runs.iter().filter_map(f).collect())
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let fmt =
            |v: Option<f64>, digits: usize| v.map_or("n/a".to_owned(), |v| format!("{v:.digits$}"));
        let _ = writeln!(s, "# Benchmarks\n");
        let _ = writeln!(
            s,
            "Generated by `{}`. Medians of {} run(s); every ratio is taken within one run \
             (same server, same client, same minute) and then the median of those ratios is shown.\n",
            self.command,
            self.runs.len()
        );
        let _ = writeln!(s, "- Machine: {}", self.machine);
        match &self.target {
            Some(target) => {
                let _ = writeln!(
                    s,
                    "- Server: an already running keywarden at `{target}` (`--target`), on its own configuration and store; the machine above is the client's. {} concurrent callers over {} HTTP/2 connection(s); {:.0} s per scenario; {} hit keys. Only the hit-path scenarios ran.\n",
                    self.concurrency, self.connections, self.duration_secs, self.keys
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "- Store: {}; {} concurrent callers over {} HTTP/2 connection(s); {:.0} s per scenario; {} hit keys; {} keys seeded for the miss run.",
                    self.store,
                    self.concurrency,
                    self.connections,
                    self.duration_secs,
                    self.keys,
                    self.miss_keys
                );
                let _ = writeln!(
                    s,
                    "- Client and server share the machine's cores (loopback): absolute figures are this box's, the ratios are what carries over.\n"
                );
            }
        }
        let _ = writeln!(s, "## Targets\n");
        let _ = writeln!(
            s,
            "Every target is a ratio against the floor of the same work, taken in one run. \
             Figures this 2-core machine cannot judge are reported without a target: absolute \
             p99 (the no-op alone has a tail of milliseconds here) and cached / naive (the \
             transport caps it near 9 here, so the old target of 20 is retired).\n"
        );
        let _ = writeln!(s, "| ratio / figure | target | measured (median) |");
        let _ = writeln!(s, "| --- | --- | --- |");
        let _ = writeln!(
            s,
            "| verify-hit / noop throughput | | {} |",
            fmt(self.med(RunReport::hit_over_noop), 3)
        );
        let _ = writeln!(
            s,
            "| verify-hit / verify-naive throughput | | {} |",
            fmt(self.med(RunReport::hit_over_naive), 1)
        );
        let _ = writeln!(
            s,
            "| verify-hit p99 at half of peak / noop p99 paced the same way | <= 1.1 | {} |",
            fmt(
                self.med(|r| Some(
                    r.verify_hit_half_load.as_ref()?.p99_us as f64
                        / (r.noop_half_load.as_ref()?.p99_us as f64).max(1.0)
                )),
                2
            )
        );
        let _ = writeln!(
            s,
            "| verify-hit p99 at half of peak load | | {} µs |",
            fmt(
                self.med(|r| r.verify_hit_half_load.as_ref().map(|l| l.p99_us as f64)),
                0
            )
        );
        let _ = writeln!(
            s,
            "| noop p99 at half of its peak (the same pacing, no VerifyKey) | | {} µs |",
            fmt(
                self.med(|r| r.noop_half_load.as_ref().map(|l| l.p99_us as f64)),
                0
            )
        );
        let _ = writeln!(
            s,
            "| a bare thread's wake-up lateness p99 during verify-hit at half load (the pacer's: the machine's scheduling alone) | | {} µs |",
            fmt(
                self.med(|r| r
                    .verify_hit_half_load
                    .as_ref()
                    .and_then(|l| l.pacer_wake_p99_us.map(|p| p as f64))),
                0
            )
        );
        let _ = writeln!(
            s,
            "| verify-miss p99 at half of its peak ({} keys in Postgres) | | {} µs |",
            self.miss_keys,
            fmt(
                self.med(|r| r.verify_miss_half_load.as_ref().map(|l| l.p99_us as f64)),
                0
            )
        );
        let _ = writeln!(
            s,
            "| h2load verify-hit / noop (independent client) | | {} |",
            fmt(
                self.med(|r| r.h2load.as_ref().map(|h| h.verify_hit_rps / h.noop_rps)),
                3
            )
        );
        let _ = writeln!(
            s,
            "| h2load verify-json (Connect, JSON) / verify-hit (gRPC), same server, one after the other | | {} |",
            fmt(
                self.med(|r| r
                    .h2load
                    .as_ref()
                    .and_then(|h| Some(h.verify_json_rps? / h.verify_hit_rps))),
                3
            )
        );
        let _ = writeln!(
            s,
            "| h2load verify-hit / verify-naive (independent client) | | {} |",
            fmt(
                self.med(|r| r
                    .h2load
                    .as_ref()
                    .and_then(|h| Some(h.verify_hit_rps / h.verify_naive_rps?))),
                1
            )
        );
        let _ = writeln!(
            s,
            "| verify-ratelimited (in memory) / verify-hit throughput (taken in turns) | | {} |",
            fmt(
                self.med(|r| Some(
                    r.verify_ratelimited_memory.as_ref()?.throughput
                        / r.verify_hit_beside_memory
                            .as_ref()
                            .or(r.verify_hit.as_ref())?
                            .throughput
                )),
                3
            )
        );
        let _ = writeln!(
            s,
            "| verify-ratelimited (Redis) / verify-hit throughput (taken in turns) | >= 0.85 | {} |",
            fmt(
                self.med(|r| Some(
                    r.verify_ratelimited_redis.as_ref()?.throughput
                        / r.verify_hit_beside_redis
                            .as_ref()
                            .or(r.verify_hit.as_ref())?
                            .throughput
                )),
                3
            )
        );
        let _ = writeln!(
            s,
            "| verify-pooled (key, team and workspace pools, in memory) / keys with their own limit only (same server, taken in turns) | >= 0.90 | {} |",
            fmt(
                self.med(|r| Some(
                    r.verify_pooled.as_ref()?.throughput
                        / r.verify_own_limit_beside_pooled.as_ref()?.throughput
                )),
                3
            )
        );
        let _ = writeln!(
            s,
            "| edge-verify calls without a round trip, after warm-up (edge `Verifier` in process, rate-limited keys) | >= 0.99 | {} |",
            fmt(
                self.med(|r| r.edge_verify.as_ref().map(|e| e.without_round_trip)),
                4
            )
        );
        let _ = writeln!(
            s,
            "| edge-verify / hash lookup (SHA-256 and a `HashMap` get) calls per second, same callers | >= 0.5 | {} |",
            fmt(
                self.med(|r| r.edge_verify.as_ref().map(|e| e.over_hash_lookup)),
                3
            )
        );
        let _ = writeln!(
            s,
            "| verify-hit / bare tonic no-op throughput (taken in turns) | >= 0.90 | {} |",
            fmt(
                self.med(|r| r
                    .bare
                    .as_ref()
                    .map(|b| b.verify_hit.throughput / b.bare_beside_hit.throughput)),
                3
            )
        );
        let _ = writeln!(
            s,
            "| Ping / bare tonic no-op throughput (taken in turns) | >= 0.97 | {} |",
            fmt(
                self.med(|r| r
                    .bare
                    .as_ref()
                    .map(|b| b.noop.throughput / b.bare_beside_noop.throughput)),
                3
            )
        );
        let _ = writeln!(
            s,
            "| h2load verify-hit / bare tonic no-op (independent client) | >= 0.90 | {} |",
            fmt(
                self.med(|r| Some(r.h2load.as_ref()?.verify_hit_rps / r.h2load_bare_rps?)),
                3
            )
        );
        let _ = writeln!(
            s,
            "| h2load Ping / bare tonic no-op (independent client) | >= 0.97 | {} |",
            fmt(
                self.med(|r| Some(r.h2load.as_ref()?.noop_rps / r.h2load_bare_rps?)),
                3
            )
        );
        let _ = writeln!(
            s,
            "| verify-miss / the database's own lookup by hash (same statement, same pool size, taken in turns) | >= 0.70 | {} |",
            fmt(
                self.med(|r| r
                    .miss_floor
                    .as_ref()
                    .map(|m| m.verify_miss.throughput / m.database.throughput)),
                3
            )
        );
        let _ = writeln!(
            s,
            "| exactness: most calls admitted in a window / the limit, 2 replicas (Redis) and 2 edges, every holder far above the limit | <= 1.00 | {} |",
            fmt(self.med(|r| r.exactness.as_ref().map(|e| e.max_ratio)), 3)
        );
        let _ = writeln!(
            s,
            "| exactness: least calls admitted in a window / the limit, the same saturation | >= 0.90 | {} |",
            fmt(self.med(|r| r.exactness.as_ref().map(|e| e.min_ratio)), 3)
        );
        let memory_keys = self
            .runs
            .iter()
            .find_map(|r| r.memory.as_ref().map(|m| m.verified));
        let _ = writeln!(
            s,
            "| server memory per verified key, default limit (100/min) on: RSS growth over {} keys verified once each (`--scenario memory`, the last run) | <= 512 bytes | {} bytes |\n",
            memory_keys.map_or("n/a".to_owned(), |n| n.to_string()),
            fmt(
                self.med(|r| r.memory.as_ref().and_then(|m| m.bytes_per_verified_key)),
                0
            )
        );
        let _ = writeln!(s, "## Scenarios (medians)\n");
        let _ = writeln!(
            s,
            "Cores busy: CPU time over the run's time, of the server process and of the client (this benchmark) apart; server CPU per call is the server's CPU time divided by its calls.\n"
        );
        let _ = writeln!(
            s,
            "| scenario | req/s | p50 µs | p90 µs | p99 µs | p99.9 µs | errors | server cores busy | server CPU µs per call | client cores busy |"
        );
        let _ = writeln!(
            s,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        let rows: [(&str, Pick); 11] = [
            ("noop (Ping)", |r| r.noop.as_ref()),
            ("noop at half load", |r| r.noop_half_load.as_ref()),
            ("verify-hit", |r| r.verify_hit.as_ref()),
            ("verify-hit at half load", |r| {
                r.verify_hit_half_load.as_ref()
            }),
            ("verify-naive (cache off)", |r| r.verify_naive.as_ref()),
            ("verify-miss", |r| r.verify_miss.as_ref()),
            ("verify-miss at half load", |r| {
                r.verify_miss_half_load.as_ref()
            }),
            ("verify-ratelimited (in memory)", |r| {
                r.verify_ratelimited_memory.as_ref()
            }),
            ("verify-ratelimited (Redis)", |r| {
                r.verify_ratelimited_redis.as_ref()
            }),
            (
                "verify-pooled (key, team and workspace pools, in memory)",
                |r| r.verify_pooled.as_ref(),
            ),
            ("issue (IssueKey)", |r| r.issue.as_ref()),
        ];
        for (name, get) in rows {
            if self.runs.iter().all(|r| get(r).is_none()) {
                continue;
            }
            let m = |f: fn(&LoadResult) -> f64| fmt(self.med(|r| get(r).map(f)), 0);
            let cpu = |f: fn(&LoadResult) -> Option<f64>, digits| {
                fmt(self.med(|r| get(r).and_then(f)), digits)
            };
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                m(|l| l.throughput),
                m(|l| l.p50_us as f64),
                m(|l| l.p90_us as f64),
                m(|l| l.p99_us as f64),
                m(|l| l.p999_us as f64),
                m(|l| l.errors as f64),
                cpu(|l| l.server_cores, 2),
                cpu(
                    |l| Some(l.server_cores? * 1e6 / l.throughput).filter(|v| v.is_finite()),
                    1
                ),
                cpu(|l| l.client_cores, 2),
            );
        }
        let spread = |get: fn(&RunReport) -> Option<&super::stream::Spread>| {
            (
                fmt(self.med(|r| get(r).map(|s| s.p50_us as f64)), 0),
                fmt(self.med(|r| get(r).map(|s| s.p99_us as f64)), 0),
                fmt(self.med(|r| get(r).map(|s| s.max_us as f64)), 0),
                fmt(self.med(|r| get(r).map(|s| s.samples as f64)), 0),
            )
        };
        if self.runs.iter().any(|r| r.revocation_latency.is_some()) {
            let _ = writeln!(s, "\n## Revocation stream (medians)\n");
            let _ = writeln!(
                s,
                "From RevokeKey's reply to the event at a WatchRevocations subscriber; keys revoked one after another.\n"
            );
            let _ = writeln!(
                s,
                "| subscriber | target p99 | p50 µs | p99 µs | max µs | events |"
            );
            let _ = writeln!(s, "| --- | --- | ---: | ---: | ---: | ---: |");
            let (p50, p99, max, n) =
                spread(|r| r.revocation_latency.as_ref()?.same_replica.as_ref());
            let _ = writeln!(
                s,
                "| same replica | < 10 000 µs | {p50} | {p99} | {max} | {n} |"
            );
            let (p50, p99, max, n) =
                spread(|r| r.revocation_latency.as_ref()?.other_replica.as_ref());
            let _ = writeln!(
                s,
                "| other replica (Postgres NOTIFY) | < 100 000 µs | {p50} | {p99} | {max} | {n} |"
            );
            let _ = writeln!(
                s,
                "\nEvents missed (not within 10 s): {}.",
                fmt(
                    self.med(|r| r.revocation_latency.as_ref().map(|l| l.missed as f64)),
                    0
                )
            );
        }
        if self.runs.iter().any(|r| r.streams.is_some()) {
            let _ = writeln!(s, "\n## Concurrent streams on one replica (medians)\n");
            let _ = writeln!(
                s,
                "| streams asked | opened | seconds to open | server bytes per stream | one revocation to every stream p50 µs | p99 µs | max µs | missed |"
            );
            let _ = writeln!(
                s,
                "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
            );
            let (p50, p99, max, _) = spread(|r| r.streams.as_ref()?.fanout.as_ref());
            let m = |f: fn(&StreamsReport) -> Option<f64>, d: usize| {
                fmt(self.med(|r| r.streams.as_ref().and_then(f)), d)
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {p50} | {p99} | {max} | {} |",
                m(|r| Some(r.requested as f64), 0),
                m(|r| Some(r.opened as f64), 0),
                m(|r| Some(r.open_seconds), 1),
                m(|r| r.bytes_per_stream, 0),
                m(|r| Some(r.missed as f64), 0),
            );
        }
        if self.runs.iter().any(|r| r.edge_verify.is_some()) {
            let _ = writeln!(s, "\n## Edge verifier in process (medians)\n");
            let _ = writeln!(
                s,
                "The edge `Verifier` in the benchmark's process, in front of a server whose keys have a limit no run reaches (so each VALID answer is served from a quota lease), after a warm-up that holds every key's lease; alternate slices of the same callers do a SHA-256 of the key and a `HashMap` get. Only calls are counted (no per-call timing). Round trips: the VerifyKey and LeaseQuota calls the edge made during the measured calls.\n"
            );
            let _ = writeln!(
                s,
                "| edge calls/s | hash lookup calls/s | edge calls | VerifyKey calls | LeaseQuota calls | errors |"
            );
            let _ = writeln!(s, "| ---: | ---: | ---: | ---: | ---: | ---: |");
            let m = |f: fn(&EdgeVerifyReport) -> f64| {
                fmt(self.med(|r| r.edge_verify.as_ref().map(f)), 0)
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                m(|e| e.throughput),
                m(|e| e.hash_lookup_throughput),
                m(|e| e.calls as f64),
                m(|e| e.server_calls as f64),
                m(|e| e.lease_calls as f64),
                m(|e| e.errors as f64),
            );
        }
        if let Some(h) = self.runs.iter().find_map(|r| r.h2load.as_ref()) {
            let _ = writeln!(s, "\n## Independent check (h2load)\n");
            let _ = writeln!(
                s,
                "h2load (Debian's `nghttp2-client`) sends pre-encoded gRPC frames (`ping.bin`: an empty `PingRequest`; `verify.bin`: a `VerifyKeyRequest` with a cached key, each behind gRPC's 5-byte length prefix), and for verify-json the same request by the Connect protocol (`verify.json`: `{{\"key\": ...}}` as `application/json`). A run counts only if every answer carried a message (a gRPC error is HTTP 200 with no DATA). The commands:\n"
            );
            let _ = writeln!(s, "```sh");
            for c in &h.commands {
                let _ = writeln!(s, "{c}");
            }
            let _ = writeln!(s, "```");
        }
        let _ = writeln!(s, "\n{}", NOTES.trim_end());
        let _ = writeln!(s, "\n## Per run\n");
        let _ = writeln!(
            s,
            "| run | noop req/s | verify-hit req/s | hit/noop | naive req/s | hit/naive | noop half-load p99 µs | hit half-load p99 µs | miss half-load p99 µs |"
        );
        let _ = writeln!(
            s,
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for (i, r) in self.runs.iter().enumerate() {
            let t = |l: &Option<LoadResult>| fmt(l.as_ref().map(|l| l.throughput), 0);
            let p = |l: &Option<LoadResult>| fmt(l.as_ref().map(|l| l.p99_us as f64), 0);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                i + 1,
                t(&r.noop),
                t(&r.verify_hit),
                fmt(r.hit_over_noop(), 3),
                t(&r.verify_naive),
                fmt(r.hit_over_naive(), 1),
                p(&r.noop_half_load),
                p(&r.verify_hit_half_load),
                p(&r.verify_miss_half_load),
            );
        }
        s
    }
}
