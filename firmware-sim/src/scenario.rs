//! Named chaos scenarios, usable from tests and from `liftwire-firmware-sim trace --scenario`.

use liftwire_proto::naming::Uplink;
use liftwire_proto::v1;

use crate::elevator::Incident;
use crate::fleet::Fleet;

const MINUTE_MS: u64 = 60_000;

/// A named scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Passengers trapped in the first elevator for 25 minutes.
    Entrapment,
    /// The first elevator's doors are held open at its next 10 stops.
    DoorReopenStorm,
    /// Every elevator of the first building faults within a minute (blocking, 5 to 15 minutes).
    FaultBurst,
    /// The first building loses mains power for 20 minutes.
    PowerLoss,
    /// The first elevator's clock jumps two hours ahead.
    ClockSkew,
    /// A planned 45-minute maintenance visit on the first elevator.
    Maintenance,
}

impl Scenario {
    /// The same scenario as chaos commands for a running fleet (`liftwire-firmware-sim run
    /// --scenario`): which devices, which incident.
    pub fn commands(
        self,
        fleet: &crate::FleetConfig,
    ) -> Result<Vec<crate::device::ChaosCommand>, liftwire_proto::naming::IdError> {
        use crate::device::{Chaos, Target};
        let elevators = Fleet::new(fleet)?.into_elevators();
        let first_building = elevators.first().map(|(b, _)| b.clone());
        let mut commands = Vec::new();
        for (i, (building, elevator)) in elevators.iter().enumerate() {
            let in_first = Some(building) == first_building.as_ref();
            let incident = match self {
                Scenario::FaultBurst if in_first => Some(Incident::Fault {
                    code: [
                        v1::FaultCode::DoorLock,
                        v1::FaultCode::Drive,
                        v1::FaultCode::Controller,
                    ][i % 3],
                    vendor_code: format!("E-{:04}", 100 + i),
                    blocking: true,
                    duration_ms: (5 + 5 * (i as u64 % 3)) * MINUTE_MS,
                }),
                Scenario::PowerLoss if in_first => Some(Incident::PowerLoss {
                    duration_ms: 20 * MINUTE_MS,
                }),
                Scenario::Entrapment if i == 0 => Some(Incident::Entrapment {
                    duration_ms: 25 * MINUTE_MS,
                }),
                Scenario::DoorReopenStorm if i == 0 => {
                    Some(Incident::DoorReopenStorm { stops: 10 })
                }
                Scenario::ClockSkew if i == 0 => Some(Incident::ClockSkew {
                    offset_ms: 2 * 3600 * 1000,
                }),
                Scenario::Maintenance if i == 0 => Some(Incident::Maintenance {
                    planned: true,
                    duration_ms: 45 * MINUTE_MS,
                }),
                _ => None,
            };
            if let Some(incident) = incident {
                commands.push((
                    Target::Device(elevator.device().clone()),
                    Chaos::Incident(incident),
                ));
            }
        }
        Ok(commands)
    }

    /// Starts the scenario on `fleet` now; returns what the devices send at once.
    pub fn apply(self, fleet: &mut Fleet) -> Vec<(Uplink, v1::Envelope)> {
        let first_building = |i: usize, b: &str, fleet_first: &str| i == 0 || b == fleet_first;
        match self {
            Scenario::Entrapment => fleet.inject(
                |i, _| i == 0,
                |_| Incident::Entrapment {
                    duration_ms: 25 * MINUTE_MS,
                },
            ),
            Scenario::DoorReopenStorm => {
                fleet.inject(|i, _| i == 0, |_| Incident::DoorReopenStorm { stops: 10 })
            }
            Scenario::FaultBurst => {
                let first = fleet.first_building();
                fleet.inject(
                    |i, b| first_building(i, b, &first),
                    |i| Incident::Fault {
                        code: [
                            v1::FaultCode::DoorLock,
                            v1::FaultCode::Drive,
                            v1::FaultCode::Controller,
                        ][i % 3],
                        vendor_code: format!("E-{:04}", 100 + i),
                        blocking: true,
                        duration_ms: (5 + 5 * (i as u64 % 3)) * MINUTE_MS,
                    },
                )
            }
            Scenario::PowerLoss => {
                let first = fleet.first_building();
                fleet.inject(
                    |i, b| first_building(i, b, &first),
                    |_| Incident::PowerLoss {
                        duration_ms: 20 * MINUTE_MS,
                    },
                )
            }
            Scenario::ClockSkew => fleet.inject(
                |i, _| i == 0,
                |_| Incident::ClockSkew {
                    offset_ms: 2 * 3600 * 1000,
                },
            ),
            Scenario::Maintenance => fleet.inject(
                |i, _| i == 0,
                |_| Incident::Maintenance {
                    planned: true,
                    duration_ms: 45 * MINUTE_MS,
                },
            ),
        }
    }
}
