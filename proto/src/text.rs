//! The text a device sends, checked for what the backend cannot store.
//!
//! PostgreSQL refuses a NUL character in `text`, and protobuf strings may hold one. A device
//! message carrying one would fail every transaction it is part of, be redelivered for ever and
//! stop its device's watermark: it is refused at the door instead ([`nul_in_text`]).

use crate::v1;

/// Every string field a device can send, as `Message.field`: what [`nul_in_text`] looks at.
/// A test compares it with the compiled schema, so a new string field cannot be missed.
pub const DEVICE_TEXT_FIELDS: &[&str] = &[
    "Envelope.device_id",
    "ScreenAck.content_id",
    "CommandResult.command_id",
    "CommandResult.detail",
    "ObjectRef.bucket",
    "ObjectRef.key",
    "ObjectRef.content_type",
    "PresignedUrl.url",
    "PresignedUrl.method",
    "UploadRequest.request_id",
    "UploadRequest.content_type",
    "UploadRequest.purpose",
    "FaultRaised.fault_id",
    "FaultRaised.vendor_code",
    "FaultRaised.description",
    "FaultCleared.fault_id",
    "FaultCleared.vendor_code",
    "AlarmSelfTest.detail",
    "EntrapmentStarted.entrapment_id",
    "EntrapmentReleased.entrapment_id",
    "MaintenanceVisitStarted.visit_id",
    "MaintenanceVisitStarted.technician",
    "MaintenanceVisitEnded.visit_id",
    "MaintenanceVisitEnded.notes",
];

