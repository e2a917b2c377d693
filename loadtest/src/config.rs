//! The test plan: which scenarios run, with what sizes and rates. Read from
//! a TOML file or built from command-line flags; echoed into every report so
//! a number always comes with the load that produced it.
//!
//! Every field has a default, so a TOML file names only what it changes:
//!
//! ```toml
//! target = "http://127.0.0.1:8008"
//! scenarios = ["register", "rooms", "send", "sync"]
//! [users]
//! count = 200
//! [rooms]
//! count = 20
//! size = 10
//! large_room_size = 150
//! [load]
//! duration_s = 30
//! warmup_s = 5
//! [send]
//! rate_per_s = 100
//! ```
//!
//! Rates, limits and concurrency are totals over the whole generator,
//! whatever `threads` says; `split.rs` divides them.

use crate::schedule::{RateStep, Schedule};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A scenario name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Register users (and log them in).
    Register,
    /// Create rooms and join users to them.
    Rooms,
    /// Send messages at a rate.
    Send,
    /// Long-poll `/sync` for every user; send→delivery latency.
    Sync,
    /// A chat-like mix of requests.
    Mixed,
    /// TURN allocations and relayed packets.
    Turn,
}

impl std::str::FromStr for Scenario {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.trim() {
            "register" => Scenario::Register,
            "rooms" => Scenario::Rooms,
            "send" => Scenario::Send,
            "sync" => Scenario::Sync,
            "mixed" => Scenario::Mixed,
            "turn" => Scenario::Turn,
            other => {
                return Err(format!(
                    "unknown scenario {other:?} (register, rooms, send, sync, mixed, turn)"
                ));
            }
        })
    }
}

/// Open loop (fixed arrival rate) or closed loop (fixed concurrency).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Arrivals at the scheduled rate whatever the responses do.
    #[default]
    Open,
    /// `concurrency` workers, each issuing its next request when the
    /// previous one completes: for maximum-throughput runs.
    Closed,
}

/// The whole plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Plan {
    /// Base URL of the homeserver, `http://host:port`.
    pub target: String,
    /// Allow a target that is not a loopback address.
    pub allow_remote: bool,
    /// Scenarios to run; phases they need (users, rooms) run implicitly.
    pub scenarios: Vec<Scenario>,
    /// Seed of the generator's random choices (rooms, senders, actions).
    pub seed: u64,
    /// Generator threads, each with its own event loop and connections. Users
    /// (their registration, sync loops and deliveries), rooms and every
    /// open-loop arrival are spread over them (`split.rs`); rates, limits and
    /// concurrency stay totals over all threads. 1 runs everything on the
    /// calling thread. At most `split::THREADS_MAX`. The first thread makes
    /// its choices from `seed`, the others from seeds derived from it, so a
    /// run's choices repeat for the same seed and thread count.
    pub threads: u32,
    /// Users.
    pub users: UsersPlan,
    /// Rooms.
    pub rooms: RoomsPlan,
    /// The timed load phase (send, sync, mixed).
    pub load: LoadPlan,
    /// Message sending.
    pub send: SendPlan,
    /// Sync long-polling.
    pub sync: SyncPlan,
    /// The chat-like mix.
    pub mixed: MixedPlan,
    /// TURN.
    pub turn: TurnPlan,
    /// Limits that bound the run.
    pub limits: LimitsPlan,
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            target: "http://127.0.0.1:8008".into(),
            allow_remote: false,
            scenarios: vec![
                Scenario::Register,
                Scenario::Rooms,
                Scenario::Send,
                Scenario::Sync,
            ],
            seed: 1,
            threads: 1,
            users: UsersPlan::default(),
            rooms: RoomsPlan::default(),
            load: LoadPlan::default(),
            send: SendPlan::default(),
            sync: SyncPlan::default(),
            mixed: MixedPlan::default(),
            turn: TurnPlan::default(),
            limits: LimitsPlan::default(),
        }
    }
}

/// Users and how they are registered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UsersPlan {
    /// Number of users.
    pub count: u32,
    /// Localpart prefix; users are `<prefix><run>_<i>` unless `reuse` is set,
    /// then `<prefix><i>` (existing users are logged in instead).
    pub prefix: String,
    /// Reuse users of earlier runs: no per-run suffix, log in when taken.
    pub reuse: bool,
    /// Password of every user.
    pub password: String,
    /// Registrations per second; 0 registers closed-loop with `concurrency`.
    pub register_rate_per_s: f64,
    /// Concurrent registrations in closed-loop registration.
    pub concurrency: u32,
    /// Registration token (`m.login.registration_token`), when the server needs one.
    pub registration_token: Option<String>,
    /// Also log every user in once after registering (measures login).
    pub login: bool,
}

