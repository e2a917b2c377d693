//! Relay counters and their Prometheus text rendering.
//!
//! Each shard owns one [`Metrics`] and is its only writer, so the relaxed
//! atomic increments on the data path never contend; the metrics endpoint
//! reads all shards and sums them.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Why a packet was dropped instead of relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not STUN, not ChannelData, or a STUN message that does not parse.
    Malformed,
    /// An indication or ChannelData without an allocation on its 5-tuple.
    NoAllocation,
    /// No permission installed for the peer.
    NoPermission,
    /// ChannelData on an unbound channel.
    NoChannel,
    /// The peer address is refused by the peer policy.
    PeerDenied,
    /// The allocation's bandwidth cap was exceeded.
    Bandwidth,
    /// The relay is draining or a send failed.
    Io,
}

impl DropReason {
    /// All reasons, in the order they are exported.
    pub const ALL: [DropReason; 7] = [
        DropReason::Malformed,
        DropReason::NoAllocation,
        DropReason::NoPermission,
        DropReason::NoChannel,
        DropReason::PeerDenied,
        DropReason::Bandwidth,
        DropReason::Io,
    ];

    /// Label value used in metrics.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::NoAllocation => "no_allocation",
            DropReason::NoPermission => "no_permission",
            DropReason::NoChannel => "no_channel",
            DropReason::PeerDenied => "peer_denied",
            DropReason::Bandwidth => "bandwidth",
            DropReason::Io => "io",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one shard.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Live allocations.
    pub allocations: AtomicI64,
    /// Allocations created since start.
    pub allocations_total: AtomicU64,
    /// Packets relayed client -> peer.
    pub packets_to_peer: AtomicU64,
    /// Payload bytes relayed client -> peer.
    pub bytes_to_peer: AtomicU64,
    /// Packets relayed peer -> client.
    pub packets_to_client: AtomicU64,
    /// Payload bytes relayed peer -> client.
    pub bytes_to_client: AtomicU64,
    /// Requests refused for bad or missing credentials.
    pub auth_failures: AtomicU64,
    /// Requests refused by quota (486/508).
    pub quota_rejections: AtomicU64,
    /// CreatePermission/ChannelBind refused by peer policy (403).
    pub peer_refusals: AtomicU64,
    /// STUN requests handled.
    pub requests: AtomicU64,
    /// TCP peer data connections bound to a client data connection (RFC 6062).
    pub tcp_connections_total: AtomicU64,
    /// UDP datagrams sent as segments of GSO messages.
    pub udp_gso_datagrams: AtomicU64,
    /// UDP datagrams received inside coalesced (GRO) messages.
    pub udp_gro_datagrams: AtomicU64,
    /// DTLS sessions (handshaking or established).
    pub dtls_sessions: AtomicI64,
    /// DTLS handshakes completed.
    pub dtls_handshakes_total: AtomicU64,
    /// DTLS sessions that ended before their handshake completed (failed,
    /// timed out, or dropped from a full table unverified), and DTLS 1.0
    /// hellos refused.
    pub dtls_failures_total: AtomicU64,
    /// ClientHellos refused because the shard's session table was full.
    pub dtls_refused_total: AtomicU64,
    drops: [AtomicU64; 7],
}

impl Metrics {
    /// Counts a dropped packet.
    pub fn drop_packet(&self, why: DropReason) {
        self.drops[why.index()].fetch_add(1, Relaxed);
    }

    /// Dropped packets for a reason.
    pub fn drops(&self, why: DropReason) -> u64 {
        self.drops[why.index()].load(Relaxed)
    }
}

