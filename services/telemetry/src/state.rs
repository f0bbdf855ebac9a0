//! Live elevator state: a fold of a device's messages in sequence order, each applied exactly
//! once. Besides the new state, applying a message yields the [`Effect`]s it implies: incidents
//! that open or close, alerts to raise or resolve. The fold is pure; `store` writes its effects in
//! the same transaction as the messages.

use std::time::Duration;

use chrono::{DateTime, Utc};
use liftwire_proto::v1::{self, envelope::Body, event::Kind};

/// What kind of period an incident is (the `incidents.kind` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IncidentKind {
    /// Out of service, whatever the cause.
    Downtime,
    /// A fault was active.
    Fault,
    /// Passengers trapped, from the alarm to their release.
    Entrapment,
    /// A technician on site.
    Maintenance,
    /// Mains power off.
    PowerLoss,
}

impl IncidentKind {
    /// Column value.
    pub fn as_str(self) -> &'static str {
        match self {
            IncidentKind::Downtime => "downtime",
            IncidentKind::Fault => "fault",
            IncidentKind::Entrapment => "entrapment",
            IncidentKind::Maintenance => "maintenance",
            IncidentKind::PowerLoss => "power_loss",
        }
    }

    /// Parses a column value.
    pub fn parse(s: &str) -> Option<Self> {
        [
            IncidentKind::Downtime,
            IncidentKind::Fault,
            IncidentKind::Entrapment,
            IncidentKind::Maintenance,
            IncidentKind::PowerLoss,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    /// Wire value.
    pub fn to_proto(self) -> v1::IncidentKind {
        match self {
            IncidentKind::Downtime => v1::IncidentKind::Downtime,
            IncidentKind::Fault => v1::IncidentKind::Fault,
            IncidentKind::Entrapment => v1::IncidentKind::Entrapment,
            IncidentKind::Maintenance => v1::IncidentKind::Maintenance,
            IncidentKind::PowerLoss => v1::IncidentKind::PowerLoss,
        }
    }
}

/// An incident that starts.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenIncident {
    /// Kind.
    pub kind: IncidentKind,
    /// Planned maintenance (for downtime: began during a planned visit).
    pub planned: bool,
    /// Downtime cause, or the fault's description.
    pub cause: String,
    /// Controller id (fault, entrapment or visit id); empty for downtime and power loss.
    pub ref_id: String,
    /// Fault class (faults only).
    pub code: i32,
    /// Vendor fault code (faults only).
    pub vendor_code: String,
    /// Start.
    pub at: DateTime<Utc>,
}

/// Alert rules (the `alerts.rule` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlertRule {
    /// Passengers trapped.
    Entrapment,
    /// Out of service longer than a threshold.
    OutOfService,
    /// No passed alarm self-test for 3 days, or a failed one.
    SelfTestMissed,
    /// Several faults within a short window.
    FaultBurst,
    /// Offline longer than a threshold.
    DeviceOffline,
}

impl AlertRule {
    /// Every rule.
    pub const ALL: [AlertRule; 5] = [
        AlertRule::Entrapment,
        AlertRule::OutOfService,
        AlertRule::SelfTestMissed,
        AlertRule::FaultBurst,
        AlertRule::DeviceOffline,
    ];

    /// Column value.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertRule::Entrapment => "entrapment",
            AlertRule::OutOfService => "out_of_service",
            AlertRule::SelfTestMissed => "self_test_missed",
            AlertRule::FaultBurst => "fault_burst",
            AlertRule::DeviceOffline => "device_offline",
        }
    }

    /// Parses a column value.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Severity of the alerts this rule raises.
    pub fn severity(self) -> v1::AlertSeverity {
        match self {
            AlertRule::Entrapment => v1::AlertSeverity::Critical,
            _ => v1::AlertSeverity::Warning,
        }
    }

    /// Wire value.
    pub fn to_proto(self) -> v1::AlertRule {
        match self {
            AlertRule::Entrapment => v1::AlertRule::Entrapment,
            AlertRule::OutOfService => v1::AlertRule::OutOfService,
            AlertRule::SelfTestMissed => v1::AlertRule::SelfTestMissed,
            AlertRule::FaultBurst => v1::AlertRule::FaultBurst,
            AlertRule::DeviceOffline => v1::AlertRule::DeviceOffline,
        }
    }
}

