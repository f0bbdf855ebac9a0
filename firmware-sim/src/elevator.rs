//! One elevator controller.

use std::collections::VecDeque;

use liftwire_proto::naming::DeviceId;
use liftwire_proto::{timestamp, timestamp_from_unix_ms, v1, SCHEMA_VERSION};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

/// Simulation tick: the model advances in steps of this many milliseconds.
pub const TICK_MS: u64 = 100;
/// Alarm self-tests run once per simulated day (EN 81-28 requires one at least every 3 days).
pub const SELF_TEST_PERIOD_MS: u64 = 24 * 3600 * 1000;

/// How passengers call the elevator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TrafficProfile {
    /// Office building at the morning peak: frequent calls, mostly from the lobby up.
    OfficeMorningPeak,
    /// Residential building in the evening: moderate calls, mostly from the lobby.
    ResidentialEvening,
    /// Night: rare calls.
    Night,
}

impl TrafficProfile {
    /// Mean calls per simulated minute.
    fn calls_per_minute(self) -> f64 {
        match self {
            TrafficProfile::OfficeMorningPeak => 4.0,
            TrafficProfile::ResidentialEvening => 1.5,
            TrafficProfile::Night => 0.2,
        }
    }

    /// Probability that a call starts at the lowest landing (the lobby).
    fn lobby_share(self) -> f64 {
        match self {
            TrafficProfile::OfficeMorningPeak => 0.8,
            TrafficProfile::ResidentialEvening => 0.6,
            TrafficProfile::Night => 0.3,
        }
    }
}

/// Physical parameters of an elevator.
#[derive(Debug, Clone, Copy)]
pub struct ElevatorSpec {
    /// Lowest landing (negative for basements).
    pub lowest_floor: i32,
    /// Highest landing.
    pub highest_floor: i32,
    /// Distance between landings.
    pub floor_height_mm: u32,
    /// Rated speed.
    pub speed_mm_s: u32,
    /// Acceleration (and deceleration).
    pub accel_mm_s2: u32,
    /// Time for the doors to open, and again to close.
    pub door_motion_ms: u64,
    /// Time the doors stay open at a stop.
    pub dwell_ms: u64,
    /// Period of telemetry snapshots.
    pub telemetry_interval_ms: u64,
}

impl Default for ElevatorSpec {
    fn default() -> Self {
        Self {
            lowest_floor: -1,
            highest_floor: 9,
            floor_height_mm: 3_000,
            speed_mm_s: 1_600,
            accel_mm_s2: 800,
            door_motion_ms: 2_000,
            dwell_ms: 3_000,
            telemetry_interval_ms: 10_000,
        }
    }
}

/// What the car is doing.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Idle,
    Opening {
        until: u64,
    },
    Open {
        until: u64,
    },
    Closing {
        until: u64,
    },
    Moving {
        from: i32,
        to: i32,
        depart: u64,
        arrive: u64,
    },
}

/// Something that happens to an elevator: the chaos rig's building blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incident {
    /// The car stops (between floors if moving) with passengers inside; the alarm button is
    /// pressed; they are released after `duration_ms`.
    Entrapment {
        /// Time until release.
        duration_ms: u64,
    },
    /// The next `stops` door closings are each interrupted several times.
    DoorReopenStorm {
        /// Stops affected.
        stops: u32,
    },
    /// A fault is raised and cleared after `duration_ms`; a blocking one takes the elevator out of
    /// service meanwhile.
    Fault {
        /// Standard fault class.
        code: v1::FaultCode,
        /// The vendor's raw code.
        vendor_code: String,
        /// Whether the elevator stops serving calls.
        blocking: bool,
        /// Time until the fault clears.
        duration_ms: u64,
    },
    /// Mains power is lost for `duration_ms`: the controller reports it on battery, then is
    /// silent until power returns.
    PowerLoss {
        /// Outage length.
        duration_ms: u64,
    },
    /// The device clock jumps by `offset_ms` (may be negative).
    ClockSkew {
        /// Clock offset.
        offset_ms: i64,
    },
    /// A technician visits; the elevator is in inspection mode meanwhile.
    Maintenance {
        /// Planned preventive maintenance, or an unplanned callback.
        planned: bool,
        /// Visit length.
        duration_ms: u64,
    },
}

