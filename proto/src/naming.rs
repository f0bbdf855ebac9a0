//! The naming contract: MQTT topics, NATS subjects, JetStream streams and the mapping between them.
//!
//! This module is the only place in liftwire that builds or parses a topic or a subject. Every
//! identifier that ends up in one is validated first, so that no MQTT topic a device can publish
//! on maps to a NATS subject outside that device's namespace (no `.`, `*`, `>`, whitespace,
//! empty levels, `+`, `#` or `/` can slip through).
//!
//! ```text
//! device uplink    MQTT  lw/v1/{building}/{device}/up/{kind}
//!                  NATS  lw.v1.up.{building}.{device}.{kind}          (stream LW_UPLINK)
//! device downlink  NATS  lw.v1.down.{building}.{device}.{kind}
//!                  MQTT  lw/v1/{building}/{device}/down/{kind}
//! building-wide    NATS  lw.v1.down.{building}._all.{kind}            (e.g. notices for all screens)
//!                  MQTT  lw/v1/{building}/_all/down/{kind}
//! presence         NATS  lw.v1.presence.{building}.{device}          (stream LW_PRESENCE)
//! gateway liveness NATS  lw.v1.gateway.{gateway_id}.heartbeat, ….presence-refresh
//! live state       NATS  lw.v1.state.{building}.{device}              (telemetry → API)
//! dead letters     NATS  lw.v1.dlq.{source}                           (stream LW_DLQ)
//! alerts           NATS  lw.v1.alerts.{building}
//! reports          NATS  lw.v1.reports.request, lw.v1.reports.ready.{building}
//! service API      NATS  lw.v1.svc.{service}.{endpoint}
//! ```

use std::fmt;
use std::str::FromStr;

/// First level(s) of every liftwire MQTT topic.
pub const MQTT_ROOT: &str = "lw/v1";
/// First tokens of every liftwire NATS subject.
pub const NATS_ROOT: &str = "lw.v1";
/// Longest identifier accepted (building, device, source, service, endpoint).
pub const MAX_ID_LEN: usize = 64;
/// The pseudo-device that addresses every device of a building (building-wide downlink).
/// Identifiers cannot start with `_`, so no real device can take this name.
pub const ALL_DEVICES: &str = "_all";

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The identifier is empty (an empty topic level or subject token).
    #[error("identifier is empty")]
    Empty,
    /// The identifier is longer than [`MAX_ID_LEN`] bytes.
    #[error("identifier is {len} bytes long, the limit is {MAX_ID_LEN}")]
    TooLong {
        /// Length in bytes.
        len: usize,
    },
    /// The identifier contains a character outside `[A-Za-z0-9_-]`, or starts with `_`/`-`.
    #[error("identifier contains {ch:?} at byte {at}; allowed are ASCII letters, digits, '-' and '_' (not first)")]
    InvalidChar {
        /// The offending character.
        ch: char,
        /// Its byte offset.
        at: usize,
    },
}

/// Checks the identifier grammar shared by every topic level and subject token liftwire
/// produces: 1 to 64 bytes of `[A-Za-z0-9_-]`, starting with a letter or a digit.
pub fn validate_id(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { len: s.len() });
    }
    for (at, ch) in s.char_indices() {
        let ok = ch.is_ascii_alphanumeric() || (at > 0 && (ch == '-' || ch == '_'));
        if !ok {
            return Err(IdError::InvalidChar { ch, at });
        }
    }
    Ok(())
}

macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates `s` and wraps it.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                validate_id(&s)?;
                Ok(Self(s))
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

identifier!(
    /// A building (site) identifier, e.g. `mc-fontvieille-3`.
    BuildingId
);
identifier!(
    /// A device identifier (elevator controller or in-cabin screen); also its MQTT client id.
    DeviceId
);

macro_rules! kinds {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $s:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every kind, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The topic level / subject token naming this kind.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $s,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                match s {
                    $($s => Ok($name::$variant),)+
                    other => Err(NameError::UnknownKind(other.to_owned())),
                }
            }
        }
    };
}