impl Default for UsersPlan {
    fn default() -> Self {
        Self {
            count: 20,
            prefix: "lt".into(),
            reuse: false,
            password: "loadtest-password-1".into(),
            register_rate_per_s: 0.0,
            concurrency: 8,
            registration_token: None,
            login: true,
        }
    }
}

/// Rooms and memberships.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoomsPlan {
    /// Number of ordinary rooms.
    pub count: u32,
    /// Members of each ordinary room (capped at the user count). Members are
    /// consecutive users, wrapping around, so memberships spread evenly.
    pub size: u32,
    /// Members of one extra large room (0: none). Capped at the user count.
    pub large_room_size: u32,
    /// Concurrent create/join requests.
    pub concurrency: u32,
}

impl Default for RoomsPlan {
    fn default() -> Self {
        Self {
            count: 4,
            size: 5,
            large_room_size: 0,
            concurrency: 8,
        }
    }
}

/// The timed phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoadPlan {
    /// Open or closed loop.
    pub mode: Mode,
    /// Measured duration after the warm-up.
    pub duration_s: f64,
    /// Warm-up before the measured duration; its operations are not counted.
    pub warmup_s: f64,
    /// Closed loop: number of concurrent workers.
    pub concurrency: u32,
    /// After sending stops, how long to wait for outstanding deliveries.
    pub drain_s: f64,
    /// Open loop: sleep to one timer tick before each arrival and yield
    /// until it is due, so arrivals leave within microseconds of their
    /// schedule rather than up to a tick (1 ms) late. Costs the generator's
    /// thread busy time between arrivals less than a tick apart.
    pub precise_arrivals: bool,
}

impl Default for LoadPlan {
    fn default() -> Self {
        Self {
            mode: Mode::Open,
            duration_s: 10.0,
            warmup_s: 2.0,
            concurrency: 16,
            drain_s: 10.0,
            precise_arrivals: false,
        }
    }
}

/// Message sending.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SendPlan {
    /// Messages per second over all rooms (open loop).
    pub rate_per_s: f64,
    /// Stepped rates instead of one rate: each step's rate is held for its
    /// duration; the warm-up runs at the first step's rate, and the load
    /// phase lasts as long as the steps.
    pub steps: Vec<RateStep>,
    /// Padding added to each message body, in bytes.
    pub body_bytes: u32,
}

impl Default for SendPlan {
    fn default() -> Self {
        Self {
            rate_per_s: 10.0,
            steps: Vec::new(),
            body_bytes: 0,
        }
    }
}

/// Sync long-polling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncPlan {
    /// Long-poll timeout passed to the server.
    pub timeout_ms: u64,
    /// How many users run a sync loop (0: all of them).
    pub users: u32,
    /// Concurrent initial syncs.
    pub initial_concurrency: u32,
    /// Send the next `/sync` as soon as the previous response's
    /// `next_batch` is read, before that response is decoded and its
    /// deliveries counted (see `syncloop.rs`). Plain keep-alive on the wire,
    /// safe with any server; `false` decodes first, as a naive client does.
    pub pipelined: bool,
}

impl Default for SyncPlan {
    fn default() -> Self {
        Self {
            timeout_ms: 10_000,
            users: 0,
            initial_concurrency: 8,
            pipelined: true,
        }
    }
}

/// The chat-like mix: relative weights of each action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MixedPlan {
    /// Actions per second (open loop).
    pub rate_per_s: f64,
    /// Weight of message sends.
    pub send: u32,
    /// Weight of typing notifications.
    pub typing: u32,
    /// Weight of read receipts.
    pub receipt: u32,
    /// Weight of profile reads.
    pub profile: u32,
    /// Weight of `/messages` pagination.
    pub messages: u32,
}

impl Default for MixedPlan {
    fn default() -> Self {
        Self {
            rate_per_s: 20.0,
            send: 40,
            typing: 20,
            receipt: 20,
            profile: 10,
            messages: 10,
        }
    }
}

