//! Whatever topic or filter a device sends, the gateway never maps it outside the device's own
//! namespace: an accepted publish topic becomes exactly `lw.v1.up.{building}.{device}.{kind}`
//! of the authenticated device, an accepted filter covers only its own or its building's
//! downlink, and a downlink subject maps to a wildcard-free topic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use liftwire_gateway::acl::{check_publish, check_subscribe, DeviceKind, Identity};
use liftwire_proto::naming::{BuildingId, DeviceId, Downlink, Uplink};

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else { return };
    let (Ok(device), Ok(building)) = (DeviceId::new("elev-1"), BuildingId::new("b1")) else { return };
    let me = Identity { device, building, kind: DeviceKind::Elevator };

    if let Ok(uplink) = check_publish(&me, input) {
        assert_eq!(uplink.mqtt_topic(), input);
        assert_eq!(uplink.nats_subject(), format!("lw.v1.up.b1.elev-1.{}", uplink.kind));
    }
    if check_subscribe(&me, input).is_ok() {
        assert!(!input.contains('#'));
        assert!(input.starts_with("lw/v1/b1/elev-1/down/") || input.starts_with("lw/v1/b1/_all/down/"));
    }
    if let Ok(uplink) = Uplink::from_mqtt_topic(input) {
        let subject = uplink.nats_subject();
        assert_eq!(subject.split('.').count(), 6);
        assert!(!subject.contains(['*', '>', ' ', '/']));
    }
    if let Ok(down) = Downlink::from_nats_subject(input) {
        let topic = down.mqtt_topic();
        assert_eq!(topic.split('/').count(), 6);
        assert!(!topic.contains(['+', '#', ' ', '.']));
        assert_eq!(down.nats_subject(), input);
    }
});