kinds!(
    /// Kinds of messages a device sends; each is a body case of `Envelope`.
    UplinkKind {
        /// Periodic elevator telemetry.
        Telemetry => "telemetry",
        /// A discrete elevator event.
        Event => "event",
        /// A screen's "content displayed" acknowledgement.
        ScreenAck => "screen-ack",
        /// The outcome of a downlink command.
        CommandResult => "command-result",
        /// A request for a presigned upload URL.
        UploadRequest => "upload-request",
    }
);

kinds!(
    /// Kinds of messages a device receives; each is a body case of `Downlink`.
    DownlinkKind {
        /// A command for the device.
        Command => "command",
        /// Content for an in-cabin screen (delivered retained).
        ScreenContent => "screen-content",
        /// The backend's persisted-sequence watermark for the device's outbox.
        Watermark => "watermark",
        /// The answer to an upload request.
        UploadGrant => "upload-grant",
    }
);

impl DownlinkKind {
    /// Whether the MQTT broker should retain the latest message of this kind for devices that
    /// connect later (a screen that reconnects must show the current content at once).
    pub fn retained(self) -> bool {
        matches!(self, DownlinkKind::ScreenContent | DownlinkKind::Watermark)
    }
}

/// Why a topic or subject is not part of the contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The string does not have the expected shape (root, number of levels, direction).
    #[error("{what} {input:?} does not match {expected}")]
    Shape {
        /// "MQTT topic" or "NATS subject".
        what: &'static str,
        /// The input, truncated to 128 bytes.
        input: String,
        /// The expected pattern.
        expected: &'static str,
    },
    /// A level holds an invalid identifier.
    #[error("invalid {field}: {source}")]
    Id {
        /// Which level: "building", "device", ...
        field: &'static str,
        /// What is wrong with it.
        #[source]
        source: IdError,
    },
    /// The kind level is not a known message kind for this direction.
    #[error("unknown message kind {0:?}")]
    UnknownKind(String),
}

fn shape(what: &'static str, input: &str, expected: &'static str) -> NameError {
    let mut end = input.len().min(128);
    while !input.is_char_boundary(end) {
        end -= 1;
    }
    NameError::Shape {
        what,
        input: input[..end].to_owned(),
        expected,
    }
}

fn building_at(s: &str) -> Result<BuildingId, NameError> {
    BuildingId::new(s).map_err(|source| NameError::Id {
        field: "building",
        source,
    })
}

fn device_at(s: &str) -> Result<DeviceId, NameError> {
    DeviceId::new(s).map_err(|source| NameError::Id {
        field: "device",
        source,
    })
}

/// Splits `s` on `sep` into exactly `N` parts.
fn split_exact<const N: usize>(s: &str, sep: char) -> Option<[&str; N]> {
    let mut out = [""; N];
    let mut parts = s.split(sep);
    for slot in out.iter_mut() {
        *slot = parts.next()?;
    }
    parts.next().is_none().then_some(out)
}

/// A message a device sent: who, from which building, of which kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Uplink {
    /// Building of the device.
    pub building: BuildingId,
    /// The device.
    pub device: DeviceId,
    /// Message kind.
    pub kind: UplinkKind,
}

const UPLINK_TOPIC: &str = "lw/v1/{building}/{device}/up/{kind}";
const UPLINK_SUBJECT: &str = "lw.v1.up.{building}.{device}.{kind}";

impl Uplink {
    /// Parses an uplink MQTT topic `lw/v1/{building}/{device}/up/{kind}`.
    pub fn from_mqtt_topic(topic: &str) -> Result<Self, NameError> {
        let Some(["lw", "v1", building, device, "up", kind]) = split_exact::<6>(topic, '/') else {
            return Err(shape("MQTT topic", topic, UPLINK_TOPIC));
        };
        Ok(Uplink {
            building: building_at(building)?,
            device: device_at(device)?,
            kind: kind.parse()?,
        })
    }

    /// Parses an uplink NATS subject `lw.v1.up.{building}.{device}.{kind}`.
    pub fn from_nats_subject(subject: &str) -> Result<Self, NameError> {
        let Some(["lw", "v1", "up", building, device, kind]) = split_exact::<6>(subject, '.')
        else {
            return Err(shape("NATS subject", subject, UPLINK_SUBJECT));
        };
        Ok(Uplink {
            building: building_at(building)?,
            device: device_at(device)?,
            kind: kind.parse()?,
        })
    }

