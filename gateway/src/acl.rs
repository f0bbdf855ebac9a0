//! What an authenticated device may publish and subscribe to. Pure functions over the naming
//! contract, so they are property-tested without a broker.

use liftwire_proto::naming::{
    device_downlink_filters, Audience, BuildingId, DeviceId, Downlink, Uplink,
};

/// What kind of device a registry entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// An elevator controller.
    Elevator,
    /// An in-cabin screen.
    Screen,
}

impl DeviceKind {
    /// The registry's name of the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Elevator => "elevator",
            DeviceKind::Screen => "screen",
        }
    }

    /// Parses the registry's name of the kind.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "elevator" => Some(DeviceKind::Elevator),
            "screen" => Some(DeviceKind::Screen),
            _ => None,
        }
    }
}

/// An authenticated device, as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The device (also its MQTT client id).
    pub device: DeviceId,
    /// Its building.
    pub building: BuildingId,
    /// Elevator controller or screen.
    pub kind: DeviceKind,
}

/// Why a packet breaks the access rules; a stable label for metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// The topic is not a device uplink topic of the contract.
    #[error("publish on a topic outside the contract: {0}")]
    NotAnUplinkTopic(String),
    /// The topic names another device or building.
    #[error("publish on another device's topic: {0}")]
    ForeignTopic(String),
    /// The subscription filter is not one of the device's own downlink filters.
    #[error("subscription outside the device's downlink topics: {0}")]
    ForeignFilter(String),
    /// The connection sent a last will (presence is reported by the gateway instead).
    #[error("last will on topic {0} refused")]
    LastWill(String),
}

impl Violation {
    /// Metric label of the violation.
    pub fn reason(&self) -> &'static str {
        match self {
            Violation::NotAnUplinkTopic(_) => "publish_topic",
            Violation::ForeignTopic(_) => "foreign_topic",
            Violation::ForeignFilter(_) => "foreign_filter",
            Violation::LastWill(_) => "last_will",
        }
    }
}

/// Checks a PUBLISH: only the device's own uplink topics, in its own building.
pub fn check_publish(identity: &Identity, topic: &str) -> Result<Uplink, Violation> {
    let uplink = Uplink::from_mqtt_topic(topic)
        .map_err(|_| Violation::NotAnUplinkTopic(topic.to_owned()))?;
    if uplink.device != identity.device || uplink.building != identity.building {
        return Err(Violation::ForeignTopic(topic.to_owned()));
    }
    Ok(uplink)
}

