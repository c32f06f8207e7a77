//! The embedded rumqttd broker behind the device listener. It routes what is not readings:
//! messages a device publishes on its other own topics, and messages local clients of the agent
//! (the control link, say) publish to devices' topics, which reach the devices subscribed to
//! them. Devices never connect to it directly; the listener talks to it through in-process links.

use std::sync::Arc;

use fieldgate_shared::DeviceId;
use rumqttd::local::{LinkError, LinkRx, LinkTx};

/// A handle on the embedded broker; clones share it.
#[derive(Clone)]
pub struct LocalBroker {
    broker: Arc<rumqttd::Broker>,
}

impl std::fmt::Debug for LocalBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalBroker")
    }
}

/// A local link could not be opened (the router is at its connection limit or gone).
#[derive(Debug, thiserror::Error)]
#[error("opening a link to the embedded broker for {client}: {reason}")]
pub struct BrokerLinkError {
    pub client: String,
    /// rumqttd's `LinkError`, as text: the error itself carries a whole router event.
    pub reason: String,
}

impl BrokerLinkError {
    fn new(client: String, source: LinkError) -> Self {
        Self {
            client,
            reason: source.to_string(),
        }
    }
}

impl LocalBroker {
    /// Starts the broker's router on its own thread. `max_links` bounds its connections: one per
    /// connected device (a device's link is replaced when it reconnects, so there are never more
    /// than devices) plus the agent's own links.
    pub(crate) fn start(topic_root: &str, max_links: usize, max_packet_bytes: usize) -> Self {
        let router = rumqttd::RouterConfig {
            max_connections: max_links,
            max_outgoing_packet_count: 256,
            max_segment_size: max_packet_bytes.max(64 * 1024),
            max_segment_count: 4,
            custom_segment: None,
            // Every device topic matches a filter from the start, so a publish nobody has
            // subscribed to yet is kept briefly instead of making rumqttd drop the link.
            initialized_filters: Some(vec![format!("{topic_root}/#")]),
            shared_subscriptions_strategy: Default::default(),
        };
        let config = rumqttd::Config {
            router,
            ..Default::default()
        };
        Self {
            broker: Arc::new(rumqttd::Broker::new(config)),
        }
    }

    /// Opens a link for a local client of the agent, e.g. to publish commands to
    /// `devices/<id>/commands/…`. Its client id is `@<name>`, which no device id can be.
    /// Blocks until the router answers: call it from a blocking context.
    pub fn link(&self, name: &str) -> Result<(LinkTx, LinkRx), BrokerLinkError> {
        let client = format!("@{name}");
        self.broker
            .link(&client)
            .map_err(|source| BrokerLinkError::new(client, source))
    }

    /// The link of a connected device; its client id is the device id, so a reconnecting
    /// device's new link replaces the old one in the router.
    pub(crate) async fn device_link(
        &self,
        device: &DeviceId,
    ) -> Result<(LinkTx, LinkRx), BrokerLinkError> {
        let broker = self.broker.clone();
        let client = device.as_str().to_owned();
        tokio::task::spawn_blocking(move || {
            broker
                .link(&client)
                .map_err(|source| BrokerLinkError::new(client, source))
        })
        .await
        .unwrap_or_else(|join_error| std::panic::resume_unwind(join_error.into_panic()))
    }
}