    /// The MQTT topic the device publishes on.
    pub fn mqtt_topic(&self) -> String {
        format!(
            "{MQTT_ROOT}/{}/{}/up/{}",
            self.building, self.device, self.kind
        )
    }

    /// The NATS subject the gateway bridges it to.
    pub fn nats_subject(&self) -> String {
        format!(
            "{NATS_ROOT}.up.{}.{}.{}",
            self.building, self.device, self.kind
        )
    }
}

/// Who a downlink message is addressed to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Audience {
    /// One device.
    Device(DeviceId),
    /// Every device of the building (e.g. a notice for all in-cabin screens).
    Building,
}

impl Audience {
    fn as_str(&self) -> &str {
        match self {
            Audience::Device(d) => d.as_str(),
            Audience::Building => ALL_DEVICES,
        }
    }

    fn parse(s: &str) -> Result<Self, NameError> {
        if s == ALL_DEVICES {
            Ok(Audience::Building)
        } else {
            device_at(s).map(Audience::Device)
        }
    }
}

/// A message for one device or for every device of a building.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Downlink {
    /// Building addressed.
    pub building: BuildingId,
    /// One device of it, or all of them.
    pub audience: Audience,
    /// Message kind.
    pub kind: DownlinkKind,
}

const DOWNLINK_TOPIC: &str = "lw/v1/{building}/{device|_all}/down/{kind}";
const DOWNLINK_SUBJECT: &str = "lw.v1.down.{building}.{device|_all}.{kind}";

impl Downlink {
    /// Parses a downlink NATS subject `lw.v1.down.{building}.{device|_all}.{kind}`.
    pub fn from_nats_subject(subject: &str) -> Result<Self, NameError> {
        let Some(["lw", "v1", "down", building, audience, kind]) = split_exact::<6>(subject, '.')
        else {
            return Err(shape("NATS subject", subject, DOWNLINK_SUBJECT));
        };
        Ok(Downlink {
            building: building_at(building)?,
            audience: Audience::parse(audience)?,
            kind: kind.parse()?,
        })
    }

    /// Parses a downlink MQTT topic `lw/v1/{building}/{device|_all}/down/{kind}`.
    pub fn from_mqtt_topic(topic: &str) -> Result<Self, NameError> {
        let Some(["lw", "v1", building, audience, "down", kind]) = split_exact::<6>(topic, '/')
        else {
            return Err(shape("MQTT topic", topic, DOWNLINK_TOPIC));
        };
        Ok(Downlink {
            building: building_at(building)?,
            audience: Audience::parse(audience)?,
            kind: kind.parse()?,
        })
    }

    /// The NATS subject services publish on.
    pub fn nats_subject(&self) -> String {
        format!(
            "{NATS_ROOT}.down.{}.{}.{}",
            self.building,
            self.audience.as_str(),
            self.kind
        )
    }

    /// The MQTT topic the device subscribes to.
    pub fn mqtt_topic(&self) -> String {
        format!(
            "{MQTT_ROOT}/{}/{}/down/{}",
            self.building,
            self.audience.as_str(),
            self.kind
        )
    }
}

/// MQTT subscription filters a device may hold: its own downlink topics and its building's
/// broadcast topics. Anything else is refused by the gateway.
pub fn device_downlink_filters(building: &BuildingId, device: &DeviceId) -> [String; 2] {
    [
        format!("{MQTT_ROOT}/{building}/{device}/down/+"),
        format!("{MQTT_ROOT}/{building}/{ALL_DEVICES}/down/+"),
    ]
}

/// The NATS subject filter covering every device's uplink (the `LW_UPLINK` stream).
pub const UPLINK_FILTER: &str = "lw.v1.up.>";
/// The NATS subject filter covering every downlink message (what gateways subscribe to).
pub const DOWNLINK_FILTER: &str = "lw.v1.down.>";
/// The NATS subject filter covering every dead letter (the `LW_DLQ` stream).
pub const DEAD_LETTER_FILTER: &str = "lw.v1.dlq.>";
/// The NATS subject filter covering every presence change.
pub const PRESENCE_FILTER: &str = "lw.v1.presence.>";