/// The first of `envelope`'s string fields (as in [`DEVICE_TEXT_FIELDS`]) that holds a NUL
/// character, if any.
pub fn nul_in_text(envelope: &v1::Envelope) -> Option<&'static str> {
    use v1::envelope::Body;
    use v1::event::Kind;
    let mut texts: [(&'static str, &str); 4] = [("", ""); 4];
    let fields: &[(&'static str, &str)] = match &envelope.body {
        None | Some(Body::Telemetry(_)) => &[],
        Some(Body::ScreenAck(a)) => {
            texts[0] = ("ScreenAck.content_id", &a.content_id);
            &texts[..1]
        }
        Some(Body::CommandResult(r)) => {
            if let Some(field) = r.output.as_ref().and_then(nul_in_object) {
                return Some(field);
            }
            texts[0] = ("CommandResult.command_id", &r.command_id);
            texts[1] = ("CommandResult.detail", &r.detail);
            &texts[..2]
        }
        Some(Body::UploadRequest(r)) => {
            texts[0] = ("UploadRequest.request_id", &r.request_id);
            texts[1] = ("UploadRequest.content_type", &r.content_type);
            texts[2] = ("UploadRequest.purpose", &r.purpose);
            &texts[..3]
        }
        Some(Body::Event(v1::Event { kind })) => match kind {
            Some(Kind::FaultRaised(f)) => {
                texts[0] = ("FaultRaised.fault_id", &f.fault_id);
                texts[1] = ("FaultRaised.vendor_code", &f.vendor_code);
                texts[2] = ("FaultRaised.description", &f.description);
                &texts[..3]
            }
            Some(Kind::FaultCleared(f)) => {
                texts[0] = ("FaultCleared.fault_id", &f.fault_id);
                texts[1] = ("FaultCleared.vendor_code", &f.vendor_code);
                &texts[..2]
            }
            Some(Kind::AlarmSelfTest(t)) => {
                texts[0] = ("AlarmSelfTest.detail", &t.detail);
                &texts[..1]
            }
            Some(Kind::EntrapmentStarted(e)) => {
                texts[0] = ("EntrapmentStarted.entrapment_id", &e.entrapment_id);
                &texts[..1]
            }
            Some(Kind::EntrapmentReleased(e)) => {
                texts[0] = ("EntrapmentReleased.entrapment_id", &e.entrapment_id);
                &texts[..1]
            }
            Some(Kind::MaintenanceVisitStarted(v)) => {
                texts[0] = ("MaintenanceVisitStarted.visit_id", &v.visit_id);
                texts[1] = ("MaintenanceVisitStarted.technician", &v.technician);
                &texts[..2]
            }
            Some(Kind::MaintenanceVisitEnded(v)) => {
                texts[0] = ("MaintenanceVisitEnded.visit_id", &v.visit_id);
                texts[1] = ("MaintenanceVisitEnded.notes", &v.notes);
                &texts[..2]
            }
            Some(
                Kind::TripCompleted(_)
                | Kind::DoorCycle(_)
                | Kind::AlarmButtonPressed(_)
                | Kind::ModeChanged(_)
                | Kind::PowerLost(_)
                | Kind::PowerRestored(_),
            )
            | None => &[],
        },
    };
    std::iter::once(("Envelope.device_id", envelope.device_id.as_str()))
        .chain(fields.iter().copied())
        .find(|(_, text)| text.contains('\0'))
        .map(|(field, _)| field)
}

fn nul_in_object(object: &v1::ObjectRef) -> Option<&'static str> {
    let presigned = object.presigned.as_ref();
    [
        ("ObjectRef.bucket", object.bucket.as_str()),
        ("ObjectRef.key", &object.key),
        ("ObjectRef.content_type", &object.content_type),
        ("PresignedUrl.url", presigned.map_or("", |p| &p.url)),
        ("PresignedUrl.method", presigned.map_or("", |p| &p.method)),
    ]
    .into_iter()
    .find(|(_, text)| text.contains('\0'))
    .map(|(field, _)| field)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use prost_types::field_descriptor_proto::Type;
    use std::collections::BTreeSet;

    /// Every string field reachable from `liftwire.v1.Envelope` in the compiled schema.
    fn schema_text_fields() -> BTreeSet<String> {
        let set = prost_types::FileDescriptorSet::decode(
            &include_bytes!(concat!(env!("OUT_DIR"), "/liftwire.fds"))[..],
        )
        .expect("the build script's descriptor set");
        let messages: std::collections::BTreeMap<String, &prost_types::DescriptorProto> = set
            .file
            .iter()
            .filter(|f| f.package() == "liftwire.v1")
            .flat_map(|f| f.message_type.iter())
            .map(|m| (format!(".liftwire.v1.{}", m.name()), m))
            .collect();
        let mut found = BTreeSet::new();
        let mut todo = vec![".liftwire.v1.Envelope".to_owned()];
        let mut seen = BTreeSet::new();
        while let Some(name) = todo.pop() {
            let Some(message) = messages.get(&name).filter(|_| seen.insert(name.clone())) else {
                continue;
            };
            for field in &message.field {
                match field.r#type() {
                    Type::String => {
                        found.insert(format!("{}.{}", message.name(), field.name()));
                    }
                    Type::Message => todo.push(field.type_name().to_owned()),
                    _ => {}
                }
            }
        }
        found
    }

    #[test]
    fn the_list_is_every_string_field_a_device_can_send() {
        let listed: BTreeSet<String> = DEVICE_TEXT_FIELDS.iter().map(|f| f.to_string()).collect();
        assert_eq!(listed, schema_text_fields());
    }

    fn envelope(body: v1::envelope::Body) -> v1::Envelope {
        v1::Envelope {
            device_id: "elev-1".into(),
            seq: 1,
            body: Some(body),
            ..Default::default()
        }
    }

    #[test]
    fn a_nul_anywhere_in_a_device_text_is_found_and_named() {
        use v1::envelope::Body;
        use v1::event::Kind;
        let fault = |description: &str| {
            envelope(Body::Event(v1::Event {
                kind: Some(Kind::FaultRaised(v1::FaultRaised {
                    fault_id: "f-1".into(),
                    vendor_code: "E42".into(),
                    description: description.into(),
                    ..Default::default()
                })),
            }))
        };
        assert_eq!(nul_in_text(&fault("door jammed")), None);
        assert_eq!(
            nul_in_text(&fault("door\0jammed")),
            Some("FaultRaised.description")
        );
        let visit = envelope(Body::Event(v1::Event {
            kind: Some(Kind::MaintenanceVisitEnded(v1::MaintenanceVisitEnded {
                visit_id: "v-1".into(),
                notes: "\0".into(),
            })),
        }));
        assert_eq!(nul_in_text(&visit), Some("MaintenanceVisitEnded.notes"));
        let result = envelope(Body::CommandResult(v1::CommandResult {
            command_id: "c-1".into(),
            detail: "ok".into(),
            output: Some(v1::ObjectRef {
                key: "diag/\0.tar".into(),
                ..Default::default()
            }),
            ..Default::default()
        }));
        assert_eq!(nul_in_text(&result), Some("ObjectRef.key"));
        let mut telemetry = envelope(Body::Telemetry(v1::Telemetry::default()));
        assert_eq!(nul_in_text(&telemetry), None);
        telemetry.device_id = "elev\0".into();
        assert_eq!(nul_in_text(&telemetry), Some("Envelope.device_id"));
    }
}