/// Something a message implies beyond the state itself.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// An incident starts.
    Open(OpenIncident),
    /// The open incident of this kind and controller id ends.
    Close {
        /// Kind.
        kind: IncidentKind,
        /// Controller id (empty for downtime and power loss).
        ref_id: String,
        /// End.
        at: DateTime<Utc>,
    },
    /// Raise an alert (or count one more occurrence of the unresolved one).
    Raise {
        /// Rule.
        rule: AlertRule,
        /// What happened, for people.
        summary: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// Resolve the unresolved alert of this rule, if any.
    Resolve {
        /// Rule.
        rule: AlertRule,
        /// Why it is over.
        note: String,
        /// When.
        at: DateTime<Utc>,
    },
}

/// Thresholds of the rules the fold evaluates.
#[derive(Debug, Clone, Copy)]
pub struct FoldRules {
    /// Faults within `fault_burst_window` that make a burst.
    pub fault_burst_count: usize,
    /// Window of a fault burst.
    pub fault_burst_window: Duration,
    /// An alarm pressed at most this long before an entrapment starts marks its beginning.
    pub alarm_lookback: Duration,
}

impl Default for FoldRules {
    fn default() -> Self {
        Self {
            fault_burst_count: 3,
            fault_burst_window: Duration::from_secs(600),
            alarm_lookback: Duration::from_secs(900),
        }
    }
}

pub use liftwire_proto::{datetime, timestamp_from_datetime as timestamp};

/// Why the elevator is out of service, most specific cause first.
fn downtime_cause(state: &v1::ElevatorState) -> &'static str {
    if state.entrapment {
        "entrapment"
    } else if state.open_faults.iter().any(|f| f.blocking) {
        "fault"
    } else if state.power_lost {
        "power_loss"
    } else if state.maintenance.is_some() {
        "maintenance"
    } else {
        "mode"
    }
}

/// Whether the elevator serves calls. An unknown mode (no telemetry yet) is not held against it.
fn in_service(state: &v1::ElevatorState) -> bool {
    let mode_ok = matches!(
        v1::OperatingMode::try_from(state.mode),
        Ok(v1::OperatingMode::Normal | v1::OperatingMode::Unspecified)
    );
    mode_ok
        && !state.entrapment
        && !state.power_lost
        && state.maintenance.is_none()
        && !state.open_faults.iter().any(|f| f.blocking)
}

/// Open faults an elevator's state keeps; a new one beyond closes the oldest.
pub const MAX_OPEN_FAULTS: usize = 64;

/// Passes over message `seq`, which had nothing to apply (a placeholder of a refused message).
/// A fresh elevator stays presumed in service, as [`apply`] presumes it before its first
/// message: otherwise a refused first message would hide the downtime of the next.
pub fn skip(state: &mut v1::ElevatorState, seq: u64) {
    if state.applied_seq == 0 {
        state.in_service = true;
    }
    state.applied_seq = seq;
}

/// Applies message `seq` of time `at` to the state and appends what it implies to `effects`.
/// Messages must come in sequence order, each once.
pub fn apply(
    state: &mut v1::ElevatorState,
    seq: u64,
    at: DateTime<Utc>,
    envelope: &v1::Envelope,
    rules: &FoldRules,
    effects: &mut Vec<Effect>,
) {
    let was_in_service = state.applied_seq == 0 || state.in_service;
    state.applied_seq = seq;
    let ts = timestamp(at);
    if state
        .last_seen
        .as_ref()
        .and_then(datetime)
        .is_none_or(|last| at > last)
    {
        state.last_seen = Some(ts);
    }
    match &envelope.body {
        Some(Body::Telemetry(t)) => {
            state.mode = t.mode;
            state.floor = t.floor;
            state.direction = t.direction;
            state.doors = t.doors.clone();
            state.load_percent = t.load_percent;
        }
        Some(Body::Event(v1::Event { kind: Some(kind) })) => {
            apply_event(state, kind, at, rules, effects)
        }
        _ => {}
    }
    state.in_service = in_service(state);
    match (was_in_service, state.in_service) {
        (true, false) => {
            let planned = state.maintenance.as_ref().is_some_and(|m| m.planned);
            state.out_of_service_since = Some(ts);
            effects.push(Effect::Open(OpenIncident {
                kind: IncidentKind::Downtime,
                planned,
                cause: downtime_cause(state).into(),
                ref_id: String::new(),
                code: 0,
                vendor_code: String::new(),
                at,
            }));
        }
        (false, true) => {
            state.out_of_service_since = None;
            effects.push(Effect::Close {
                kind: IncidentKind::Downtime,
                ref_id: String::new(),
                at,
            });
            effects.push(Effect::Resolve {
                rule: AlertRule::OutOfService,
                note: "back in service".into(),
                at,
            });
        }
        _ => {}
    }
}