/// Subject on which a gateway announces a device's presence change.
pub fn presence_subject(building: &BuildingId, device: &DeviceId) -> String {
    format!("{NATS_ROOT}.presence.{building}.{device}")
}

/// The NATS subject filter covering every gateway heartbeat.
pub const GATEWAY_HEARTBEAT_FILTER: &str = "lw.v1.gateway.*.heartbeat";

/// Subject of gateway `gateway_id`'s heartbeats (core NATS, never stored).
pub fn gateway_heartbeat_subject(gateway_id: &str) -> Result<String, NameError> {
    gateway_subject(gateway_id, "heartbeat")
}

/// Subject on which gateway `gateway_id` takes presence refresh requests (core NATS).
pub fn gateway_refresh_subject(gateway_id: &str) -> Result<String, NameError> {
    gateway_subject(gateway_id, "presence-refresh")
}

fn gateway_subject(gateway_id: &str, endpoint: &str) -> Result<String, NameError> {
    validate_id(gateway_id).map_err(|source| NameError::Id {
        field: "gateway_id",
        source,
    })?;
    Ok(format!("{NATS_ROOT}.gateway.{gateway_id}.{endpoint}"))
}

/// Subject of dead letters from `source` (a component name such as `gateway`).
pub fn dead_letter_subject(source: &str) -> Result<String, NameError> {
    validate_id(source).map_err(|source| NameError::Id {
        field: "source",
        source,
    })?;
    Ok(format!("{NATS_ROOT}.dlq.{source}"))
}

/// Subject on which telemetry announces an elevator's new live state.
pub fn state_subject(building: &BuildingId, device: &DeviceId) -> String {
    format!("{NATS_ROOT}.state.{building}.{device}")
}

/// Subject filter covering the live-state changes of every elevator of a building.
pub fn building_state_filter(building: &BuildingId) -> String {
    format!("{NATS_ROOT}.state.{building}.*")
}

/// Subject of alerts raised for a building.
pub fn alert_subject(building: &BuildingId) -> String {
    format!("{NATS_ROOT}.alerts.{building}")
}

/// Subject on which report requests are published.
pub const REPORT_REQUEST_SUBJECT: &str = "lw.v1.reports.request";

/// Subject on which a building's finished reports are announced.
pub fn report_ready_subject(building: &BuildingId) -> String {
    format!("{NATS_ROOT}.reports.ready.{building}")
}

/// Request/reply subject of a service endpoint, e.g. `lw.v1.svc.telemetry.live-state`.
pub fn service_subject(service: &str, endpoint: &str) -> Result<String, NameError> {
    for (field, value) in [("service", service), ("endpoint", endpoint)] {
        validate_id(value).map_err(|source| NameError::Id { field, source })?;
    }
    Ok(format!("{NATS_ROOT}.svc.{service}.{endpoint}"))
}

/// JetStream de-duplication id (`Nats-Msg-Id`) of a device's message: `{device}:{seq}`.
/// A device resending a message, or a gateway retrying a publish, yields the same id.
pub fn uplink_msg_id(device: &DeviceId, seq: u64) -> String {
    format!("{device}:{seq}")
}

/// A JetStream stream of the contract: its name and the subjects it captures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSpec {
    /// Stream name.
    pub name: &'static str,
    /// Subject filters captured by the stream.
    pub subjects: &'static [&'static str],
    /// What the stream holds.
    pub description: &'static str,
    /// Messages kept per subject (0: no limit). 1 keeps only the latest, like MQTT retain.
    pub max_msgs_per_subject: i64,
}

/// Everything devices send, durable (file storage), de-duplicated on [`uplink_msg_id`].
pub const UPLINK_STREAM: StreamSpec = StreamSpec {
    name: "LW_UPLINK",
    subjects: &[UPLINK_FILTER],
    description: "device uplink: telemetry, events, acknowledgements, command results",
    max_msgs_per_subject: 0,
};

/// Messages rejected by any component, with their reason.
pub const DEAD_LETTER_STREAM: StreamSpec = StreamSpec {
    name: "LW_DLQ",
    subjects: &[DEAD_LETTER_FILTER],
    description: "dead letters: rejected messages with the reason and device id",
    max_msgs_per_subject: 0,
};