/// Something the controller will do later in simulated time.
#[derive(Debug, Clone, PartialEq)]
enum Scheduled {
    ReleaseEntrapment {
        id: String,
        fault_id: String,
    },
    ClearFault {
        id: String,
        code: v1::FaultCode,
        vendor_code: String,
        blocking: bool,
    },
    RestorePower {
        lost_at_ms: u64,
    },
    EndMaintenance {
        id: String,
    },
}

/// One simulated elevator controller.
#[derive(Debug, Clone)]
pub struct Elevator {
    device: DeviceId,
    spec: ElevatorSpec,
    profile: TrafficProfile,
    rng: StdRng,
    /// Simulated milliseconds since the start of the run.
    now_ms: u64,
    /// Device clock at `now_ms == 0`, in Unix milliseconds.
    epoch_unix_ms: i64,
    floor: i32,
    phase: Phase,
    calls: VecDeque<i32>,
    reopens_this_stop: u32,
    door_cycle_started: u64,
    load_percent: u32,
    counters: v1::Counters,
    run_ms: u64,
    mode: v1::OperatingMode,
    /// Causes that currently keep the car from serving calls (entrapment, blocking faults,
    /// maintenance); when the last one ends, timers resume where they stopped.
    holds: u32,
    held_since: u64,
    powered: bool,
    reopen_storm_stops: u32,
    clock_offset_ms: i64,
    incidents: u64,
    schedule: Vec<(u64, Scheduled)>,
    next_seq: u64,
    next_telemetry: u64,
    next_self_test: u64,
}

impl Elevator {
    /// A new elevator idle at the lowest landing; `seed` drives every random choice.
    pub fn new(
        device: DeviceId,
        spec: ElevatorSpec,
        profile: TrafficProfile,
        seed: u64,
        epoch_unix_ms: i64,
    ) -> Self {
        Self {
            device,
            spec,
            profile,
            rng: StdRng::seed_from_u64(seed),
            now_ms: 0,
            epoch_unix_ms,
            floor: spec.lowest_floor,
            phase: Phase::Idle,
            calls: VecDeque::new(),
            reopens_this_stop: 0,
            door_cycle_started: 0,
            load_percent: 0,
            counters: v1::Counters::default(),
            run_ms: 0,
            mode: v1::OperatingMode::Normal,
            holds: 0,
            held_since: 0,
            powered: true,
            reopen_storm_stops: 0,
            clock_offset_ms: 0,
            incidents: 0,
            schedule: Vec::new(),
            next_seq: 1,
            next_telemetry: 0,
            // Spread self-tests over the day so a fleet does not test all at once.
            next_self_test: seed % SELF_TEST_PERIOD_MS,
        }
    }

    /// The device id.
    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    /// Continues numbering at `seq` (the outbox's next sequence number after a restart).
    pub fn set_next_seq(&mut self, seq: u64) {
        self.next_seq = seq;
    }

    /// Simulated time of the model, in milliseconds since the start.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Advances the model by `duration_ms` (in [`TICK_MS`] steps) and returns the envelopes the
    /// controller produced meanwhile, in order, with consecutive sequence numbers.
    pub fn advance(&mut self, duration_ms: u64) -> Vec<v1::Envelope> {
        let mut out = Vec::new();
        let end = self.now_ms + duration_ms;
        while self.now_ms < end {
            self.now_ms += TICK_MS;
            self.tick(&mut out);
        }
        out
    }

