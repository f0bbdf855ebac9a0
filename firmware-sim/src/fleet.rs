//! A fleet of simulated elevators across buildings.

use liftwire_proto::naming::{BuildingId, DeviceId, IdError, Uplink};
use liftwire_proto::v1;
use serde::Deserialize;

use crate::elevator::{Elevator, ElevatorSpec, Incident, TrafficProfile};

/// `[fleet]` settings (also settable from the command line).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// Seed of every random choice: the same seed gives the same run.
    pub seed: u64,
    /// Number of simulated buildings.
    pub buildings: u32,
    /// Elevators in each building.
    pub elevators_per_building: u32,
    /// Traffic profile of every elevator.
    pub profile: TrafficProfile,
    /// Prefix of building ids (`{prefix}-b01`, ...); device ids append `-e01`, ...
    pub id_prefix: String,
    /// Device clock at the start of the run (Unix milliseconds).
    pub epoch_unix_ms: i64,
    /// Give every elevator an in-cabin screen (`{elevator}-s`) when running over MQTT.
    pub screens: bool,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            buildings: 2,
            elevators_per_building: 2,
            profile: TrafficProfile::OfficeMorningPeak,
            id_prefix: "sim".into(),
            // 2026-11-02 08:00:00 UTC, a Monday morning.
            epoch_unix_ms: 1_793_606_400_000,
            screens: true,
        }
    }
}

/// Simulated elevators with their buildings.
#[derive(Debug, Clone)]
pub struct Fleet {
    elevators: Vec<(BuildingId, Elevator)>,
}

impl Fleet {
    /// Builds the fleet described by `config`.
    pub fn new(config: &FleetConfig) -> Result<Self, IdError> {
        let mut elevators = Vec::new();
        for b in 1..=config.buildings {
            let building = BuildingId::new(format!("{}-b{b:02}", config.id_prefix))?;
            for e in 1..=config.elevators_per_building {
                let device = DeviceId::new(format!("{building}-e{e:02}"))?;
                let seed = config.seed
                    ^ (u64::from(b) << 32 | u64::from(e)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let elevator = Elevator::new(
                    device,
                    ElevatorSpec::default(),
                    config.profile,
                    seed,
                    config.epoch_unix_ms,
                );
                elevators.push((building.clone(), elevator));
            }
        }
        Ok(Self { elevators })
    }

    /// Number of elevators.
    pub fn len(&self) -> usize {
        self.elevators.len()
    }

    /// Whether the fleet is empty.
    pub fn is_empty(&self) -> bool {
        self.elevators.is_empty()
    }

    /// The elevators with their buildings.
    pub fn into_elevators(self) -> Vec<(BuildingId, Elevator)> {
        self.elevators
    }

    /// Id of the first building.
    pub fn first_building(&self) -> String {
        self.elevators
            .first()
            .map(|(b, _)| b.to_string())
            .unwrap_or_default()
    }

    /// Starts `incident(index, building)` on every elevator it returns one for; returns what the
    /// devices send at once.
    pub fn inject(
        &mut self,
        incident: impl Fn(usize, &str) -> Option<Incident>,
    ) -> Vec<(Uplink, v1::Envelope)> {
        let mut out = Vec::new();
        for (i, (building, elevator)) in self.elevators.iter_mut().enumerate() {
            let Some(incident) = incident(i, building.as_str()) else {
                continue;
            };
            for envelope in elevator.inject(incident) {
                if let Some(kind) = envelope.kind() {
                    out.push((
                        Uplink {
                            building: building.clone(),
                            device: elevator.device().clone(),
                            kind,
                        },
                        envelope,
                    ));
                }
            }
        }
        out
    }

    /// Advances every elevator by `duration_ms`; returns each envelope with where it is published.
    pub fn advance(&mut self, duration_ms: u64) -> Vec<(Uplink, v1::Envelope)> {
        let mut out = Vec::new();
        for (building, elevator) in &mut self.elevators {
            for envelope in elevator.advance(duration_ms) {
                if let Some(kind) = envelope.kind() {
                    let uplink = Uplink {
                        building: building.clone(),
                        device: elevator.device().clone(),
                        kind,
                    };
                    out.push((uplink, envelope));
                }
            }
        }
        out
    }
}