/// Checks a SUBSCRIBE filter: the device's own downlink topics and its building's broadcast
/// topics, either as the two `+` filters or one exact topic of them.
pub fn check_subscribe(identity: &Identity, filter: &str) -> Result<(), Violation> {
    if device_downlink_filters(&identity.building, &identity.device)
        .iter()
        .any(|f| f == filter)
    {
        return Ok(());
    }
    match Downlink::from_mqtt_topic(filter) {
        Ok(down)
            if down.building == identity.building
                && (down.audience == Audience::Building
                    || down.audience == Audience::Device(identity.device.clone())) =>
        {
            Ok(())
        }
        _ => Err(Violation::ForeignFilter(filter.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn identity(b: &str, d: &str) -> Identity {
        Identity {
            device: DeviceId::new(d).unwrap(),
            building: BuildingId::new(b).unwrap(),
            kind: DeviceKind::Elevator,
        }
    }

    #[test]
    fn own_topics_pass_and_others_do_not() {
        let me = identity("b1", "elev-1");
        assert!(check_publish(&me, "lw/v1/b1/elev-1/up/telemetry").is_ok());
        assert_eq!(
            check_publish(&me, "lw/v1/b1/elev-2/up/telemetry")
                .unwrap_err()
                .reason(),
            "foreign_topic"
        );
        assert_eq!(
            check_publish(&me, "lw/v1/b2/elev-1/up/telemetry")
                .unwrap_err()
                .reason(),
            "foreign_topic"
        );
        for bad in [
            "lw/v1/b1/elev-1/down/command",
            "lw/v1/b1/elev-1/up/#",
            "other/topic",
            "lw/v1/b1/+/up/event",
            "",
        ] {
            assert_eq!(
                check_publish(&me, bad).unwrap_err().reason(),
                "publish_topic",
                "{bad}"
            );
        }

        for ok in [
            "lw/v1/b1/elev-1/down/+",
            "lw/v1/b1/_all/down/+",
            "lw/v1/b1/elev-1/down/command",
            "lw/v1/b1/_all/down/screen-content",
        ] {
            assert!(check_subscribe(&me, ok).is_ok(), "{ok}");
        }
        for bad in [
            "#",
            "lw/#",
            "lw/v1/b1/#",
            "lw/v1/b1/+/down/+",
            "lw/v1/b1/elev-2/down/+",
            "lw/v1/b2/_all/down/+",
            "lw/v1/b1/elev-1/up/+",
            "lw/v1/b1/elev-1/down/#",
            "$SYS/#",
            "$share/g/lw/v1/b1/elev-1/down/+",
        ] {
            assert_eq!(
                check_subscribe(&me, bad).unwrap_err().reason(),
                "foreign_filter",
                "{bad}"
            );
        }
    }

    /// Topic levels that are often right and often hostile.
    const LEVELS: [&str; 14] = [
        "b1",
        "b2",
        "elev-1",
        "elev-2",
        "_all",
        "+",
        "#",
        "down",
        "up",
        "command",
        "screen-content",
        "telemetry",
        "",
        "$SYS",
    ];

    fn level() -> impl Strategy<Value = String> {
        proptest::sample::select(LEVELS.to_vec()).prop_map(str::to_owned)
    }

    /// Every topic of the contract's shape built from [`LEVELS`] (14⁴ of them): exactly the
    /// device's own pass. (Free-form topics rarely hit the accepting path; this covers it whole.)
    #[test]
    fn among_every_hostile_combination_exactly_the_devices_own_pass() {
        let me = identity("b1", "elev-1");
        let (mut published, mut subscribed) = (Vec::new(), Vec::new());
        for building in LEVELS {
            for device in LEVELS {
                for direction in LEVELS {
                    for kind in LEVELS {
                        let topic = format!("lw/v1/{building}/{device}/{direction}/{kind}");
                        if check_publish(&me, &topic).is_ok() {
                            published.push(topic.clone());
                        }
                        if check_subscribe(&me, &topic).is_ok() {
                            subscribed.push(topic);
                        }
                    }
                }
            }
        }
        assert_eq!(published, ["lw/v1/b1/elev-1/up/telemetry"]);
        assert_eq!(
            subscribed,
            [
                "lw/v1/b1/elev-1/down/+",
                "lw/v1/b1/elev-1/down/command",
                "lw/v1/b1/elev-1/down/screen-content",
                "lw/v1/b1/_all/down/+",
                "lw/v1/b1/_all/down/command",
                "lw/v1/b1/_all/down/screen-content",
            ]
        );
    }

    proptest! {
        /// Whatever topic a device publishes on, an accepted one is its own.
        #[test]
        fn accepted_publishes_are_always_the_devices_own(levels in proptest::collection::vec(level(), 1..6)) {
            let me = identity("b1", "elev-1");
            let topic = format!("lw/v1/{}", levels.join("/"));
            if let Ok(uplink) = check_publish(&me, &topic) {
                prop_assert_eq!(uplink.mqtt_topic(), topic);
                prop_assert_eq!(uplink.device, me.device);
                prop_assert_eq!(uplink.building, me.building);
            }
        }

        /// An accepted filter never contains `#` and never reaches another device.
        #[test]
        fn accepted_filters_stay_in_the_device_namespace(levels in proptest::collection::vec(level(), 1..6)) {
            let me = identity("b1", "elev-1");
            let filter = format!("lw/v1/{}", levels.join("/"));
            if check_subscribe(&me, &filter).is_ok() {
                prop_assert!(!filter.contains('#'));
                prop_assert!(filter.starts_with("lw/v1/b1/elev-1/down/") || filter.starts_with("lw/v1/b1/_all/down/"));
            }
        }
    }
}