    fn tick(&mut self, out: &mut Vec<v1::Envelope>) {
        self.run_schedule(out);
        if !self.powered {
            return;
        }
        let p_call = self.profile.calls_per_minute() * TICK_MS as f64 / 60_000.0;
        if self.rng.random_bool(p_call.min(1.0)) {
            self.new_call();
        }
        let phase = if self.holds > 0 {
            Phase::Idle
        } else {
            self.phase
        };
        match phase {
            Phase::Idle if self.holds > 0 => {}
            Phase::Idle => {
                if let Some(target) = self.calls.front().copied() {
                    if target == self.floor {
                        self.calls.pop_front();
                        self.open_doors();
                    } else {
                        self.depart(target);
                    }
                }
            }
            Phase::Opening { until } if self.now_ms >= until => {
                self.phase = Phase::Open {
                    until: self.now_ms + self.spec.dwell_ms,
                };
            }
            Phase::Open { until } if self.now_ms >= until => {
                self.phase = Phase::Closing {
                    until: self.now_ms + self.spec.door_motion_ms,
                };
            }
            Phase::Closing { until } => {
                // A passenger may break the light curtain: the doors reopen (always, three times
                // per stop, during a reopen storm).
                let storm = self.reopen_storm_stops > 0 && self.reopens_this_stop < 3;
                if storm || self.rng.random_bool(0.02) {
                    self.reopens_this_stop += 1;
                    self.phase = Phase::Opening {
                        until: self.now_ms + self.spec.door_motion_ms / 2,
                    };
                } else if self.now_ms >= until {
                    self.counters.door_cycles += 1;
                    let cycle_ms =
                        u32::try_from(self.now_ms - self.door_cycle_started).unwrap_or(u32::MAX);
                    let event = v1::event::Kind::DoorCycle(v1::DoorCycle {
                        door: 0,
                        floor: self.floor,
                        cycle_ms,
                        reopens: self.reopens_this_stop,
                    });
                    self.emit_event(out, event);
                    self.reopen_storm_stops = self.reopen_storm_stops.saturating_sub(1);
                    self.load_percent = self.rng.random_range(0..=80);
                    self.phase = Phase::Idle;
                }
            }
            Phase::Moving {
                from,
                to,
                depart,
                arrive,
            } if self.now_ms >= arrive => {
                self.floor = to;
                self.counters.trips += 1;
                self.run_ms += arrive - depart;
                self.counters.run_seconds = self.run_ms / 1000;
                let trip = v1::event::Kind::TripCompleted(v1::TripCompleted {
                    from_floor: from,
                    to_floor: to,
                    duration_ms: u32::try_from(arrive - depart).unwrap_or(u32::MAX),
                    distance_mm: self.distance_mm(from, to),
                    levelling_error_mm: self.rng.random_range(-6..=6),
                    door_reopens: 0,
                });
                self.emit_event(out, trip);
                if self.calls.front() == Some(&to) {
                    self.calls.pop_front();
                }
                self.open_doors();
            }
            _ => {}
        }
        if self.now_ms >= self.next_telemetry {
            self.next_telemetry = self.now_ms + self.spec.telemetry_interval_ms;
            let telemetry = self.telemetry();
            self.emit(out, v1::envelope::Body::Telemetry(telemetry));
        }
        if self.now_ms >= self.next_self_test {
            self.next_self_test = self.now_ms + SELF_TEST_PERIOD_MS;
            let event = v1::event::Kind::AlarmSelfTest(v1::AlarmSelfTest {
                passed: true,
                detail: String::new(),
            });
            self.emit_event(out, event);
        }
    }