fn apply_event(
    state: &mut v1::ElevatorState,
    kind: &Kind,
    at: DateTime<Utc>,
    rules: &FoldRules,
    effects: &mut Vec<Effect>,
) {
    let ts = timestamp(at);
    match kind {
        Kind::FaultRaised(f) => {
            // A fault raised again under the same id stays one open fault.
            if state.open_faults.iter().any(|o| o.fault_id == f.fault_id) {
                return;
            }
            // Bounded: firmware whose clears get lost would otherwise grow the state, stored
            // and announced with every batch, without end. The oldest non-blocking fault gives
            // way (a blocking one only if all are: one stays, so the car stays out of service).
            if state.open_faults.len() >= MAX_OPEN_FAULTS {
                let evicted = state
                    .open_faults
                    .iter()
                    .position(|f| !f.blocking)
                    .unwrap_or(0);
                let oldest = state.open_faults.remove(evicted);
                effects.push(Effect::Close {
                    kind: IncidentKind::Fault,
                    ref_id: oldest.fault_id,
                    at,
                });
            }
            state.open_faults.push(v1::OpenFault {
                fault_id: f.fault_id.clone(),
                code: f.code,
                vendor_code: f.vendor_code.clone(),
                blocking: f.blocking,
                raised_at: Some(ts),
            });
            effects.push(Effect::Open(OpenIncident {
                kind: IncidentKind::Fault,
                planned: false,
                cause: f.description.clone(),
                ref_id: f.fault_id.clone(),
                code: f.code,
                vendor_code: f.vendor_code.clone(),
                at,
            }));
            let window = chrono::Duration::from_std(rules.fault_burst_window)
                .unwrap_or(chrono::Duration::zero());
            state
                .recent_faults
                .retain(|t| datetime(t).is_some_and(|t| at - t < window));
            state.recent_faults.push(ts);
            // Only whether the burst count is reached matters: keep no more than that.
            let excess = state
                .recent_faults
                .len()
                .saturating_sub(rules.fault_burst_count.max(1));
            state.recent_faults.drain(..excess);
            if state.recent_faults.len() >= rules.fault_burst_count {
                effects.push(Effect::Raise {
                    rule: AlertRule::FaultBurst,
                    summary: format!(
                        "{} faults within {} minutes",
                        state.recent_faults.len(),
                        rules.fault_burst_window.as_secs() / 60
                    ),
                    at,
                });
            }
        }
        Kind::FaultCleared(f) => {
            let before = state.open_faults.len();
            state.open_faults.retain(|o| o.fault_id != f.fault_id);
            if state.open_faults.len() < before {
                effects.push(Effect::Close {
                    kind: IncidentKind::Fault,
                    ref_id: f.fault_id.clone(),
                    at,
                });
            }
        }
        Kind::AlarmButtonPressed(_) => state.last_alarm_at = Some(ts),
        Kind::EntrapmentStarted(e) if !state.entrapment => {
            let lookback = chrono::Duration::from_std(rules.alarm_lookback)
                .unwrap_or(chrono::Duration::zero());
            // From the alarm, when a passenger pressed it shortly before.
            let since = state
                .last_alarm_at
                .as_ref()
                .and_then(datetime)
                .filter(|alarm| *alarm <= at && at - *alarm <= lookback)
                .unwrap_or(at);
            state.entrapment = true;
            state.entrapment_since = Some(timestamp(since));
            state.entrapment_id = e.entrapment_id.clone();
            effects.push(Effect::Open(OpenIncident {
                kind: IncidentKind::Entrapment,
                planned: false,
                cause: format!("trapped at floor {}", e.floor),
                ref_id: e.entrapment_id.clone(),
                code: 0,
                vendor_code: String::new(),
                at: since,
            }));
            effects.push(Effect::Raise {
                rule: AlertRule::Entrapment,
                summary: format!("passengers trapped at floor {}", e.floor),
                at: since,
            });
        }
        Kind::EntrapmentReleased(e) if state.entrapment => {
            state.entrapment = false;
            state.entrapment_since = None;
            // The open one, even if the release names it otherwise (a state folded before the
            // id was kept has none: then the release's).
            let open = std::mem::take(&mut state.entrapment_id);
            effects.push(Effect::Close {
                kind: IncidentKind::Entrapment,
                ref_id: if open.is_empty() {
                    e.entrapment_id.clone()
                } else {
                    open
                },
                at,
            });
            effects.push(Effect::Resolve {
                rule: AlertRule::Entrapment,
                note: "passengers released".into(),
                at,
            });
        }
        Kind::ModeChanged(m) => state.mode = m.to,
        Kind::PowerLost(_) if !state.power_lost => {
            state.power_lost = true;
            state.power_lost_since = Some(ts);
            effects.push(open_plain(IncidentKind::PowerLoss, "mains power lost", at));
        }
        Kind::PowerRestored(p) => {
            if !state.power_lost {
                // The loss itself was never reported (no battery): record it from the restore.
                // Only a plausible one: after clocks are believed set, not after the restore.
                let lost_at =
                    p.lost_at.as_ref().and_then(datetime).filter(|l| {
                        l.timestamp() >= liftwire_proto::EARLIEST_DEVICE_TIME && *l <= at
                    });
                let Some(lost_at) = lost_at else { return };
                effects.push(open_plain(
                    IncidentKind::PowerLoss,
                    "mains power lost",
                    lost_at,
                ));
            }
            state.power_lost = false;
            state.power_lost_since = None;
            effects.push(Effect::Close {
                kind: IncidentKind::PowerLoss,
                ref_id: String::new(),
                at,
            });
        }
        Kind::AlarmSelfTest(t) => {
            state.last_self_test_at = Some(ts);
            state.last_self_test_passed = t.passed;
            if t.passed {
                effects.push(Effect::Resolve {
                    rule: AlertRule::SelfTestMissed,
                    note: "alarm self-test passed".into(),
                    at,
                });
            } else {
                effects.push(Effect::Raise {
                    rule: AlertRule::SelfTestMissed,
                    summary: format!("alarm self-test failed: {}", t.detail),
                    at,
                });
            }
        }
        Kind::MaintenanceVisitStarted(v) => {
            if let Some(previous) = state.maintenance.take() {
                // A visit that never reported its end ends when the next one starts.
                effects.push(Effect::Close {
                    kind: IncidentKind::Maintenance,
                    ref_id: previous.visit_id,
                    at,
                });
            }
            state.maintenance = Some(v1::MaintenanceVisit {
                visit_id: v.visit_id.clone(),
                planned: v.planned,
                technician: v.technician.clone(),
                started_at: Some(ts),
            });
            effects.push(Effect::Open(OpenIncident {
                kind: IncidentKind::Maintenance,
                planned: v.planned,
                cause: if v.planned { "planned" } else { "callback" }.into(),
                ref_id: v.visit_id.clone(),
                code: 0,
                vendor_code: String::new(),
                at,
            }));
        }
        Kind::MaintenanceVisitEnded(v)
            if state
                .maintenance
                .as_ref()
                .is_some_and(|m| m.visit_id == v.visit_id) =>
        {
            state.maintenance = None;
            effects.push(Effect::Close {
                kind: IncidentKind::Maintenance,
                ref_id: v.visit_id.clone(),
                at,
            });
        }
        _ => {}
    }
}