/// Presence changes from the gateways, durable, so that a change published while no telemetry
/// replica runs, or while one fails to record it, is still recorded.
pub const PRESENCE_STREAM: StreamSpec = StreamSpec {
    name: "LW_PRESENCE",
    subjects: &[PRESENCE_FILTER],
    description: "device presence changes (online, offline with reason) from the gateways",
    max_msgs_per_subject: 0,
};

/// The latest downlink message of each retained kind per device (and per building broadcast),
/// so a gateway replica that starts later still hands a reconnecting screen its current content.
pub const RETAINED_STREAM: StreamSpec = StreamSpec {
    name: "LW_RETAINED",
    subjects: &["lw.v1.down.*.*.screen-content", "lw.v1.down.*.*.watermark"],
    description: "latest retained downlink message per device and kind",
    max_msgs_per_subject: 1,
};

/// NATS subject filter matching downlink messages of `kind` for every device and building.
pub fn downlink_kind_filter(kind: DownlinkKind) -> String {
    format!("{NATS_ROOT}.down.*.*.{kind}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id_strategy() -> impl Strategy<Value = String> {
        "[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
    }

    fn uplink_kind() -> impl Strategy<Value = UplinkKind> {
        proptest::sample::select(UplinkKind::ALL)
    }

    fn downlink_kind() -> impl Strategy<Value = DownlinkKind> {
        proptest::sample::select(DownlinkKind::ALL)
    }

    /// A topic level that is often valid and often hostile, so that both paths get exercised.
    fn topic_level() -> impl Strategy<Value = String> {
        prop_oneof![
            id_strategy(),
            "[a-z0-9./*>+# _-]{0,6}",
            Just("up".to_owned()),
            proptest::sample::select(UplinkKind::ALL).prop_map(|k| k.as_str().to_owned()),
        ]
    }

    fn is_plain_token(t: &str) -> bool {
        validate_id(t).is_ok() || t == ALL_DEVICES
    }

    proptest! {
        #[test]
        fn uplink_round_trips_topic_subject_topic(b in id_strategy(), d in id_strategy(), k in uplink_kind()) {
            let up = Uplink { building: BuildingId::new(b).unwrap(), device: DeviceId::new(d).unwrap(), kind: k };
            let topic = up.mqtt_topic();
            let from_topic = Uplink::from_mqtt_topic(&topic).unwrap();
            prop_assert_eq!(&from_topic, &up);
            let subject = from_topic.nats_subject();
            prop_assert_eq!(Uplink::from_nats_subject(&subject).unwrap(), up);
        }

        #[test]
        fn downlink_round_trips_subject_topic_subject(b in id_strategy(), d in proptest::option::of(id_strategy()), k in downlink_kind()) {
            let audience = d.map_or(Audience::Building, |d| Audience::Device(DeviceId::new(d).unwrap()));
            let down = Downlink { building: BuildingId::new(b).unwrap(), audience, kind: k };
            let subject = down.nats_subject();
            let from_subject = Downlink::from_nats_subject(&subject).unwrap();
            prop_assert_eq!(&from_subject, &down);
            prop_assert_eq!(Downlink::from_mqtt_topic(&from_subject.mqtt_topic()).unwrap(), down);
        }

        /// Whatever a device publishes on, an accepted topic yields a subject of exactly six plain
        /// tokens inside `lw.v1.up.{building}.{device}`: no wildcard, no extra level.
        #[test]
        fn any_accepted_topic_stays_in_its_device_namespace(levels in proptest::collection::vec(topic_level(), 1..8)) {
            let topic = format!("lw/v1/{}", levels.join("/"));
            if let Ok(up) = Uplink::from_mqtt_topic(&topic) {
                prop_assert_eq!(up.mqtt_topic(), topic);
                let subject = up.nats_subject();
                let tokens: Vec<&str> = subject.split('.').collect();
                prop_assert_eq!(tokens.len(), 6);
                prop_assert_eq!(&tokens[..3], &["lw", "v1", "up"]);
                prop_assert_eq!(tokens[3], up.building.as_str());
                prop_assert_eq!(tokens[4], up.device.as_str());
                prop_assert!(tokens.iter().all(|t| is_plain_token(t) || UplinkKind::ALL.iter().any(|k| k.as_str() == *t)));
            }
        }

        /// An identifier with any forbidden character is rejected wherever it appears.
        #[test]
        fn forbidden_characters_are_rejected(prefix in "[a-z0-9]{0,5}", bad in "[./*>+# \t\n\r]|\u{00e9}|\u{0}", suffix in "[a-z0-9]{0,5}", k in uplink_kind()) {
            let id = format!("{prefix}{bad}{suffix}");
            prop_assert!(validate_id(&id).is_err());
            let as_building = format!("lw/v1/{id}/dev/up/{k}");
            let as_device = format!("lw/v1/bldg/{id}/up/{k}");
            prop_assert!(Uplink::from_mqtt_topic(&as_building).is_err());
            prop_assert!(Uplink::from_mqtt_topic(&as_device).is_err());
            let as_subject = format!("lw.v1.down.bldg.{id}.command");
            prop_assert!(Downlink::from_nats_subject(&as_subject).is_err());
        }
    }

    #[test]
    fn rejects_wildcards_empty_levels_and_wrong_shapes() {
        for topic in [
            "lw/v1/b/d/up/telemetry/extra",
            "lw/v1/b//up/telemetry",
            "lw/v1/b/+/up/telemetry",
            "lw/v1/b/#",
            "lw/v1/b/d/down/command",
            "lw/v2/b/d/up/telemetry",
            "/lw/v1/b/d/up/telemetry",
            "lw/v1/b/d/up/unknown",
            "lw/v1/b/_all/up/event",
            "lw/v1/b.x/d/up/event",
            "",
        ] {
            assert!(
                Uplink::from_mqtt_topic(topic).is_err(),
                "{topic:?} was accepted"
            );
        }
    }

    #[test]
    fn identifier_errors_say_what_is_wrong() {
        assert_eq!(validate_id(""), Err(IdError::Empty));
        assert_eq!(
            validate_id(&"a".repeat(65)),
            Err(IdError::TooLong { len: 65 })
        );
        assert_eq!(
            validate_id("a.b"),
            Err(IdError::InvalidChar { ch: '.', at: 1 })
        );
        assert_eq!(
            validate_id("_all"),
            Err(IdError::InvalidChar { ch: '_', at: 0 })
        );
        assert!(validate_id(&"a".repeat(64)).is_ok());
        let err = Uplink::from_mqtt_topic("lw/v1/b/d*/up/event").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid device: identifier contains '*' at byte 1; allowed are ASCII letters, digits, '-' and '_' (not first)"
        );
    }

    #[test]
    fn building_wide_downlink_uses_the_reserved_audience() {
        let down = Downlink::from_nats_subject("lw.v1.down.b1._all.screen-content").unwrap();
        assert_eq!(down.audience, Audience::Building);
        assert_eq!(down.mqtt_topic(), "lw/v1/b1/_all/down/screen-content");
        assert!(down.kind.retained());
        assert!(!DownlinkKind::Command.retained());
    }

    #[test]
    fn device_filters_cover_only_its_own_and_broadcast_topics() {
        let b = BuildingId::new("b1").unwrap();
        let d = DeviceId::new("scr-1").unwrap();
        assert_eq!(
            device_downlink_filters(&b, &d),
            ["lw/v1/b1/scr-1/down/+", "lw/v1/b1/_all/down/+"]
        );
    }

    #[test]
    fn retained_stream_covers_exactly_the_retained_kinds() {
        let retained: Vec<String> = DownlinkKind::ALL
            .iter()
            .filter(|k| k.retained())
            .map(|k| downlink_kind_filter(*k))
            .collect();
        assert_eq!(retained, RETAINED_STREAM.subjects);
    }

    #[test]
    fn other_subjects_validate_their_tokens() {
        assert_eq!(dead_letter_subject("gateway").unwrap(), "lw.v1.dlq.gateway");
        assert!(dead_letter_subject("gate.way").is_err());
        assert_eq!(
            service_subject("telemetry", "live-state").unwrap(),
            "lw.v1.svc.telemetry.live-state"
        );
        assert!(service_subject("telemetry", ">").is_err());
        assert_eq!(
            uplink_msg_id(&DeviceId::new("elev-1").unwrap(), 7),
            "elev-1:7"
        );
    }
}