    /// Starts `incident` now; returns the messages it produces at once (later ones come from
    /// [`Elevator::advance`]).
    pub fn inject(&mut self, incident: Incident) -> Vec<v1::Envelope> {
        let mut out = Vec::new();
        self.incidents += 1;
        let id = format!("{}-i{}", self.device, self.incidents);
        let now = self.now_ms;
        match incident {
            Incident::Entrapment { duration_ms } => {
                let fault_id = format!("{id}-fault");
                self.emit_event(
                    &mut out,
                    v1::event::Kind::FaultRaised(v1::FaultRaised {
                        fault_id: fault_id.clone(),
                        code: v1::FaultCode::SafetyChainOpen as i32,
                        vendor_code: "SC-OPEN".into(),
                        description: "safety chain opened; car stopped".into(),
                        blocking: true,
                    }),
                );
                self.hold(&mut out);
                self.emit_event(
                    &mut out,
                    v1::event::Kind::EntrapmentStarted(v1::EntrapmentStarted {
                        entrapment_id: id.clone(),
                        floor: self.floor,
                    }),
                );
                self.emit_event(
                    &mut out,
                    v1::event::Kind::AlarmButtonPressed(v1::AlarmButtonPressed {}),
                );
                self.schedule.push((
                    now + duration_ms,
                    Scheduled::ReleaseEntrapment { id, fault_id },
                ));
            }
            Incident::DoorReopenStorm { stops } => self.reopen_storm_stops += stops,
            Incident::Fault {
                code,
                vendor_code,
                blocking,
                duration_ms,
            } => {
                self.emit_event(
                    &mut out,
                    v1::event::Kind::FaultRaised(v1::FaultRaised {
                        fault_id: id.clone(),
                        code: code as i32,
                        vendor_code: vendor_code.clone(),
                        description: format!("{code:?}"),
                        blocking,
                    }),
                );
                if blocking {
                    self.hold(&mut out);
                }
                self.schedule.push((
                    now + duration_ms,
                    Scheduled::ClearFault {
                        id,
                        code,
                        vendor_code,
                        blocking,
                    },
                ));
            }
            Incident::PowerLoss { duration_ms } => {
                self.emit_event(&mut out, v1::event::Kind::PowerLost(v1::PowerLost {}));
                self.powered = false;
                self.schedule.push((
                    now + duration_ms,
                    Scheduled::RestorePower { lost_at_ms: now },
                ));
            }
            Incident::ClockSkew { offset_ms } => self.clock_offset_ms += offset_ms,
            Incident::Maintenance {
                planned,
                duration_ms,
            } => {
                self.emit_event(
                    &mut out,
                    v1::event::Kind::MaintenanceVisitStarted(v1::MaintenanceVisitStarted {
                        visit_id: id.clone(),
                        planned,
                        technician: "sim-technician".into(),
                    }),
                );
                self.hold_in(&mut out, v1::OperatingMode::Inspection);
                self.schedule
                    .push((now + duration_ms, Scheduled::EndMaintenance { id }));
            }
        }
        out
    }