fn open_plain(kind: IncidentKind, cause: &str, at: DateTime<Utc>) -> Effect {
    Effect::Open(OpenIncident {
        kind,
        planned: false,
        cause: cause.into(),
        ref_id: String::new(),
        code: 0,
        vendor_code: String::new(),
        at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_795_000_000;

    struct Fold {
        state: v1::ElevatorState,
        seq: u64,
        effects: Vec<Effect>,
    }

    impl Fold {
        fn new() -> Self {
            Self {
                state: v1::ElevatorState::default(),
                seq: 0,
                effects: Vec::new(),
            }
        }

        /// Applies `body` at `T0 + second` and returns the effects it produced.
        fn at(&mut self, second: i64, body: Body) -> Vec<Effect> {
            self.seq += 1;
            let envelope = v1::Envelope {
                schema_version: 1,
                device_id: "e".into(),
                seq: self.seq,
                device_time: None,
                body: Some(body),
            };
            let at = DateTime::from_timestamp(T0 + second, 0).unwrap();
            let mut effects = Vec::new();
            apply(
                &mut self.state,
                self.seq,
                at,
                &envelope,
                &FoldRules::default(),
                &mut effects,
            );
            self.effects.extend(effects.clone());
            effects
        }

        fn event(&mut self, second: i64, kind: Kind) -> Vec<Effect> {
            self.at(second, Body::Event(v1::Event { kind: Some(kind) }))
        }
    }

    fn time(second: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(T0 + second, 0).unwrap()
    }

    fn normal(floor: i32) -> Body {
        Body::Telemetry(v1::Telemetry {
            mode: v1::OperatingMode::Normal as i32,
            floor,
            ..Default::default()
        })
    }

    fn fault(id: &str, blocking: bool) -> Kind {
        Kind::FaultRaised(v1::FaultRaised {
            fault_id: id.into(),
            blocking,
            ..Default::default()
        })
    }

    fn cleared(id: &str) -> Kind {
        Kind::FaultCleared(v1::FaultCleared {
            fault_id: id.into(),
            ..Default::default()
        })
    }

    fn kinds(effects: &[Effect]) -> Vec<String> {
        effects
            .iter()
            .map(|e| match e {
                Effect::Open(o) => format!("open {}", o.kind.as_str()),
                Effect::Close { kind, .. } => format!("close {}", kind.as_str()),
                Effect::Raise { rule, .. } => format!("raise {}", rule.as_str()),
                Effect::Resolve { rule, .. } => format!("resolve {}", rule.as_str()),
            })
            .collect()
    }

    #[test]
    fn a_blocking_fault_opens_downtime_until_it_clears() {
        let mut fold = Fold::new();
        assert!(fold.at(0, normal(3)).is_empty());
        assert!(fold.state.in_service);
        assert_eq!(
            kinds(&fold.event(10, fault("f1", true))),
            ["open fault", "open downtime"]
        );
        assert!(!fold.state.in_service);
        assert_eq!(fold.state.out_of_service_since, Some(timestamp(time(10))));
        assert_eq!(
            kinds(&fold.event(70, cleared("f1"))),
            ["close fault", "close downtime", "resolve out_of_service"]
        );
        assert!(fold.state.in_service && fold.state.out_of_service_since.is_none());
        // A non-blocking fault is an incident, not downtime.
        assert_eq!(kinds(&fold.event(80, fault("f2", false))), ["open fault"]);
        assert!(fold.state.in_service);
        // Raising the same fault again changes nothing; clearing an unknown one neither.
        assert!(fold.event(81, fault("f2", false)).is_empty());
        assert!(fold.event(82, cleared("nope")).is_empty());
    }

    #[test]
    fn an_entrapment_starts_at_the_alarm_pressed_just_before() {
        let mut fold = Fold::new();
        fold.at(0, normal(1));
        fold.event(100, Kind::AlarmButtonPressed(v1::AlarmButtonPressed {}));
        let effects = fold.event(
            160,
            Kind::EntrapmentStarted(v1::EntrapmentStarted {
                entrapment_id: "t1".into(),
                floor: 4,
            }),
        );
        assert_eq!(
            kinds(&effects),
            ["open entrapment", "raise entrapment", "open downtime"]
        );
        let Effect::Open(entrapment) = &effects[0] else {
            panic!()
        };
        assert_eq!(entrapment.at, time(100), "from the alarm");
        let effects = fold.event(
            1_600,
            Kind::EntrapmentReleased(v1::EntrapmentReleased {
                entrapment_id: "t1".into(),
            }),
        );
        assert_eq!(
            kinds(&effects),
            [
                "close entrapment",
                "resolve entrapment",
                "close downtime",
                "resolve out_of_service"
            ]
        );

        // An alarm long before does not count.
        fold.event(2_000, Kind::AlarmButtonPressed(v1::AlarmButtonPressed {}));
        let effects = fold.event(
            5_000,
            Kind::EntrapmentStarted(v1::EntrapmentStarted {
                entrapment_id: "t2".into(),
                floor: 0,
            }),
        );
        let Effect::Open(entrapment) = &effects[0] else {
            panic!()
        };
        assert_eq!(entrapment.at, time(5_000));
        // A release naming it otherwise still closes the open one.
        let effects = fold.event(
            5_600,
            Kind::EntrapmentReleased(v1::EntrapmentReleased {
                entrapment_id: "T2".into(),
            }),
        );
        assert!(
            matches!(&effects[0], Effect::Close { kind: IncidentKind::Entrapment, ref_id, .. } if ref_id == "t2"),
            "{effects:?}"
        );
        assert!(fold.state.entrapment_id.is_empty());
    }

    #[test]
    fn planned_maintenance_downtime_is_marked_planned() {
        let mut fold = Fold::new();
        fold.at(0, normal(0));
        let effects = fold.event(
            60,
            Kind::MaintenanceVisitStarted(v1::MaintenanceVisitStarted {
                visit_id: "v1".into(),
                planned: true,
                technician: "ann".into(),
            }),
        );
        assert_eq!(kinds(&effects), ["open maintenance", "open downtime"]);
        let Effect::Open(downtime) = &effects[1] else {
            panic!()
        };
        assert!(downtime.planned);
        assert_eq!(downtime.cause, "maintenance");
        // The end of another visit does not end this one.
        assert!(fold
            .event(
                70,
                Kind::MaintenanceVisitEnded(v1::MaintenanceVisitEnded {
                    visit_id: "other".into(),
                    notes: String::new()
                })
            )
            .is_empty());
        let effects = fold.event(
            2_760,
            Kind::MaintenanceVisitEnded(v1::MaintenanceVisitEnded {
                visit_id: "v1".into(),
                notes: String::new(),
            }),
        );
        assert_eq!(
            kinds(&effects),
            [
                "close maintenance",
                "close downtime",
                "resolve out_of_service"
            ]
        );
    }

    #[test]
    fn three_faults_in_ten_minutes_raise_a_burst() {
        let mut fold = Fold::new();
        fold.at(0, normal(0));
        fold.event(0, fault("a", false));
        fold.event(300, fault("b", false));
        // The first one is out of the window by now.
        assert_eq!(kinds(&fold.event(650, fault("c", false))), ["open fault"]);
        assert_eq!(
            kinds(&fold.event(700, fault("d", false))),
            ["open fault", "raise fault_burst"]
        );
    }

    #[test]
    fn open_faults_are_bounded_the_oldest_giving_way() {
        let mut fold = Fold::new();
        fold.at(0, normal(0));
        for n in 0..MAX_OPEN_FAULTS {
            fold.event(n as i64, fault(&format!("f{n}"), false));
        }
        let effects = fold.event(1_000, fault("newest", false));
        assert!(
            matches!(&effects[0], Effect::Close { kind: IncidentKind::Fault, ref_id, .. } if ref_id == "f0"),
            "{effects:?}"
        );
        assert_eq!(fold.state.open_faults.len(), MAX_OPEN_FAULTS);
        assert_eq!(fold.state.open_faults[0].fault_id, "f1");
        assert!(fold.state.recent_faults.len() <= FoldRules::default().fault_burst_count);

        // A blocking fault never gives way to the cap while a non-blocking one can: the car
        // stays out of service.
        let mut fold = Fold::new();
        fold.at(0, normal(0));
        fold.event(1, fault("stop", true));
        for n in 1..MAX_OPEN_FAULTS {
            fold.event(1 + n as i64, fault(&format!("f{n}"), false));
        }
        let effects = fold.event(1_000, fault("newest", false));
        assert!(
            matches!(&effects[0], Effect::Close { kind: IncidentKind::Fault, ref_id, .. } if ref_id == "f1"),
            "{effects:?}"
        );
        assert!(!fold.state.in_service);
        assert_eq!(fold.state.open_faults[0].fault_id, "stop");
    }

    #[test]
    fn a_refused_first_message_does_not_hide_the_downtime_of_the_next() {
        let mut fold = Fold::new();
        fold.seq = 1;
        skip(&mut fold.state, 1);
        assert_eq!(
            kinds(&fold.event(10, fault("f1", true))),
            ["open fault", "open downtime"]
        );
        assert!(!fold.state.in_service);
        assert_eq!(fold.state.out_of_service_since, Some(timestamp(time(10))));
    }

    #[test]
    fn power_loss_and_self_tests() {
        let mut fold = Fold::new();
        fold.at(0, normal(0));
        assert_eq!(
            kinds(&fold.event(10, Kind::PowerLost(v1::PowerLost {}))),
            ["open power_loss", "open downtime"]
        );
        assert_eq!(
            kinds(&fold.event(
                1_210,
                Kind::PowerRestored(v1::PowerRestored {
                    lost_at: Some(timestamp(time(10)))
                })
            )),
            [
                "close power_loss",
                "close downtime",
                "resolve out_of_service"
            ]
        );
        // A restore without a reported loss records the loss from `lost_at`.
        let effects = fold.event(
            2_000,
            Kind::PowerRestored(v1::PowerRestored {
                lost_at: Some(timestamp(time(1_500))),
            }),
        );
        assert_eq!(kinds(&effects), ["open power_loss", "close power_loss"]);
        assert!(matches!(&effects[0], Effect::Open(o) if o.at == time(1_500)));
        // An implausible `lost_at` (an unset clock, or a year PostgreSQL cannot store) opens
        // nothing: stored, it would fail the device's batch at every redelivery.
        for seconds in [0, -300_000_000_000] {
            let effects = fold.event(
                2_100,
                Kind::PowerRestored(v1::PowerRestored {
                    lost_at: Some(liftwire_proto::Timestamp { seconds, nanos: 0 }),
                }),
            );
            assert!(
                effects.is_empty(),
                "{seconds}: {}",
                kinds(&effects).join(", ")
            );
        }

        let failed = fold.event(
            3_000,
            Kind::AlarmSelfTest(v1::AlarmSelfTest {
                passed: false,
                detail: "no line".into(),
            }),
        );
        assert_eq!(kinds(&failed), ["raise self_test_missed"]);
        assert_eq!(
            kinds(&fold.event(
                3_100,
                Kind::AlarmSelfTest(v1::AlarmSelfTest {
                    passed: true,
                    detail: String::new()
                })
            )),
            ["resolve self_test_missed"]
        );
        assert!(fold.state.last_self_test_passed);
    }

    #[test]
    fn first_message_out_of_service_opens_downtime_and_unknown_mode_does_not() {
        let mut fold = Fold::new();
        // An event before any telemetry: mode unknown, not downtime.
        assert!(fold
            .event(0, Kind::AlarmButtonPressed(v1::AlarmButtonPressed {}))
            .is_empty());
        let mut fold = Fold::new();
        let effects = fold.at(
            0,
            Body::Telemetry(v1::Telemetry {
                mode: v1::OperatingMode::Inspection as i32,
                ..Default::default()
            }),
        );
        assert_eq!(kinds(&effects), ["open downtime"]);
        assert!(matches!(&effects[0], Effect::Open(o) if o.cause == "mode"));
    }
}