/// Renders the sum of several shards' counters in the Prometheus text format.
pub fn render(shards: &[&Metrics]) -> String {
    let sum = |f: &dyn Fn(&Metrics) -> u64| shards.iter().map(|m| f(m)).sum::<u64>();
    let mut out = String::new();
    let mut line = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    let live: i64 = shards.iter().map(|m| m.allocations.load(Relaxed)).sum();
    line("tessera_relay_allocations", "gauge", "Live TURN allocations.", live.max(0) as u64);
    line(
        "tessera_relay_allocations_created_total",
        "counter",
        "TURN allocations created.",
        sum(&|m| m.allocations_total.load(Relaxed)),
    );
    line("tessera_relay_auth_failures_total", "counter", "Requests refused for credentials.", sum(&|m| m.auth_failures.load(Relaxed)));
    line("tessera_relay_quota_rejections_total", "counter", "Allocations refused by quota.", sum(&|m| m.quota_rejections.load(Relaxed)));
    line("tessera_relay_peer_refusals_total", "counter", "Permissions refused by peer policy.", sum(&|m| m.peer_refusals.load(Relaxed)));
    line("tessera_relay_requests_total", "counter", "STUN requests handled.", sum(&|m| m.requests.load(Relaxed)));
    line(
        "tessera_relay_tcp_connections_total",
        "counter",
        "TCP peer connections relayed (RFC 6062).",
        sum(&|m| m.tcp_connections_total.load(Relaxed)),
    );
    line(
        "tessera_relay_udp_gso_datagrams_total",
        "counter",
        "UDP datagrams sent as segments of GSO messages (runs to one destination).",
        sum(&|m| m.udp_gso_datagrams.load(Relaxed)),
    );
    line(
        "tessera_relay_udp_gro_datagrams_total",
        "counter",
        "UDP datagrams received inside coalesced (GRO) messages.",
        sum(&|m| m.udp_gro_datagrams.load(Relaxed)),
    );
    let dtls_live: i64 = shards.iter().map(|m| m.dtls_sessions.load(Relaxed)).sum();
    line("tessera_relay_dtls_sessions", "gauge", "DTLS sessions, handshaking or established.", dtls_live.max(0) as u64);
    line("tessera_relay_dtls_handshakes_total", "counter", "DTLS handshakes completed.", sum(&|m| m.dtls_handshakes_total.load(Relaxed)));
    line(
        "tessera_relay_dtls_failures_total",
        "counter",
        "DTLS handshakes that failed, timed out or were refused (DTLS 1.0).",
        sum(&|m| m.dtls_failures_total.load(Relaxed)),
    );
    line(
        "tessera_relay_dtls_refused_total",
        "counter",
        "DTLS ClientHellos refused: the session table was full.",
        sum(&|m| m.dtls_refused_total.load(Relaxed)),
    );
    let _ = writeln!(out, "# HELP tessera_relay_packets_total Packets relayed.\n# TYPE tessera_relay_packets_total counter");
    let _ = writeln!(out, "tessera_relay_packets_total{{direction=\"to_peer\"}} {}", sum(&|m| m.packets_to_peer.load(Relaxed)));
    let _ = writeln!(out, "tessera_relay_packets_total{{direction=\"to_client\"}} {}", sum(&|m| m.packets_to_client.load(Relaxed)));
    let _ = writeln!(out, "# HELP tessera_relay_bytes_total Payload bytes relayed.\n# TYPE tessera_relay_bytes_total counter");
    let _ = writeln!(out, "tessera_relay_bytes_total{{direction=\"to_peer\"}} {}", sum(&|m| m.bytes_to_peer.load(Relaxed)));
    let _ = writeln!(out, "tessera_relay_bytes_total{{direction=\"to_client\"}} {}", sum(&|m| m.bytes_to_client.load(Relaxed)));
    let _ = writeln!(out, "# HELP tessera_relay_dropped_packets_total Packets dropped, by reason.\n# TYPE tessera_relay_dropped_packets_total counter");
    for why in DropReason::ALL {
        let _ = writeln!(out, "tessera_relay_dropped_packets_total{{reason=\"{}\"}} {}", why.label(), sum(&|m| m.drops(why)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_sums_shards() {
        let a = Metrics::default();
        let b = Metrics::default();
        a.drop_packet(DropReason::PeerDenied);
        b.drop_packet(DropReason::PeerDenied);
        b.packets_to_peer.fetch_add(5, Relaxed);
        let text = render(&[&a, &b]);
        assert!(text.contains("tessera_relay_dropped_packets_total{reason=\"peer_denied\"} 2"), "{text}");
        assert!(text.contains("tessera_relay_packets_total{direction=\"to_peer\"} 5"), "{text}");
    }
}
