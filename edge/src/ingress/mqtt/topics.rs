//! The per-device topic rules: a device publishes and subscribes only under
//! `<root>/<device-id>/`, and its readings go to `<root>/<device-id>/readings`.

use fieldgate_shared::DeviceId;

/// The last level of the topic a device publishes its readings on.
pub const READINGS_LEVEL: &str = "readings";

/// What a PUBLISH topic means for the device that sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopicClass {
    /// `<root>/<own id>/readings`: parsed and handed to the journal.
    Readings,
    /// Elsewhere under `<root>/<own id>/`: routed through the embedded broker.
    Own,
    /// Not under the device's own prefix: refused.
    Foreign,
    /// Empty or with wildcards: not a topic name at all.
    Invalid,
}

/// The topics of one authenticated device.
#[derive(Clone, Debug)]
pub struct DeviceTopics {
    /// `<root>/<id>`
    prefix: String,
    /// `<root>/<id>/readings`
    readings: String,
}

impl DeviceTopics {
    pub fn new(root: &str, device: &DeviceId) -> Self {
        let prefix = format!("{root}/{device}");
        let readings = format!("{prefix}/{READINGS_LEVEL}");
        Self { prefix, readings }
    }

    /// The device's readings topic.
    pub fn readings(&self) -> &str {
        &self.readings
    }

    pub fn classify_publish(&self, topic: &str) -> TopicClass {
        if topic.is_empty() || topic.contains(['+', '#']) {
            return TopicClass::Invalid;
        }
        if topic == self.readings {
            TopicClass::Readings
        } else if self.is_own(topic) {
            TopicClass::Own
        } else {
            TopicClass::Foreign
        }
    }

    /// Whether the device may subscribe to `filter`: a valid filter under its own prefix.
    /// `$share/…` and filters with a wildcard before the device's id never are.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        valid_filter(filter) && self.is_own(filter)
    }

    fn is_own(&self, topic: &str) -> bool {
        topic
            .strip_prefix(self.prefix.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }
}

/// A topic filter as MQTT defines it: `#` only as the whole last level, `+` only as a whole level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let is_last = levels.peek().is_none();
        if level.contains('#') && !(level == "#" && is_last) {
            return false;
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

/// A valid topic root: non-empty levels, no wildcards, not starting with `$`.
pub fn valid_root(root: &str) -> bool {
    !root.is_empty()
        && !root.starts_with('$')
        && !root.contains(['+', '#', '\0'])
        && root.split('/').all(|level| !level.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> DeviceTopics {
        DeviceTopics::new("devices", &DeviceId::new("meter-1").unwrap())
    }

    #[test]
    fn classifies_publish_topics() {
        let check = |topic: &str, expected: TopicClass| {
            assert_eq!(topics().classify_publish(topic), expected, "{topic}");
        };
        check("devices/meter-1/readings", TopicClass::Readings);
        check("devices/meter-1/status", TopicClass::Own);
        check("devices/meter-1", TopicClass::Own);
        check("devices/meter-1/readings/extra", TopicClass::Own);
        check("devices/meter-10/readings", TopicClass::Foreign);
        check("devices/meter-2/readings", TopicClass::Foreign);
        check("devices/meter-1x", TopicClass::Foreign);
        check("devices", TopicClass::Foreign);
        check("other/meter-1/readings", TopicClass::Foreign);
        check("/devices/meter-1/readings", TopicClass::Foreign);
        check("devices/+/readings", TopicClass::Invalid);
        check("devices/meter-1/#", TopicClass::Invalid);
        check("", TopicClass::Invalid);
    }

    #[test]
    fn allows_only_own_filters() {
        let check = |filter: &str, expected: bool| {
            assert_eq!(topics().may_subscribe(filter), expected, "{filter}");
        };
        check("devices/meter-1/#", true);
        check("devices/meter-1/commands/+", true);
        check("devices/meter-1", true);
        check("devices/meter-1/+/x", true);
        check("devices/+/commands", false);
        check("devices/#", false);
        check("#", false);
        check("devices/meter-10/#", false);
        check("devices/meter-1#", false);
        check("devices/meter-1/a#", false);
        check("devices/meter-1/#/x", false);
        check("$share/g/devices/meter-1/#", false);
    }

    #[test]
    fn validates_roots() {
        assert!(valid_root("devices"));
        assert!(valid_root("site/a/devices"));
        for bad in ["", "a//b", "a/", "/a", "$SYS", "a/+", "a/#"] {
            assert!(!valid_root(bad), "{bad}");
        }
    }
}