/// TURN load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TurnPlan {
    /// TURN server, `host:port` (UDP).
    pub server: String,
    /// TURN REST shared secret; credentials are minted from it.
    pub secret: Option<String>,
    /// Take credentials from the homeserver's `/voip/turnServer` instead.
    pub from_homeserver: bool,
    /// Allocations per second.
    pub allocate_rate_per_s: f64,
    /// Allocations kept open for relaying packets.
    pub relay_allocations: u32,
    /// Relayed packets per second over all kept allocations.
    pub packet_rate_per_s: f64,
    /// Payload bytes per relayed packet.
    pub packet_bytes: u32,
    /// Packets sent back to back on one allocation per arrival (as the
    /// packets of one video frame), 1..=[`TURN_BURST_MAX`]; arrivals come at
    /// `packet_rate_per_s / packet_burst`.
    pub packet_burst: u32,
    /// Send each burst as one UDP GSO message (the kernel still sends one
    /// datagram per packet), and have the echo peer take coalesced bursts
    /// (`UDP_GRO`) and echo them the same way. On loopback a server socket
    /// with `UDP_GRO` then gets each burst as one message, as a network
    /// card's GRO hands over back-to-back datagrams of one flow; a server
    /// without it gets the datagrams one by one. Linux only.
    pub packet_gso: bool,
}

/// Most bytes of one GSO burst (`turn.packet_gso`): a UDP datagram's limit,
/// with room to spare.
pub const TURN_GSO_BURST_MAX_BYTES: u32 = 65_000;

/// Largest `turn.packet_burst`.
pub const TURN_BURST_MAX: u32 = 64;

impl Default for TurnPlan {
    fn default() -> Self {
        Self {
            server: "127.0.0.1:3478".into(),
            secret: None,
            from_homeserver: false,
            allocate_rate_per_s: 50.0,
            relay_allocations: 10,
            packet_rate_per_s: 1000.0,
            packet_bytes: 160,
            packet_burst: 1,
            packet_gso: false,
        }
    }
}

/// Bounds on the whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsPlan {
    /// Hard cap on the whole run, every phase included.
    pub max_run_s: f64,
    /// Hard cap on requests issued in the load phase.
    pub max_requests: u64,
    /// Requests allowed in flight in open loop; arrivals beyond are dropped
    /// and counted (the generator never queues without bound).
    pub max_in_flight: u32,
    /// Connections in the request pool (long-polls have their own).
    pub connections: u32,
    /// Timeout of ordinary requests.
    pub request_timeout_s: f64,
}

impl Default for LimitsPlan {
    fn default() -> Self {
        Self {
            max_run_s: 3600.0,
            max_requests: 10_000_000,
            max_in_flight: 20_000,
            connections: 512,
            request_timeout_s: 60.0,
        }
    }
}

impl Plan {
    /// Parses a TOML plan.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Whether a scenario is selected.
    pub fn has(&self, s: Scenario) -> bool {
        self.scenarios.contains(&s)
    }

    /// Whether the run needs Matrix users at all.
    pub fn needs_users(&self) -> bool {
        self.scenarios.iter().any(|s| *s != Scenario::Turn) || self.turn.from_homeserver
    }

    /// Whether the run has a timed Matrix load phase.
    pub fn has_load(&self) -> bool {
        self.has(Scenario::Send) || self.has(Scenario::Sync) || self.has(Scenario::Mixed)
    }

    /// Whether sync loops run during the load phase (`mixed` implies them:
    /// a chat client always syncs).
    pub fn runs_sync(&self) -> bool {
        self.has(Scenario::Sync) || self.has(Scenario::Mixed)
    }

    /// Warm-up duration.
    pub fn warmup(&self) -> Duration {
        Duration::try_from_secs_f64(self.load.warmup_s).unwrap_or(Duration::ZERO)
    }

    /// The send schedule over warm-up plus measured time.
    pub fn send_schedule(&self) -> Schedule {
        if self.send.steps.is_empty() {
            let total = self.warmup() + secs(self.load.duration_s);
            Schedule::fixed(self.send.rate_per_s, total)
        } else {
            let mut steps = Vec::with_capacity(self.send.steps.len() + 1);
            steps.push(RateStep {
                rate_per_s: self.send.steps[0].rate_per_s,
                duration: self.warmup(),
            });
            steps.extend_from_slice(&self.send.steps);
            Schedule::stepped(&steps)
        }
    }

    /// Length of the load phase, warm-up included.
    pub fn load_duration(&self) -> Duration {
        if self.send.steps.is_empty() {
            self.warmup() + secs(self.load.duration_s)
        } else {
            self.send_schedule().duration()
        }
    }

