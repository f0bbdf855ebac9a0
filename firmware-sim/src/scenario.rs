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
