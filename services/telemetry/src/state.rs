//! Live elevator state: a fold of a device's messages in sequence order.

use liftwire_proto::v1::{self, envelope::Body, event::Kind};

/// Applies one message to the state (messages must come in sequence order, each once).
pub fn apply(state: &mut v1::ElevatorState, envelope: &v1::Envelope) {
    state.applied_seq = envelope.seq;
    if let Some(t) = envelope.device_time {
        if state
            .last_seen
            .is_none_or(|last| (t.seconds, t.nanos) > (last.seconds, last.nanos))
        {
            state.last_seen = Some(t);
        }
    }
    match &envelope.body {
        Some(Body::Telemetry(t)) => {
            state.mode = t.mode;
            state.floor = t.floor;
            state.direction = t.direction;
            state.doors = t.doors.clone();
            state.load_percent = t.load_percent;
        }
        Some(Body::Event(v1::Event { kind: Some(kind) })) => match kind {
            // A fault raised again under the same id stays one open fault.
            Kind::FaultRaised(f) if !state.open_faults.iter().any(|o| o.fault_id == f.fault_id) => {
                state.open_faults.push(v1::OpenFault {
                    fault_id: f.fault_id.clone(),
                    code: f.code,
                    vendor_code: f.vendor_code.clone(),
                    blocking: f.blocking,
                    raised_at: envelope.device_time,
                });
            }
            Kind::FaultCleared(f) => state.open_faults.retain(|o| o.fault_id != f.fault_id),
            Kind::EntrapmentStarted(_) => state.entrapment = true,
            Kind::EntrapmentReleased(_) => state.entrapment = false,
            Kind::ModeChanged(m) => state.mode = m.to,
            Kind::PowerLost(_) => state.power_lost = true,
            Kind::PowerRestored(_) => state.power_lost = false,
            _ => {}
        },
        _ => {}
    }
    state.in_service = state.mode == v1::OperatingMode::Normal as i32
        && !state.entrapment
        && !state.power_lost
        && !state.open_faults.iter().any(|f| f.blocking);
}

#[cfg(test)]
mod tests {
    use super::*;
    use liftwire_proto::Timestamp;

    fn envelope(seq: u64, body: Body) -> v1::Envelope {
        v1::Envelope {
            schema_version: 1,
            device_id: "e".into(),
            seq,
            device_time: Some(Timestamp {
                seconds: 1_795_000_000 + seq as i64,
                nanos: 0,
            }),
            body: Some(body),
        }
    }

    fn event(kind: Kind) -> Body {
        Body::Event(v1::Event { kind: Some(kind) })
    }

    #[test]
    fn folds_faults_entrapments_power_and_mode() {
        let mut state = v1::ElevatorState::default();
        apply(
            &mut state,
            &envelope(
                1,
                Body::Telemetry(v1::Telemetry {
                    mode: v1::OperatingMode::Normal as i32,
                    floor: 3,
                    ..Default::default()
                }),
            ),
        );
        assert!(state.in_service);
        assert_eq!(state.floor, 3);

        apply(
            &mut state,
            &envelope(
                2,
                event(Kind::FaultRaised(v1::FaultRaised {
                    fault_id: "f1".into(),
                    blocking: true,
                    ..Default::default()
                })),
            ),
        );
        apply(
            &mut state,
            &envelope(
                3,
                event(Kind::EntrapmentStarted(v1::EntrapmentStarted::default())),
            ),
        );
        assert!(!state.in_service && state.entrapment);
        assert_eq!(state.open_faults.len(), 1);

        apply(
            &mut state,
            &envelope(
                4,
                event(Kind::EntrapmentReleased(v1::EntrapmentReleased::default())),
            ),
        );
        assert!(!state.in_service, "the blocking fault is still open");
        apply(
            &mut state,
            &envelope(
                5,
                event(Kind::FaultCleared(v1::FaultCleared {
                    fault_id: "f1".into(),
                    ..Default::default()
                })),
            ),
        );
        assert!(state.in_service && state.open_faults.is_empty());

        apply(
            &mut state,
            &envelope(6, event(Kind::PowerLost(v1::PowerLost {}))),
        );
        assert!(!state.in_service && state.power_lost);
        apply(
            &mut state,
            &envelope(7, event(Kind::PowerRestored(v1::PowerRestored::default()))),
        );
        apply(
            &mut state,
            &envelope(
                8,
                event(Kind::ModeChanged(v1::ModeChanged {
                    from: 1,
                    to: v1::OperatingMode::Inspection as i32,
                })),
            ),
        );
        assert!(!state.in_service, "inspection is not service");
        assert_eq!(
            (state.applied_seq, state.last_seen.unwrap().seconds),
            (8, 1_795_000_008)
        );
    }
}