    /// Checks values that would make the run meaningless.
    pub fn validate(&self) -> Result<(), String> {
        if self.scenarios.is_empty() {
            return Err("no scenario selected".into());
        }
        if !(1..=crate::split::THREADS_MAX).contains(&self.threads) {
            return Err(format!(
                "threads must be between 1 and {}",
                crate::split::THREADS_MAX
            ));
        }
        if self.needs_users() && self.users.count == 0 {
            return Err("these scenarios need users: users.count must be > 0".into());
        }
        if (self.has(Scenario::Rooms) || self.has_load())
            && self.rooms.count == 0
            && self.rooms.large_room_size == 0
        {
            return Err(
                "these scenarios need rooms: rooms.count or rooms.large_room_size must be > 0"
                    .into(),
            );
        }
        for (name, v) in [
            ("load.duration_s", self.load.duration_s),
            ("load.warmup_s", self.load.warmup_s),
            ("load.drain_s", self.load.drain_s),
            ("limits.max_run_s", self.limits.max_run_s),
            ("limits.request_timeout_s", self.limits.request_timeout_s),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{name} must be a finite number >= 0"));
            }
        }
        if !(1..=TURN_BURST_MAX).contains(&self.turn.packet_burst) {
            return Err(format!("turn.packet_burst must be between 1 and {TURN_BURST_MAX}"));
        }
        // ChannelData frames: a 4-byte header, no padding over UDP.
        if self.turn.packet_gso
            && self
                .turn
                .packet_burst
                .saturating_mul(self.turn.packet_bytes.saturating_add(4))
                > TURN_GSO_BURST_MAX_BYTES
        {
            return Err(format!(
                "turn.packet_gso: packet_burst x (packet_bytes + 4) must be at most {TURN_GSO_BURST_MAX_BYTES}"
            ));
        }
        if self.has(Scenario::Turn) && self.turn.secret.is_none() && !self.turn.from_homeserver {
            return Err("turn needs turn.secret or turn.from_homeserver".into());
        }
        let mix = &self.mixed;
        if self.has(Scenario::Mixed)
            && mix.send + mix.typing + mix.receipt + mix.profile + mix.messages == 0
        {
            return Err("mixed: all weights are zero".into());
        }
        Ok(())
    }
}

/// Seconds as a duration; negative or invalid values are zero.
pub fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_plan_overrides_defaults() {
        let plan = Plan::from_toml(
            r#"
            target = "http://127.0.0.1:9999"
            scenarios = ["register", "mixed"]
            threads = 4
            [users]
            count = 7
            [send]
            steps = [{ rate_per_s = 5, duration = 2 }, { rate_per_s = 10, duration = 1.5 }]
            [mixed]
            typing = 0
            "#,
        )
        .expect("plan parses");
        assert_eq!(plan.target, "http://127.0.0.1:9999");
        assert_eq!(plan.users.count, 7);
        assert_eq!(plan.threads, 4);
        assert_eq!(Plan::default().threads, 1);
        assert_eq!(plan.users.password, UsersPlan::default().password);
        assert!(plan.has(Scenario::Mixed) && plan.runs_sync() && plan.has_load());
        assert_eq!(plan.mixed.typing, 0);
        assert_eq!(plan.mixed.send, MixedPlan::default().send);
        // Warm-up (2 s at the first rate) then the steps.
        assert_eq!(plan.load_duration(), Duration::from_millis(5500));
        assert_eq!(plan.send_schedule().len(), 10 + 10 + 15);
        plan.validate().expect("valid");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        assert!(Plan::from_toml("[users]\ncuont = 3").is_err());
        let mut plan = Plan::default();
        plan.load.duration_s = f64::NAN;
        assert!(plan.validate().is_err());
        for threads in [0, crate::split::THREADS_MAX + 1] {
            let plan = Plan {
                threads,
                ..Plan::default()
            };
            assert!(plan.validate().is_err(), "threads = {threads}");
        }
        let mut plan = Plan {
            scenarios: vec![Scenario::Turn],
            ..Plan::default()
        };
        assert!(plan.validate().is_err(), "turn without credentials");
        plan.turn.secret = Some("s".into());
        plan.users.count = 0;
        plan.validate().expect("turn alone needs no users");
        for burst in [0, TURN_BURST_MAX + 1] {
            plan.turn.packet_burst = burst;
            assert!(plan.validate().is_err(), "packet_burst = {burst}");
        }
        plan.turn.packet_burst = TURN_BURST_MAX;
        plan.validate().expect("the largest burst");
        plan.turn.packet_gso = true;
        plan.turn.packet_bytes = 1_000;
        plan.validate()
            .expect("64 x 1,004 bytes fit one GSO message");
        plan.turn.packet_bytes = 1_100;
        assert!(plan.validate().is_err(), "64 x 1,104 bytes do not");
    }

    #[test]
    fn plan_round_trips_through_toml() {
        let plan = Plan::default();
        let text = toml::to_string(&plan).expect("serialises");
        assert_eq!(Plan::from_toml(&text).expect("parses"), plan);
    }
}