    fn run_schedule(&mut self, out: &mut Vec<v1::Envelope>) {
        let now = self.now_ms;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.schedule)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.schedule = later;
        for (_, action) in due {
            match action {
                Scheduled::ReleaseEntrapment { id, fault_id } => {
                    self.emit_event(
                        out,
                        v1::event::Kind::EntrapmentReleased(v1::EntrapmentReleased {
                            entrapment_id: id,
                        }),
                    );
                    self.emit_event(
                        out,
                        v1::event::Kind::FaultCleared(v1::FaultCleared {
                            fault_id,
                            code: v1::FaultCode::SafetyChainOpen as i32,
                            vendor_code: "SC-OPEN".into(),
                        }),
                    );
                    self.release(out);
                }
                Scheduled::ClearFault {
                    id,
                    code,
                    vendor_code,
                    blocking,
                } => {
                    self.emit_event(
                        out,
                        v1::event::Kind::FaultCleared(v1::FaultCleared {
                            fault_id: id,
                            code: code as i32,
                            vendor_code,
                        }),
                    );
                    if blocking {
                        self.release(out);
                    }
                }
                Scheduled::RestorePower { lost_at_ms } => {
                    self.powered = true;
                    let lost = self.epoch_unix_ms
                        + i64::try_from(lost_at_ms).unwrap_or(i64::MAX)
                        + self.clock_offset_ms;
                    let lost_at = timestamp_from_unix_ms(lost);
                    self.emit_event(
                        out,
                        v1::event::Kind::PowerRestored(v1::PowerRestored {
                            lost_at: Some(lost_at),
                        }),
                    );
                }
                Scheduled::EndMaintenance { id } => {
                    self.emit_event(
                        out,
                        v1::event::Kind::MaintenanceVisitEnded(v1::MaintenanceVisitEnded {
                            visit_id: id,
                            notes: "done".into(),
                        }),
                    );
                    self.release(out);
                }
            }
        }
    }

    fn hold(&mut self, out: &mut Vec<v1::Envelope>) {
        self.hold_in(out, v1::OperatingMode::OutOfService);
    }

    /// Stops serving calls (the first cause switches the mode and freezes the timers).
    fn hold_in(&mut self, out: &mut Vec<v1::Envelope>, mode: v1::OperatingMode) {
        if self.holds == 0 {
            self.held_since = self.now_ms;
        }
        self.holds += 1;
        self.set_mode(out, mode);
    }

    /// Ends one hold; with the last one the elevator is back in normal service and its timers
    /// resume where they stopped.
    fn release(&mut self, out: &mut Vec<v1::Envelope>) {
        self.holds = self.holds.saturating_sub(1);
        if self.holds > 0 {
            return;
        }
        let held = self.now_ms - self.held_since;
        self.phase = match self.phase {
            Phase::Opening { until } => Phase::Opening {
                until: until + held,
            },
            Phase::Open { until } => Phase::Open {
                until: until + held,
            },
            Phase::Closing { until } => Phase::Closing {
                until: until + held,
            },
            Phase::Moving {
                from,
                to,
                depart,
                arrive,
            } => Phase::Moving {
                from,
                to,
                depart: depart + held,
                arrive: arrive + held,
            },
            Phase::Idle => Phase::Idle,
        };
        self.set_mode(out, v1::OperatingMode::Normal);
    }

    fn set_mode(&mut self, out: &mut Vec<v1::Envelope>, to: v1::OperatingMode) {
        if self.mode != to {
            let from = self.mode;
            self.mode = to;
            self.emit_event(
                out,
                v1::event::Kind::ModeChanged(v1::ModeChanged {
                    from: from as i32,
                    to: to as i32,
                }),
            );
        }
    }

    fn new_call(&mut self) {
        let lobby = self.spec.lowest_floor.max(0).min(self.spec.highest_floor);
        let from = if self.rng.random_bool(self.profile.lobby_share()) {
            lobby
        } else {
            self.rng
                .random_range(self.spec.lowest_floor..=self.spec.highest_floor)
        };
        let mut to = self
            .rng
            .random_range(self.spec.lowest_floor..=self.spec.highest_floor);
        if to == from {
            to = if from == self.spec.highest_floor {
                self.spec.lowest_floor
            } else {
                self.spec.highest_floor
            };
        }
        // Keep the queue short: a real controller collects calls, it does not grow without bound.
        if self.calls.len() < 16 {
            self.calls.push_back(from);
            self.calls.push_back(to);
        }
    }

    fn open_doors(&mut self) {
        self.reopens_this_stop = 0;
        self.door_cycle_started = self.now_ms;
        self.phase = Phase::Opening {
            until: self.now_ms + self.spec.door_motion_ms,
        };
    }

    fn distance_mm(&self, from: i32, to: i32) -> u32 {
        (from - to).unsigned_abs() * self.spec.floor_height_mm
    }

    fn depart(&mut self, to: i32) {
        let distance = f64::from(self.distance_mm(self.floor, to));
        let v = f64::from(self.spec.speed_mm_s);
        let a = f64::from(self.spec.accel_mm_s2);
        // Trapezoidal profile (triangular when the trip is too short to reach full speed).
        let travel_s = if distance >= v * v / a {
            distance / v + v / a
        } else {
            2.0 * (distance / a).sqrt()
        };
        let travel_ms = (travel_s * 1000.0).ceil() as u64;
        self.counters.starts += 1;
        self.phase = Phase::Moving {
            from: self.floor,
            to,
            depart: self.now_ms,
            arrive: self.now_ms + travel_ms.max(TICK_MS),
        };
    }

    fn telemetry(&self) -> v1::Telemetry {
        let h = i64::from(self.spec.floor_height_mm);
        let (direction, position_mm, speed, door) = match self.phase {
            Phase::Moving {
                from,
                to,
                depart,
                arrive,
            } => {
                // While held (entrapment, blocking fault), the car stands where it stopped.
                let at = if self.holds > 0 {
                    self.held_since
                } else {
                    self.now_ms
                };
                let progress = at.saturating_sub(depart) as f64 / (arrive - depart) as f64;
                let from_mm = i64::from(from - self.spec.lowest_floor) * h;
                let to_mm = i64::from(to - self.spec.lowest_floor) * h;
                let pos = from_mm + ((to_mm - from_mm) as f64 * progress) as i64;
                let (dir, speed) = match (self.holds > 0, to > from) {
                    (true, _) => (v1::Direction::Stopped, 0),
                    (false, true) => (v1::Direction::Up, self.spec.speed_mm_s),
                    (false, false) => (v1::Direction::Down, self.spec.speed_mm_s),
                };
                (dir, pos, speed, v1::DoorState::Closed)
            }
            other => {
                let door = match other {
                    Phase::Opening { .. } => v1::DoorState::Opening,
                    Phase::Open { .. } => v1::DoorState::Open,
                    Phase::Closing { .. } => v1::DoorState::Closing,
                    _ => v1::DoorState::Closed,
                };
                let pos = i64::from(self.floor - self.spec.lowest_floor) * h;
                (v1::Direction::Stopped, pos, 0, door)
            }
        };
        let floor = match self.phase {
            Phase::Moving { from, to, .. } => {
                let travelled = position_mm / h + i64::from(self.spec.lowest_floor);
                i32::try_from(travelled)
                    .unwrap_or(from)
                    .clamp(from.min(to), from.max(to))
            }
            _ => self.floor,
        };
        v1::Telemetry {
            mode: self.mode as i32,
            floor,
            position_mm,
            direction: direction as i32,
            doors: vec![door as i32],
            load_percent: self.load_percent,
            speed_mm_s: speed,
            motor_temp_decicelsius: 300 + i32::try_from(self.counters.starts % 150).unwrap_or(0),
            counters: Some(self.counters),
        }
    }

    fn emit_event(&mut self, out: &mut Vec<v1::Envelope>, kind: v1::event::Kind) {
        self.emit(
            out,
            v1::envelope::Body::Event(v1::Event { kind: Some(kind) }),
        );
    }

    fn emit(&mut self, out: &mut Vec<v1::Envelope>, body: v1::envelope::Body) {
        let unix_ms = self.epoch_unix_ms
            + i64::try_from(self.now_ms).unwrap_or(i64::MAX)
            + self.clock_offset_ms;
        out.push(v1::Envelope {
            schema_version: SCHEMA_VERSION,
            device_id: self.device.to_string(),
            seq: self.next_seq,
            device_time: Some(timestamp_from_unix_ms(unix_ms)),
            body: Some(body),
        });
        self.next_seq += 1;
    }
}

/// A one-off alarm-button event from `device` at `at`, for manual tests with MQTT tools.
pub fn alarm_envelope(device: &DeviceId, seq: u64, at: std::time::SystemTime) -> v1::Envelope {
    v1::Envelope {
        schema_version: SCHEMA_VERSION,
        device_id: device.to_string(),
        seq,
        device_time: Some(timestamp(at)),
        body: Some(v1::envelope::Body::Event(v1::Event {
            kind: Some(v1::event::Kind::AlarmButtonPressed(
                v1::AlarmButtonPressed {},
            )),
        })),
    }
}
