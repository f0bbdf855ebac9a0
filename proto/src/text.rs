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
    if envelope.device_id.contains('\0') {
        return Some("Envelope.device_id");
    }
    match &envelope.body {
        None | Some(Body::Telemetry(_)) => None,
        Some(Body::ScreenAck(a)) => first_nul(&[("ScreenAck.content_id", &a.content_id)]),
        Some(Body::CommandResult(r)) => r.output.as_ref().and_then(nul_in_object).or_else(|| {
            first_nul(&[
                ("CommandResult.command_id", &r.command_id),
                ("CommandResult.detail", &r.detail),
            ])
        }),
        Some(Body::UploadRequest(r)) => first_nul(&[
            ("UploadRequest.request_id", &r.request_id),
            ("UploadRequest.content_type", &r.content_type),
            ("UploadRequest.purpose", &r.purpose),
        ]),
        Some(Body::Event(v1::Event { kind })) => match kind {
            Some(Kind::FaultRaised(f)) => first_nul(&[
                ("FaultRaised.fault_id", &f.fault_id),
                ("FaultRaised.vendor_code", &f.vendor_code),
                ("FaultRaised.description", &f.description),
            ]),
            Some(Kind::FaultCleared(f)) => first_nul(&[
                ("FaultCleared.fault_id", &f.fault_id),
                ("FaultCleared.vendor_code", &f.vendor_code),
            ]),
            Some(Kind::AlarmSelfTest(t)) => first_nul(&[("AlarmSelfTest.detail", &t.detail)]),
            Some(Kind::EntrapmentStarted(e)) => {
                first_nul(&[("EntrapmentStarted.entrapment_id", &e.entrapment_id)])
            }
            Some(Kind::EntrapmentReleased(e)) => {
                first_nul(&[("EntrapmentReleased.entrapment_id", &e.entrapment_id)])
            }
            Some(Kind::MaintenanceVisitStarted(v)) => first_nul(&[
                ("MaintenanceVisitStarted.visit_id", &v.visit_id),
                ("MaintenanceVisitStarted.technician", &v.technician),
            ]),
            Some(Kind::MaintenanceVisitEnded(v)) => first_nul(&[
                ("MaintenanceVisitEnded.visit_id", &v.visit_id),
                ("MaintenanceVisitEnded.notes", &v.notes),
            ]),
            Some(
                Kind::TripCompleted(_)
                | Kind::DoorCycle(_)
                | Kind::AlarmButtonPressed(_)
                | Kind::ModeChanged(_)
                | Kind::PowerLost(_)
                | Kind::PowerRestored(_),
            )
            | None => None,
        },
    }
}

fn nul_in_object(object: &v1::ObjectRef) -> Option<&'static str> {
    let presigned = object.presigned.as_ref();
    first_nul(&[
        ("ObjectRef.bucket", &object.bucket),
        ("ObjectRef.key", &object.key),
        ("ObjectRef.content_type", &object.content_type),
        ("PresignedUrl.url", presigned.map_or("", |p| &p.url)),
        ("PresignedUrl.method", presigned.map_or("", |p| &p.method)),
    ])
}

/// The name of the first of `fields` whose text holds a NUL character.
fn first_nul(fields: &[(&'static str, &str)]) -> Option<&'static str> {
    fields
        .iter()
        .find(|(_, text)| text.contains('\0'))
        .map(|(field, _)| *field)
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
