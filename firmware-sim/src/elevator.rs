//! One elevator controller.

use std::collections::VecDeque;

use liftwire_proto::naming::DeviceId;
use liftwire_proto::{v1, Timestamp, SCHEMA_VERSION};
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
        let p_call = self.profile.calls_per_minute() * TICK_MS as f64 / 60_000.0;
        if self.rng.random_bool(p_call.min(1.0)) {
            self.new_call();
        }
        match self.phase {
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
                // A passenger may break the light curtain: the doors reopen.
                if self.rng.random_bool(0.02) {
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
                let progress = (self.now_ms - depart) as f64 / (arrive - depart) as f64;
                let from_mm = i64::from(from - self.spec.lowest_floor) * h;
                let to_mm = i64::from(to - self.spec.lowest_floor) * h;
                let pos = from_mm + ((to_mm - from_mm) as f64 * progress) as i64;
                let dir = if to > from {
                    v1::Direction::Up
                } else {
                    v1::Direction::Down
                };
                (dir, pos, self.spec.speed_mm_s, v1::DoorState::Closed)
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
            mode: v1::OperatingMode::Normal as i32,
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
        let unix_ms = self.epoch_unix_ms + i64::try_from(self.now_ms).unwrap_or(i64::MAX);
        out.push(v1::Envelope {
            schema_version: SCHEMA_VERSION,
            device_id: self.device.to_string(),
            seq: self.next_seq,
            device_time: Some(Timestamp {
                seconds: unix_ms.div_euclid(1000),
                nanos: i32::try_from(unix_ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
            }),
            body: Some(body),
        });
        self.next_seq += 1;
    }
}

/// A one-off alarm-button event from `device` at `at`, for manual tests with MQTT tools.
pub fn alarm_envelope(device: &DeviceId, seq: u64, at: std::time::SystemTime) -> v1::Envelope {
    let since_epoch = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    v1::Envelope {
        schema_version: SCHEMA_VERSION,
        device_id: device.to_string(),
        seq,
        device_time: Some(Timestamp {
            seconds: i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(since_epoch.subsec_nanos()).unwrap_or(0),
        }),
        body: Some(v1::envelope::Body::Event(v1::Event {
            kind: Some(v1::event::Kind::AlarmButtonPressed(
                v1::AlarmButtonPressed {},
            )),
        })),
    }
}
