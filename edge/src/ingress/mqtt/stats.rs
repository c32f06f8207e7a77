//! The ingress counters. Each event both logs and bumps its counter, so logs and metrics agree.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident, )*) => {
        /// Live counters of the MQTT ingress, shared by all its connections.
        #[derive(Debug, Default)]
        pub struct MqttIngressStats {
            $( $(#[$doc])* pub(crate) $name: AtomicU64, )*
        }

        /// A copy of the counters at one instant.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
        pub struct MqttIngressSnapshot {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl MqttIngressStats {
            pub fn snapshot(&self) -> MqttIngressSnapshot {
                MqttIngressSnapshot {
                    $( $name: self.$name.load(Ordering::Relaxed), )*
                }
            }
        }
    };
}

counters! {
    /// TCP connections accepted (before TLS and CONNECT).
    connections_accepted,
    /// Connections open now.
    connections_open,
    /// Connections closed at once because `max_connections` were open.
    connections_over_limit,
    /// Connections that did not finish TLS and CONNECT within `connect_timeout_ms`.
    connect_timeouts,
    /// TLS handshakes that failed.
    tls_failures,
    /// Devices that authenticated.
    sessions_started,
    /// CONNECTs refused: unknown device, no or wrong password.
    auth_failures,
    /// CONNECTs whose client id was neither empty nor the user name.
    auth_bad_client_ids,
    /// CONNECTs refused for another reason (protocol version, enhanced auth, foreign will topic).
    connects_refused,
    /// Older connections of a device closed because the device connected again.
    sessions_taken_over,
    /// Connections closed because the device was silent for 1.5 keep-alive periods.
    keep_alive_timeouts,
    /// PUBLISH messages on readings topics accepted and handed to the journal.
    messages_accepted,
    /// Readings in those messages.
    readings_accepted,
    /// JSON `null` values skipped.
    null_values_skipped,
    /// Messages refused for being over `max_packet_bytes`.
    rejected_oversized,
    /// Messages whose payload is not readings in a known form.
    rejected_malformed,
    /// PUBLISHes on another device's topic (the connection is closed).
    rejected_unauthorised_publish,
    /// SUBSCRIBE filters outside the device's own topics (refused in the SUBACK).
    rejected_unauthorised_subscribe,
    /// QoS 2 PUBLISHes (not offered; the connection is closed).
    rejected_qos2,
    /// Packets that break MQTT (the connection is closed).
    protocol_errors,
    /// Batches whose commit came back Busy or was dropped: not acknowledged, connection closed.
    commits_busy,
    /// PUBLISHes on a device's other own topics, routed through the embedded broker.
    messages_routed,
    /// Messages from the embedded broker delivered to a device.
    messages_delivered,
}

/// Why a message or request from a device was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    Oversized,
    Malformed,
    UnauthorisedPublish,
    UnauthorisedSubscribe,
    QoS2,
    ProtocolError,
}

impl MqttIngressStats {
    pub(crate) fn bump(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.connections_open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts and logs a refusal. Per-message refusals log at debug (a broken device can send
    /// thousands a second); refusals that close the connection log at warn.
    pub(crate) fn rejected(&self, device: &str, rejection: Rejection, detail: &dyn fmt::Display) {
        let counter = match rejection {
            Rejection::Oversized => &self.rejected_oversized,
            Rejection::Malformed => &self.rejected_malformed,
            Rejection::UnauthorisedPublish => &self.rejected_unauthorised_publish,
            Rejection::UnauthorisedSubscribe => &self.rejected_unauthorised_subscribe,
            Rejection::QoS2 => &self.rejected_qos2,
            Rejection::ProtocolError => &self.protocol_errors,
        };
        Self::bump(counter, 1);
        match rejection {
            Rejection::Malformed | Rejection::UnauthorisedSubscribe => {
                tracing::debug!(device, reason = ?rejection, detail = %detail, "MQTT message refused");
            }
            _ => {
                tracing::warn!(device, reason = ?rejection, detail = %detail, "MQTT message refused");
            }
        }
    }
}
